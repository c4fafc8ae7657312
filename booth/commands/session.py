"""What chat, replay and demo share: who approves the calls, and the transcript's header."""

from __future__ import annotations

import sys


def stdin_is_tty() -> bool:
    """Whether a person can be asked at the terminal (tests drive prompts by patching this)."""
    return sys.stdin is not None and sys.stdin.isatty()


def reader(ui):
    """The prompt function for approvals and chat turns: EOFError at the end of input."""

    def read(prompt: str) -> str:
        ui.end_text()
        return ui.console.input(prompt, markup=False)

    return read


def choose_policy(ui, *, yes: bool, interactive: bool):
    """--yes approves everything; a terminal asks the person; anything else refuses, saying
    how to approve (a script must never hang on a prompt nobody sees)."""
    from booth.agent.approval import AskUser, AutoApprove, RefuseAll

    if yes:
        return AutoApprove(ui=ui)
    return AskUser(ui=ui, input=reader(ui)) if interactive else RefuseAll(ui=ui)


def session_header(ctx, *, model: str, endpoint: str, sampling: dict, system_prompt: str,
                   **extra) -> dict:
    """The header of a new transcript: the model, the tools offered and where it runs."""
    from booth.agent.replay import session_places
    from booth.agent.transcript import make_header
    from booth.tools import TOOLS

    return make_header(model=model, endpoint=endpoint, sampling=sampling,
                       tools=[t.openai_spec() for t in TOOLS.values()],
                       system_prompt=system_prompt, **session_places(ctx), **extra)


def run_to_end(body, ui, resume_hint: str, on_terminated=None) -> int:
    """Run a session's `body()` (returning its exit code) and turn the ways a session ends
    into exit codes, each said once: Ctrl-D at a prompt (0), a second Ctrl-C (130), SIGTERM or
    SIGHUP (128 + the signal). `on_terminated(text)` records a signal that came while the
    session waited at a prompt (the loop records those that come while it works)."""
    from booth.agent.loop import SessionAborted, SessionEnded
    from booth.commands.options import fail
    from booth.tools import Terminated, terminate_raises

    try:
        with terminate_raises():
            return body()
    except SessionAborted:
        ui.error(f"aborted. Finished checkpoints are kept; {resume_hint}")
        return 130
    except SessionEnded:
        ui.console.print()  # end the prompt's line
        return 0
    except Terminated as ending:
        if on_terminated is not None:
            on_terminated(f"terminated ({ending.signal_name}): the session ends")
        fail(f"terminated ({ending.signal_name}). A running tool stopped at a safe point "
             f"(training saved a checkpoint); {resume_hint}")
        return ending.exit_code
