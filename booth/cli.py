"""booth's command line: the main app, its global options, and the command modules.

Each module of booth/commands/ holds one group of commands on its own typer.Typer; they are
added here with the global options (see booth/commands/options.py). Commands are thin: they
parse options and hand over to a layer below, and nothing heavy is imported at module level,
so `booth --help` stays instant.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from booth.commands import chat, doctor, export, ls, replay, tools
from booth.commands.help import FlagsGroup
from booth.commands.options import (
    GLOBALS,
    BaseModelOption,
    EvalModelsOption,
    WorkspaceOption,
    add_commands,
    fail,
)

app = typer.Typer(
    name="booth",
    cls=FlagsGroup,
    help="Describe a DreamBooth goal in plain language; an LLM plans it and runs the tools, "
    "asking before each one.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from booth import __version__

        typer.echo(f"booth {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    workspace: WorkspaceOption = None,
    base_model: BaseModelOption = None,
    eval_models: EvalModelsOption = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print booth's version and exit.")] = False,
) -> None:
    from booth.threads import ThreadSettingError, configure_threads

    # Before anything imports torch: OpenMP reads its settings once (see booth/threads.py).
    try:
        configure_threads()
    except ThreadSettingError as error:
        raise fail(str(error), 2) from None
    # Reset on every invocation: the options given after the command name override these.
    GLOBALS.workspace = workspace
    GLOBALS.base_model = base_model
    GLOBALS.eval_models = eval_models


for _module in (chat, replay, ls, export, tools, doctor):
    add_commands(app, _module.app)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
