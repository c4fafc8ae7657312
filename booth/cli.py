"""booth's command line. Commands are thin: they parse options and hand over to a layer below.

Nothing heavy is imported at module level, so `booth --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from booth.agent import commands as agent_commands

app = typer.Typer(
    name="booth",
    help="Describe a DreamBooth goal in plain language; an LLM plans it and runs the tools, "
    "asking before each one.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Globals:
    """Options given before the command (`booth --workspace W call ...`)."""

    workspace: str | None = None
    base_model: str | None = None


@app.callback()
def main(
    workspace: Annotated[
        str | None,
        typer.Option(
            "--workspace",
            "-w",
            envvar="BOOTH_WORKSPACE",
            help="Folder for datasets, priors, runs, samples and transcripts.",
            show_default="./booth-workspace",
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            envvar="BOOTH_BASE_MODEL",
            help="Base Stable Diffusion 1.x: a local diffusers folder or a hub id.",
            show_default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
    ] = None,
) -> None:
    Globals.workspace = workspace
    Globals.base_model = base_model


def tool_context():
    """The ToolContext for this invocation (workspace and base model from the global options)."""
    from booth.tools import ToolContext

    return ToolContext.from_options(workspace=Globals.workspace, base_model=Globals.base_model)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error to stderr and return the Exit to raise."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@app.command("tiny-model")
def tiny_model(
    folder: Annotated[Path, typer.Argument(help="Where to write the pipeline folder.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny random Stable Diffusion 1.x (diffusers format, ~9 MB) for offline trials."""
    from booth.dreambooth.tiny import save_tiny_model

    if folder.exists() and any(folder.iterdir()):
        raise fail(f"{folder} exists and is not empty; choose a new folder")
    path = save_tiny_model(folder, seed=seed)
    typer.echo(str(path.resolve()))


@app.command("tools")
def list_tools(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the exact tool schemas sent to the model.")
    ] = False,
) -> None:
    """List the tools the model can call (and that `booth call` runs)."""
    from booth.tools import TOOLS

    if as_json:
        typer.echo(json.dumps([t.openai_spec() for t in TOOLS.values()], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("tool", "parameters (* = required)", "what it does", show_lines=True)
    for spec in TOOLS.values():
        required = set(spec.parameters["required"])
        names = spec.parameters["properties"]
        params = ", ".join(p + ("*" if p in required else "") for p in names)
        table.add_row(spec.name, params, spec.description.splitlines()[0])
    Console().print(table)


@app.command("call")
def call_tool(
    name: Annotated[str, typer.Argument(help="Tool name (see `booth tools`).")],
    arguments: Annotated[
        list[str] | None,
        typer.Argument(
            help="A JSON object ('{\"dataset\": \"rex\"}'), or key=value pairs "
            "(values read as JSON when they parse, else as text).",
        ),
    ] = None,
) -> None:
    """Run one tool directly, validated exactly as a model's call would be.

    The tool's JSON result is the only thing written to stdout; progress goes to stderr.
    """
    from booth.tools import ToolArgumentError, ToolError, get_tool
    from booth.tools.registry import parse_words

    context = tool_context()
    try:
        spec = get_tool(name)
        parsed = parse_words(arguments or [], spec.parameters)
        with context.interruptible():
            result = spec.run(context, parsed)
    except ToolError as error:
        # 2: the call was invalid and nothing ran; 1: the tool ran and failed.
        raise fail(str(error), code=2 if isinstance(error, ToolArgumentError) else 1) from None
    except KeyboardInterrupt:  # the second Ctrl-C
        raise fail("aborted; finished checkpoints are kept and resumable", code=130) from None
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, every process ran it
        typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def demo(
    folder: Annotated[
        Path, typer.Option(help="Where the demo writes its model, photos and workspace.")
    ] = Path("booth-demo"),
) -> None:
    """The whole pipeline offline in about a minute: a tiny model, synthetic photos, and the
    shipped session in transcripts/demo.jsonl replayed through the real agent loop."""
    from rich.console import Console

    from booth import demo as demo_files
    from booth.agent import replay
    from booth.agent.approval import AutoApprove
    from booth.agent.ui import ChatUI
    from booth.tools import ToolContext

    transcript = demo_files.shipped_transcript()
    if not transcript.is_file():
        raise fail(f"the demo transcript is missing ({transcript}); reinstall booth")
    ui = ChatUI(Console(highlight=False))
    ui.info(f"building a tiny random Stable Diffusion and 5 synthetic photos in {folder}/ ...")
    folder = folder.resolve()
    model, workspace = demo_files.prepare_demo_folder(folder)
    demo_files.enter(folder)
    context = ToolContext.from_options(workspace=str(workspace), base_model=str(model))
    ui.info(f"replaying {transcript.name} with --execute --yes (no LLM is contacted)")
    report = replay.execute(transcript, context, AutoApprove(ui=ui), ui)
    replay.summarise(ui, report)
    samples = [c.result for c in report.comparisons if c.tool == "sample" and c.result]
    if not samples:
        raise fail("the demo ended without sample images; see the messages above", code=1)
    ui.console.print("\n[bold]Sample images:[/]")
    for path in samples[-1]["images"] + [samples[-1]["grid"]]:
        ui.console.print(f"  {path}", highlight=False, soft_wrap=True)  # whole, to copy


agent_commands.register(app, tool_context, fail)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
