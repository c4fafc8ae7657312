"""The agent's commands (chat, replay, demo), registered on the main Typer app by booth.cli.

Kept light at import: everything heavy is imported inside the command bodies.
"""

from __future__ import annotations


def register(app, tool_context, fail) -> None:
    """Add the agent's commands to `app`.

    `tool_context()` builds the ToolContext from the global options; `fail(message, code)`
    prints a user-facing error and returns the typer.Exit to raise.
    """
