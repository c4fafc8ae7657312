"""Approval of tool calls: a policy object outside the loop.

The loop asks `policy.decide(tool, call_id, arguments, ctx)` before running any call whose
arguments already passed the schema, and gets a `Decision`. Three policies:

- `AutoApprove` (`--yes`): runs everything, still showing each call;
- `RefuseAll(reason)`: nobody can be asked (no terminal, no `--yes`), so nothing runs and the
  turn ends at the first call (asking the model again could only get refused again);
- `AskUser(ui, input)`: the person answers y / n / e / a at the terminal. Ctrl-C there
  (KeyboardInterrupt) ends the turn and Ctrl-D (EOFError) the session, as at the chat
  prompt: both pass through to the loop.

The input function is injectable so tests (and typer's CliRunner) can drive the prompts.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from booth.agent.ui import ChatUI

NO_TERMINAL = (
    "no terminal to ask for approval; rerun with --yes to approve tool calls automatically"
)
_CHOICES = "[y] run · [n] refuse · [e] edit arguments · [a] always run this tool: "


@dataclass
class Decision:
    action: str  # "run" | "refuse"
    arguments: dict[str, Any]  # what will run: the model's, or the user's edit
    reason: str | None = None  # why it was refused (sent to the model), or how it was approved
    edited: bool = False
    always: bool = False
    end_turn: bool = False  # refused, and asking the model again is pointless: stop the turn

    @property
    def label(self) -> str:
        """The decision as recorded in the transcript."""
        if self.action != "run":
            return "refused"
        return "always" if self.always else "edited" if self.edited else "approved"


def cost_line(tool, ctx, arguments: dict, plan=None) -> str | None:
    """The tool's own estimate of what the call costs (time, and GPU memory where it plans
    it: `plan`, or the tool's), or None; never fails the approval."""
    parts = [_courtesy(tool.estimate, ctx, arguments)]
    plan = plan or memory_plan(tool, ctx, arguments)
    parts.append(plan.words() if plan else None)
    return "; ".join(p for p in parts if p) or None


def memory_plan(tool, ctx, arguments: dict):
    """The tool's memory plan (booth.tools.memory.Plan) for this call, or None."""
    return _courtesy(tool.memory_plan, ctx, arguments)


def _courtesy(estimate, ctx, arguments: dict):
    if estimate is None:
        return None
    try:
        return estimate(ctx, arguments)
    except Exception:  # an estimate is a courtesy: a bug in one must not block the call
        return None


def show_call(ui: ChatUI, tool, arguments: dict, cost: str | None,
              title: str = "tool call") -> None:
    """The call's panel, its arguments in the schema's order with defaults marked; settings
    the model is not shown appear only when they differ from their defaults."""
    order = list(tool.parameters.get("properties", {}))
    quiet = set(order) - set(tool.model_sees)
    ui.tool_call(tool.name, arguments, tool.defaults, cost, title=title, order=order,
                 quiet=quiet)


class AutoApprove:
    """`--yes`: every valid call runs; each is still shown so the user sees what happened."""

    def __init__(self, console: Console | None = None, ui: ChatUI | None = None):
        self.ui = ui or ChatUI(console)

    def decide(self, tool, call_id: str, arguments: dict, ctx) -> Decision:
        plan = memory_plan(tool, ctx, arguments)
        show_call(self.ui, tool, arguments, cost_line(tool, ctx, arguments, plan))
        if plan is not None and not plan.fits:  # nobody to decide: do not start what must fail
            reason = f"not run: it {plan.words()}; call it again with those settings"
            self.ui.refused(tool.name, reason)
            return Decision("refuse", arguments, reason=reason)
        self.ui.info("approved automatically (--yes)")
        return Decision("run", arguments, reason="--yes")


class RefuseAll:
    """Nobody to ask: every call is refused with `reason`, which the model is told."""

    def __init__(self, reason: str = NO_TERMINAL, console: Console | None = None,
                 ui: ChatUI | None = None):
        self.reason = reason
        self.ui = ui or ChatUI(console)

    def decide(self, tool, call_id: str, arguments: dict, ctx) -> Decision:
        show_call(self.ui, tool, arguments, cost_line(tool, ctx, arguments))
        self.ui.refused(tool.name, self.reason)
        return Decision("refuse", arguments, reason=self.reason, end_turn=True)


class AskUser:
    """Ask the person at the terminal. `input(prompt) -> str` raises EOFError at end of input."""

    def __init__(self, console: Console | None = None,
                 input: Callable[[str], str] | None = None, ui: ChatUI | None = None):
        self.ui = ui or ChatUI(console)
        self.input = input
        self.always: set[str] = set()  # tools the user chose to always run this session

    def _ask(self, prompt: str) -> str:
        read = self.input or (lambda text: self.ui.console.input(text, markup=False))
        return read(prompt).strip()

    def decide(self, tool, call_id: str, arguments: dict, ctx) -> Decision:
        plan = memory_plan(tool, ctx, arguments)
        show_call(self.ui, tool, arguments, cost_line(tool, ctx, arguments, plan))
        if plan is not None and not plan.fits:
            self.ui.notice("This will probably run out of GPU memory (see the cost line); "
                           "you may edit the arguments (e) or run it anyway.")
        if tool.name in self.always:
            self.ui.info(f"approved: you chose to always run {tool.name} in this session")
            return Decision("run", arguments, reason="always (chosen earlier in this session)")
        return self._menu(tool, arguments, ctx)

    def _menu(self, tool, arguments: dict, ctx) -> Decision:
        edited = False
        while True:
            answer = self._ask(_CHOICES).lower()
            if answer in ("y", "yes"):
                return Decision("run", arguments, edited=edited)
            if answer in ("a", "always"):
                self.always.add(tool.name)
                return Decision("run", arguments, edited=edited, always=True)
            if answer in ("n", "no"):
                reason = self._ask("reason (optional, the model reads it): ") or None
                self.ui.refused(tool.name, reason)
                return Decision("refuse", arguments, reason=reason, edited=edited)
            if answer in ("e", "edit"):
                new = self._edit(tool, arguments)
                if new is not None:
                    arguments, edited = new, True
                    show_call(self.ui, tool, arguments, cost_line(tool, ctx, arguments),
                              title="edited call")
                continue
            self.ui.info("please answer y, n, e or a")

    def _edit(self, tool, arguments: dict) -> dict | None:
        """Ask for changes until they validate; an empty line keeps the arguments as they were."""
        from booth.tools import ToolArgumentError

        while True:
            text = self._ask("changes (key=value ... or a JSON object; empty line to cancel): ")
            if not text:
                return None
            try:
                return tool.validate({**arguments, **parse_edit(text, tool.parameters)})
            except ToolArgumentError as error:
                self.ui.error(f"{error} — try again")


def parse_edit(text: str, parameters: dict | None = None) -> dict[str, Any]:
    """The user's edit: a JSON object, or key=value words (values read as JSON when they can be).

    `steps=400 prompt="a photo of sks dog"` -> {"steps": 400, "prompt": "a photo of sks dog"}
    """
    from booth.tools import ToolArgumentError
    from booth.tools.registry import parse_words

    if text.lstrip().startswith("{"):
        return parse_words([text])
    try:
        return parse_words(shlex.split(text), parameters)
    except ValueError as error:  # shlex: an unclosed quote
        raise ToolArgumentError(f"cannot read the changes: {error}") from None
