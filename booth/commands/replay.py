"""`booth replay` and `booth demo` (the shipped transcript replayed on a tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from booth.commands import session as shared
from booth.commands.options import GLOBALS, fail

app = typer.Typer()


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="A transcript (.jsonl) written by booth chat")],
    execute: Annotated[bool, typer.Option(
        "--execute", help="Run the approved tool calls again (no LLM is contacted) and "
        "compare each result with the recorded one; exit 1 if any differs")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="With --execute: approve every call without asking")] = False,
) -> None:
    """Show a saved session as it looked, or re-run its tool calls with --execute.

    --execute runs where the session ran: its workspace, base model and folder.
    --workspace and --base-model (or BOOTH_WORKSPACE, BOOTH_BASE_MODEL) choose others.
    """
    code = run_replay(path, execute=execute, yes=yes)
    if code:
        raise typer.Exit(code)


def run_replay(path: Path, *, execute: bool, yes: bool) -> int:
    """The body of `booth replay`; returns the exit code."""
    from booth.agent import replay as replays
    from booth.agent.replay_setup import ReplaySetupError, choose_places, working_folder
    from booth.agent.transcript import TranscriptError, read_transcript
    from booth.tools import ToolContext

    ui = _ui()
    path = path.expanduser().resolve()  # before the replay moves to the recorded folder
    try:
        if not execute:
            replays.show(path, ui)
            return 0
        # None unless the user gave them (flag or environment): the recorded ones win then.
        places = choose_places(read_transcript(path)[0], GLOBALS.workspace, GLOBALS.base_model)
        for line in places.lines:
            ui.info(line)
        ctx = ToolContext.from_options(workspace=places.workspace, base_model=places.base_model,
                                       eval_models=GLOBALS.eval_models)
        policy = shared.choose_policy(ui, yes=yes, interactive=shared.stdin_is_tty())
        writer = _replay_writer(ctx, path)
    except (TranscriptError, ReplaySetupError, OSError) as error:
        raise fail(str(error), 2) from None

    def body() -> int:
        with working_folder(places.cwd):
            report = replays.execute(path, ctx, policy, ui, writer)
        replays.summarise(ui, report, places, path)
        return 0 if report.all_match else 1

    try:
        return shared.run_to_end(body, ui, f"replay it again with `booth replay {path} "
                                 "--execute`")
    except (TranscriptError, OSError) as error:
        raise fail(str(error), 2) from None
    finally:
        writer.close()


def _replay_writer(ctx, source: Path):
    """The replay is itself a session: record it beside the others."""
    from booth.agent.transcript import TranscriptWriter, default_path, read_transcript

    header, _ = read_transcript(source)
    new = shared.session_header(ctx, model=f"replay of {source}", endpoint="none (replay)",
                                sampling={}, system_prompt=header.get("system_prompt", ""),
                                replay_of=str(source))
    return TranscriptWriter.create(default_path(ctx.workspace.transcripts_dir, "replay"), new)


@app.command()
def demo(
    folder: Annotated[
        Path, typer.Option(help="Where the demo writes its model, photos and workspace.")
    ] = Path("booth-demo"),
) -> None:
    """Run the whole pipeline offline in about a minute, on a tiny model.

    It builds a tiny random Stable Diffusion and synthetic photos, then replays the shipped
    session in transcripts/demo.jsonl through the real agent loop (no LLM is contacted).
    """
    from booth import demo as demo_files
    from booth.agent import replay as replays
    from booth.tools import ToolContext

    transcript = demo_files.shipped_transcript()
    if not transcript.is_file():
        raise fail(f"the demo transcript is missing ({transcript}); reinstall booth")
    ui = _ui()
    if GLOBALS.workspace or GLOBALS.base_model:
        # The demo empties its workspace first: it must never be one the user named.
        ui.info("the demo uses its own workspace and tiny model under --folder; "
                "--workspace and --base-model are not used")
    ui.info(f"building a tiny random Stable Diffusion and 5 synthetic photos in {folder}/ ...")
    folder = folder.resolve()
    model, workspace = demo_files.prepare_demo_folder(folder)
    demo_files.enter(folder)
    context = ToolContext.from_options(workspace=str(workspace), base_model=str(model))
    ui.info(f"replaying {transcript.name} with --execute --yes (no LLM is contacted)")
    policy = shared.choose_policy(ui, yes=True, interactive=False)
    report = replays.execute(transcript, context, policy, ui)
    replays.summarise(ui, report)
    samples = [c.result for c in report.comparisons if c.tool == "sample" and c.result]
    if not samples:
        raise fail("the demo ended without sample images; see the messages above", code=1)
    ui.console.print("\n[bold]Sample images:[/]")
    for path in samples[-1]["images"] + [samples[-1]["grid"]]:
        ui.console.print(f"  {path}", highlight=False, soft_wrap=True)  # whole, to copy


def _ui():
    from rich.console import Console

    from booth.agent.ui import ChatUI

    return ChatUI(Console(highlight=False))
