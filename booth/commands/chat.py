"""`booth chat`: a goal in plain language, the model plans it and calls the tools, asking first.

Kept light at import: everything heavy is imported inside the command body.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from booth.agent.settings import EndpointSettings
from booth.commands import session as shared
from booth.commands.options import fail, tool_context

app = typer.Typer()

_ENDPOINT = "Endpoint"
_SAMPLING = "Sampling"
_SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "frequency_penalty",
                    "presence_penalty", "repetition_penalty", "stream", "context_window")
_END_WORDS = ("", "/exit", "/quit")
_DEFAULTS = {f.name: f.default for f in fields(EndpointSettings)}


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
        help="Tokens the server accepts; older tool outputs are shortened to fit "
        "\\[default: the provider's]", rich_help_panel=_ENDPOINT)] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds to wait for a byte from the server before giving up",
        show_default=f"{_DEFAULTS['timeout']:g}", rich_help_panel=_ENDPOINT)] = None,
    first_token_timeout: Annotated[float | None, typer.Option(
        help="Seconds, all retries together, to wait for an answer to begin (a whole answer "
        "with --no-stream) before booth says the endpoint hangs",
        show_default=f"{_DEFAULTS['first_token_timeout']:g}", rich_help_panel=_ENDPOINT)] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Randomness of the answers: low keeps tool calls precise (the default is "
        "Mistral's advice for Small 3.2)", show_default=f"{_DEFAULTS['temperature']:g}",
        rich_help_panel=_SAMPLING)] = None,
    top_p: Annotated[float | None, typer.Option(
        help="Nucleus sampling: draw only from the likeliest tokens that add up to this "
        "probability \\[default: the server's]", rich_help_panel=_SAMPLING)] = None,
    max_tokens: Annotated[int | None, typer.Option(
        help="Longest answer, in tokens \\[default: the server's]",
        rich_help_panel=_SAMPLING)] = None,
    frequency_penalty: Annotated[float | None, typer.Option(
        help="Penalise tokens by how often they already appeared, against repetition "
        "\\[default: the server's]", rich_help_panel=_SAMPLING)] = None,
    presence_penalty: Annotated[float | None, typer.Option(
        help="Penalise tokens that appeared at all, towards new topics "
        "\\[default: the server's]", rich_help_panel=_SAMPLING)] = None,
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
    share_gpu: Annotated[str, typer.Option(
        envvar="BOOTH_SHARE_GPU", help="Free the LLM server's GPU memory while a GPU tool "
        "runs (vLLM sleep mode, Ollama unload): auto (when training on CUDA with the server "
        "on this machine), always, never")] = "auto",
) -> None:
    """Chat with the model: it plans the DreamBooth work and calls the tools, asking first.

    Example: booth chat "teach the model my dog from ./photos/rex, show him on the moon"
    """
    options = dict(base_url=base_url, model=model, api_key=api_key, provider=provider,
                   context_window=context_window, timeout=timeout,
                   first_token_timeout=first_token_timeout, temperature=temperature,
                   top_p=top_p, max_tokens=max_tokens, frequency_penalty=frequency_penalty,
                   presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
                   stream=False if no_stream else None)
    from booth.agent.gpu_share import MODES

    if share_gpu not in MODES:
        raise fail(f"--share-gpu must be one of {', '.join(MODES)}, not {share_gpu!r}", 2)
    code = run_chat(tool_context(), goal, options, yes=yes, transcript=transcript,
                    resume=resume, share_gpu=share_gpu)
    if code:
        raise typer.Exit(code)


def run_chat(ctx, goal: str | None, options: dict, *, yes: bool,
             transcript: Path | None, resume: Path | None, share_gpu: str = "auto") -> int:
    """The body of `booth chat`; returns the exit code (non-zero: a one-shot goal failed)."""
    from rich.console import Console

    from booth.agent.endpoint import OpenAIChatModel
    from booth.agent.model import EndpointError
    from booth.agent.settings import resolve_settings
    from booth.agent.ui import ChatUI

    try:
        settings = resolve_settings(**options)
    except EndpointError as error:
        raise fail(str(error), 2) from None
    interactive = shared.stdin_is_tty()
    if goal is None and not interactive:
        goal = sys.stdin.read().strip() if sys.stdin is not None else ""
        if not goal:
            raise fail("no goal: give it as an argument (booth chat \"...\") or on stdin", 2)
    ui = ChatUI(Console(highlight=False), secrets=settings.secrets(),
                errors=Console(stderr=True, highlight=False))
    read = shared.reader(ui)
    policy = shared.choose_policy(ui, yes=yes, interactive=interactive)
    session = _open_session(ctx, settings, OpenAIChatModel(settings), policy, ui, goal,
                            transcript, resume)
    session.gpu_share = _gpu_share(settings, share_gpu, session)
    ui.info(f"model: {settings.describe()}")
    ui.info(f"transcript: {session.transcript.path}")
    if resume is not None:  # where the conversation stands, before it goes on
        from booth.agent.replay import recap

        recap(ui, session.transcript.path)
    def body() -> int:
        ok = session.send(goal) if goal else True
        if interactive:
            _converse(session, read)
        return 0 if ok or interactive else 1

    try:
        return shared.run_to_end(
            body, ui, f"continue with `booth chat --resume {session.transcript.path}`",
            on_terminated=session.record_end)
    finally:
        session.gpu_share.before_model()  # a server left asleep is woken for whoever is next
        session.transcript.close()
        _keep_or_drop(session, resume is not None, ui)


def _gpu_share(settings, mode: str, session):
    from booth.agent.gpu_share import GpuShare

    def on_cuda() -> bool:
        from booth.tools.estimates import device_kind

        return device_kind() == "cuda"

    share = GpuShare(settings, mode, session.notice, on_cuda)
    # The memory plan counts what the server frees while the tool runs.
    session.ctx.server_gives_back = lambda: share.gives_back(session.ctx.used_gpu_memory)
    return share


def _keep_or_drop(session, resumed: bool, ui) -> None:
    """A new transcript that holds no user message (the session ended at its first prompt)
    is only clutter: it is removed. Anything else is kept and named."""
    path = session.transcript.path
    if not resumed and not any(m.get("role") == "user" for m in session.messages):
        path.unlink(missing_ok=True)
        ui.info("nothing was said: no transcript kept")
        return
    ui.info(f"transcript saved: {path}")


def _open_session(ctx, settings, model, policy, ui, goal, transcript, resume):
    """A new session writing a new transcript, or one resumed from `resume`."""
    from booth.agent.loop import Session
    from booth.agent.prompt import build_system_prompt
    from booth.agent.transcript import TranscriptError, TranscriptWriter, default_path

    system_prompt = build_system_prompt(ctx)
    sampling = {name: getattr(settings, name) for name in _SAMPLING_FIELDS}
    header = shared.session_header(ctx, model=settings.model, endpoint=settings.describe(),
                                   sampling=sampling, system_prompt=system_prompt)
    options = dict(ui=ui, context_window=settings.context_window,
                   reserve_tokens=settings.reply_reserve)
    # The key and any user:password of the URL; never the placeholder sent to local servers
    # ("EMPTY"): masking it would hide that word wherever the conversation used it.
    secrets = settings.secrets()
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
