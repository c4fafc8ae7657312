"""The agent's commands (chat, replay, demo), registered on the main Typer app by booth.cli.

Kept light at import: everything heavy is imported inside the command bodies.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

_ENDPOINT = "Endpoint"
_SAMPLING = "Sampling"
_SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "frequency_penalty",
                    "presence_penalty", "repetition_penalty", "stream", "context_window")
_END_WORDS = ("", "/exit", "/quit")


def _stdin_is_tty() -> bool:
    """Whether a person can be asked at the terminal (tests drive prompts by patching this)."""
    return sys.stdin is not None and sys.stdin.isatty()


def register(app, tool_context, fail) -> None:
    """Add the agent's commands to `app`.

    `tool_context()` builds the ToolContext from the global options; `fail(message, code)`
    prints a user-facing error and returns the typer.Exit to raise.
    """

    @app.command()
    def chat(
        goal: Annotated[str | None, typer.Argument(
            help="What you want, in plain language (any language). Without it: read from "
            "stdin when piped, else asked at the prompt.")] = None,
        base_url: Annotated[str | None, typer.Option(
            help="OpenAI-compatible endpoint \\[env: BOOTH_BASE_URL; default: the provider's]",
            rich_help_panel=_ENDPOINT)] = None,
        model: Annotated[str | None, typer.Option(
            help="Model name \\[env: BOOTH_MODEL; default: the provider's]",
            rich_help_panel=_ENDPOINT)] = None,
        api_key: Annotated[str | None, typer.Option(
            help="API key \\[env: BOOTH_API_KEY, or MISTRAL_API_KEY for Mistral's API]; "
            "never written to the transcript", rich_help_panel=_ENDPOINT)] = None,
        provider: Annotated[str | None, typer.Option(
            help="Preset: vllm (default, localhost:8000), ollama, llamacpp, mistral "
            "\\[env: BOOTH_PROVIDER]", rich_help_panel=_ENDPOINT)] = None,
        context_window: Annotated[int | None, typer.Option(
            help="Tokens the server accepts; older tool outputs are shortened to fit",
            rich_help_panel=_ENDPOINT)] = None,
        timeout: Annotated[float | None, typer.Option(
            help="Seconds to wait for the server", rich_help_panel=_ENDPOINT)] = None,
        temperature: Annotated[float | None, typer.Option(
            help="\\[default: 0.15, Mistral's advice]", rich_help_panel=_SAMPLING)] = None,
        top_p: Annotated[float | None, typer.Option(rich_help_panel=_SAMPLING)] = None,
        max_tokens: Annotated[int | None, typer.Option(rich_help_panel=_SAMPLING)] = None,
        frequency_penalty: Annotated[float | None, typer.Option(
            rich_help_panel=_SAMPLING)] = None,
        presence_penalty: Annotated[float | None, typer.Option(
            rich_help_panel=_SAMPLING)] = None,
        repetition_penalty: Annotated[float | None, typer.Option(
            help="vLLM / llama.cpp only", rich_help_panel=_SAMPLING)] = None,
        no_stream: Annotated[bool, typer.Option(
            "--no-stream", help="Wait for whole answers instead of streaming them",
            rich_help_panel=_SAMPLING)] = False,
        yes: Annotated[bool, typer.Option(
            "--yes", "-y", help="Approve every tool call without asking (for scripts)")] = False,
        transcript: Annotated[Path | None, typer.Option(
            help="Where to write the session "
            "\\[default: <workspace>/transcripts/<date>-<goal>.jsonl]")] = None,
        resume: Annotated[Path | None, typer.Option(
            help="Continue the conversation saved in this transcript")] = None,
    ) -> None:
        """Chat with the model: it plans the DreamBooth work and calls the tools, asking first.

        Example: booth chat "teach the model my dog from ./photos/rex, show him on the moon"
        """
        options = dict(base_url=base_url, model=model, api_key=api_key, provider=provider,
                       context_window=context_window, timeout=timeout, temperature=temperature,
                       top_p=top_p, max_tokens=max_tokens, frequency_penalty=frequency_penalty,
                       presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
                       stream=False if no_stream else None)
        code = run_chat(tool_context(), fail, goal, options, yes=yes, transcript=transcript,
                        resume=resume)
        if code:
            raise typer.Exit(code)

    register_replay(app, tool_context, fail)


def run_chat(ctx, fail, goal: str | None, options: dict, *, yes: bool,
             transcript: Path | None, resume: Path | None) -> int:
    """The body of `booth chat`; returns the exit code (non-zero: a one-shot goal failed)."""
    from rich.console import Console

    from booth.agent.approval import AskUser, AutoApprove, RefuseAll
    from booth.agent.endpoint import OpenAIChatModel
    from booth.agent.loop import SessionAborted
    from booth.agent.model import EndpointError
    from booth.agent.settings import resolve_settings
    from booth.agent.ui import ChatUI

    try:
        settings = resolve_settings(**options)
    except EndpointError as error:
        raise fail(str(error), 2) from None
    interactive = _stdin_is_tty()
    if goal is None and not interactive:
        goal = sys.stdin.read().strip() if sys.stdin is not None else ""
        if not goal:
            raise fail("no goal: give it as an argument (booth chat \"...\") or on stdin", 2)
    ui = ChatUI(Console(highlight=False))
    read = _reader(ui)
    policy = (AutoApprove(ui=ui) if yes else AskUser(ui=ui, input=read) if interactive
              else RefuseAll(ui=ui))
    session = _open_session(ctx, fail, settings, OpenAIChatModel(settings), policy, ui, goal,
                            transcript, resume)
    ui.info(f"model: {settings.describe()}")
    ui.info(f"transcript: {session.transcript.path}")
    try:
        ok = session.send(goal) if goal else True
        if interactive:
            _converse(session, read)
    except SessionAborted:
        ui.error("aborted. Finished checkpoints are kept; continue with "
                 f"`booth chat --resume {session.transcript.path}`")
        return 130
    finally:
        session.transcript.close()
        ui.info(f"transcript saved: {session.transcript.path}")
    return 0 if ok or interactive else 1


def _open_session(ctx, fail, settings, model, policy, ui, goal, transcript, resume):
    """A new session writing a new transcript, or one resumed from `resume`."""
    from booth.agent.loop import Session
    from booth.agent.prompt import build_system_prompt
    from booth.agent.replay import session_places
    from booth.agent.settings import LOCAL_KEY
    from booth.agent.transcript import (
        TranscriptError,
        TranscriptWriter,
        default_path,
        make_header,
    )
    from booth.tools import TOOLS

    system_prompt = build_system_prompt(ctx)
    sampling = {name: getattr(settings, name) for name in _SAMPLING_FIELDS}
    header = make_header(model=settings.model, endpoint=settings.describe(), sampling=sampling,
                         tools=[t.openai_spec() for t in TOOLS.values()],
                         system_prompt=system_prompt, **session_places(ctx))
    options = dict(ui=ui, context_window=settings.context_window,
                   reserve_tokens=settings.reply_reserve)
    # Only a real key: the placeholder sent to local servers ("EMPTY") is no secret, and
    # masking it would hide that word wherever the conversation used it.
    secrets = [settings.api_key] if settings.api_key != LOCAL_KEY else []
    try:
        if resume is not None:
            return Session.from_transcript(resume, model, ctx, policy, header=header,
                                           new_path=transcript, secrets=secrets, **options)
        path = transcript or default_path(ctx.workspace.transcripts_dir, goal)
        writer = TranscriptWriter.create(path, header, secrets)
    except (TranscriptError, OSError) as error:
        raise fail(str(error), 2) from None
    # The header keeps the first prompt; each request gets the workspace as it is by then.
    return Session(model, ctx, policy, system_prompt=system_prompt, transcript=writer,
                   live_workspace=True, **options)


def _reader(ui):
    """The prompt function for approvals and chat turns: EOFError at the end of input."""

    def read(prompt: str) -> str:
        ui.end_text()
        return ui.console.input(prompt, markup=False)

    return read


def _converse(session, read) -> None:
    """Keep chatting until an empty line, /exit, Ctrl-D or Ctrl-C at the prompt."""
    session.ui.info("(empty line, /exit or Ctrl-D to end; /retry asks the model again)")
    while True:
        try:
            text = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            session.ui.console.print()  # end the prompt's line
            return
        if text in _END_WORDS:
            return
        if text == "/retry":
            _retry(session)
        else:
            session.send(text)


def _retry(session) -> None:
    """/retry: ask the model again for the last turn (see `Session.retry`)."""
    session.retry()


def register_replay(app, tool_context, fail) -> None:
    """`booth replay PATH [--execute] [--yes]`."""

    @app.command()
    def replay(
        path: Annotated[Path, typer.Argument(help="A transcript (.jsonl) written by booth chat")],
        execute: Annotated[bool, typer.Option(
            "--execute", help="Run the approved tool calls again (no LLM is contacted) and "
            "compare each result with the recorded one; exit 1 if any differs")] = False,
        yes: Annotated[bool, typer.Option(
            "--yes", "-y", help="With --execute: approve every call without asking")] = False,
    ) -> None:
        """Show a saved session as it looked, or re-run its tool calls with --execute."""
        code = run_replay(tool_context(), fail, path, execute=execute, yes=yes)
        if code:
            raise typer.Exit(code)


def run_replay(ctx, fail, path: Path, *, execute: bool, yes: bool) -> int:
    """The body of `booth replay`; returns the exit code."""
    from rich.console import Console

    from booth.agent import replay
    from booth.agent.transcript import TranscriptError
    from booth.agent.ui import ChatUI

    ui = ChatUI(Console(highlight=False))
    try:
        if not execute:
            replay.show(path, ui)
            return 0
        report = replay.execute(path, ctx, _policy(ui, yes), ui, _replay_writer(ctx, path))
    except (TranscriptError, OSError) as error:
        raise fail(str(error), 2) from None
    replay.summarise(ui, report)
    return 0 if report.all_match else 1


def _policy(ui, yes: bool):
    from booth.agent.approval import AskUser, AutoApprove, RefuseAll

    if yes:
        return AutoApprove(ui=ui)
    return AskUser(ui=ui, input=_reader(ui)) if _stdin_is_tty() else RefuseAll(ui=ui)


def _replay_writer(ctx, source: Path):
    """The replay is itself a session: record it beside the others."""
    from booth.agent.replay import session_places
    from booth.agent.transcript import TranscriptWriter, default_path, make_header, read_transcript
    from booth.tools import TOOLS

    header, _ = read_transcript(source)
    new = make_header(model=f"replay of {source}", endpoint="none (replay)", sampling={},
                      tools=[t.openai_spec() for t in TOOLS.values()],
                      system_prompt=header.get("system_prompt", ""), replay_of=str(source),
                      **session_places(ctx))
    return TranscriptWriter.create(default_path(ctx.workspace.transcripts_dir, "replay"), new)
