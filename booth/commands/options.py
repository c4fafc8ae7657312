"""What every command shares: the global options, the tool context they build, the error exit.

`--workspace/-w` and `--base-model` work before or after any command. Before it, they are
the main callback's options (which also read the environment); after it, `add_commands`
gives every command the same two options through `with_global_options`, so a command written
tomorrow gets them without listing them. A value given after the command wins over one
given before it, as the later word on a command line usually does.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Annotated

import typer

GLOBAL_PANEL = "Global options (before or after the command)"


@dataclass
class GlobalOptions:
    """The global options of this invocation; the main callback resets them each time."""

    workspace: str | None = None
    base_model: str | None = None
    eval_models: str | None = None


GLOBALS = GlobalOptions()


def _option(name: str, *, envvar: bool):
    """The typer.Option of one global option; the environment is read before the command
    only, so that `BOOTH_WORKSPACE=a booth -w b chat` keeps b."""
    decls, help_text, env, default = {
        "workspace": (("--workspace", "-w"),
                      "Folder for datasets, priors, runs, samples and transcripts.",
                      "BOOTH_WORKSPACE", "./booth-workspace"),
        "base_model": (("--base-model",),
                       "Base Stable Diffusion 1.x: a local diffusers folder or a hub id.",
                       "BOOTH_BASE_MODEL", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "eval_models": (("--eval-models",),
                        "Folder with clip/ and dino/ models that sample scores images with.",
                        "BOOTH_EVAL_MODELS", "evaluators/ in the base model folder, or the "
                        "hub cache"),
    }[name]
    if envvar:
        return typer.Option(*decls, envvar=env, help=help_text, show_default=default)
    return typer.Option(*decls, help=f"{help_text} \\[env: {env}]", show_default=default,
                        rich_help_panel=GLOBAL_PANEL)


WorkspaceOption = Annotated[str | None, _option("workspace", envvar=True)]
BaseModelOption = Annotated[str | None, _option("base_model", envvar=True)]
EvalModelsOption = Annotated[str | None, _option("eval_models", envvar=True)]
_AFTER_COMMAND = {field.name: Annotated[str | None, _option(field.name, envvar=False)]
                  for field in fields(GlobalOptions)}


def with_global_options(command):
    """`command` with the global options added to its signature: typer offers them after the
    command name, and any value given there replaces the one given before it."""
    signature = inspect.signature(command, eval_str=True)
    clash = set(_AFTER_COMMAND) & set(signature.parameters)
    if clash:
        raise TypeError(f"{command.__name__} declares global option(s) {sorted(clash)}")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        for name in _AFTER_COMMAND:
            value = kwargs.pop(name, None)
            if value is not None:
                setattr(GLOBALS, name, value)
        return command(*args, **kwargs)

    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=annotation)
             for name, annotation in _AFTER_COMMAND.items()]
    wrapper.__signature__ = signature.replace(
        parameters=[*signature.parameters.values(), *extra])
    wrapper.__annotations__ = {**command.__annotations__, **_AFTER_COMMAND}
    return wrapper


def add_commands(app: typer.Typer, group: typer.Typer) -> None:
    """Register the commands of one command module's Typer on the main app, each with the
    global options and with flags shown as flags."""
    from typer.core import TyperCommand

    from booth.commands.help import FlagsCommand

    for info in group.registered_commands:
        info.callback = with_global_options(info.callback)
        if info.cls in (None, TyperCommand):  # a command's own class is left alone
            info.cls = FlagsCommand
        app.registered_commands.append(info)


def tool_context():
    """The ToolContext for this invocation (workspace, base model and evaluator models from the
    global options)."""
    from booth.tools import ToolContext

    return ToolContext.from_options(workspace=GLOBALS.workspace, base_model=GLOBALS.base_model,
                                    eval_models=GLOBALS.eval_models)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error to stderr and return the Exit to raise."""
    from rich.console import Console
    from rich.markup import escape

    # Soft-wrapped: the terminal wraps it, so a path in it stays whole when copied.
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                               soft_wrap=True)
    return typer.Exit(code)
