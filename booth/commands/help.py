"""How booth's help pages look: a flag takes no value, so it shows no value type.

typer labels every option with its type (`<bool>` included, even on `--help`), which reads as
if `--yes` wanted a value after it.
"""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup


def _flags_without_type(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class FlagsCommand(TyperCommand):
    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


class FlagsGroup(TyperGroup):
    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))
