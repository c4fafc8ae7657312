"""Terminal rendering of a chat session (rich): streamed text, tool calls, results, errors.

The loop and the approval policies only call these methods, so replay can show a session
exactly as the live chat did, and tests can capture it with `Console(file=StringIO())`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Collection
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_VALUE_WIDTH = 90
_WHOLE = 400  # characters up to which a result's value is shown whole
_PIPE_STATUS_EVERY = 15.0  # seconds between waiting lines when the console is no terminal


def _short(value: Any, width: int = _VALUE_WIDTH) -> str:
    """A value on one line, cut at `width` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _headline(name: str, result: Any, seconds: float) -> str:
    """'✓ train done in 3.1 s', or for a tool stopped at a safe point 'train stopped at step
    14 (checkpoint-14) after 3.1 s'."""
    if not (isinstance(result, dict) and result.get("status") == "interrupted"):
        return f"[green]✓ {escape(name)}[/] done in {seconds:.1f} s"
    where = ""
    if isinstance(result.get("steps"), int):
        where = f" at step {result['steps']}"
        checkpoints = result.get("checkpoints") or []
        if checkpoints and checkpoints[-1] == f"checkpoint-{result['steps']}":
            where += f" ({checkpoints[-1]})"
    return f"[yellow]■ {escape(name)} stopped{escape(where)}[/] after {seconds:.1f} s"


def arguments_table(arguments: dict, defaults: dict | None = None,
                    order: list[str] | None = None, quiet: Collection[str] = ()) -> Table:
    """The arguments of a call: what the model chose, one per row, then the values left at
    the tool's defaults folded into one dim row (train has a dozen of them). Of the `quiet`
    ones (settings the model is not shown) only those that differ from their default are
    named; the others are counted."""
    defaults = defaults or {}
    if order:  # the schema's order reads better than defaults-first
        arguments = {**{k: arguments[k] for k in order if k in arguments}, **arguments}
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("argument", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    left_at_default, unnamed = [], 0
    for key, value in arguments.items():
        if key in defaults and defaults[key] == value:
            if key in quiet:
                unnamed += 1
            else:
                left_at_default.append(f"{key} {_short(value, 40)}")
        else:
            table.add_row(Text(key), Text(_short(value, 200)))  # the model's text, not markup
    if unnamed:
        left_at_default.append(f"and {unnamed} more settings")
    if left_at_default:
        table.add_row("defaults", Text(" · ".join(left_at_default), style="dim"))
    if not arguments:
        table.add_row("(none)", "")
    return table


# Messages are printed soft-wrapped: the terminal wraps them, so a path in one stays whole
# when copied (rich would break it at its own width).


class ChatUI:
    """Everything the user sees of the agent, printed through one rich console."""

    def __init__(self, console: Console | None = None, secrets: list[str] | None = None,
                 errors: Console | None = None):
        self.console = console or Console(highlight=False)
        # Errors may go elsewhere (stderr in `booth chat`); by default beside the rest.
        self.errors = errors or self.console
        if secrets:
            self.hide(secrets)
        self._streaming = False
        self._status = None  # the live waiting line on a terminal
        self._status_printed: float | None = None  # when a pipe last got a waiting line
        self._lock = threading.Lock()  # the endpoint reports waits from a background thread

    def hide(self, secrets: list[str]) -> None:
        """Mask `secrets` (e.g. `EndpointSettings.secrets()`) in everything this console
        prints, whoever prints it (approval prompts share the console)."""
        from booth.agent.masking import MaskingFile

        if [s for s in secrets if s]:
            for console in {id(c): c for c in (self.console, self.errors)}.values():
                console.file = MaskingFile(console.file, secrets)

    # -- waiting for the model --------------------------------------------------------------
    def status(self, text: str | None, lasting: bool = False) -> None:
        """What booth waits for. A ticking wait ("waiting for the model… 20 s") is one live
        line on a terminal and an occasional line in a pipe; a `lasting` one (a retry) is
        printed; None clears the live line."""
        with self._lock:
            if text is None or lasting:
                if self._status is not None:
                    self._status.stop()
                    self._status = None
                self._status_printed = None if text is None else self._status_printed
            if text is None:
                return
            if lasting:
                self.end_text()
                self.console.print(f"[yellow]{escape(text)}[/]", highlight=False, soft_wrap=True)
            elif self.console.is_terminal:
                if self._status is None:
                    self._status = self.console.status(escape(text))
                    self._status.start()
                else:
                    self._status.update(escape(text))
            else:
                now = time.monotonic()
                if self._status_printed is None or now - self._status_printed >= \
                        _PIPE_STATUS_EVERY:
                    self._status_printed = now
                    self.end_text()
                    self.console.print(f"[dim]{escape(text)}[/]", highlight=False, soft_wrap=True)

    # -- assistant text -------------------------------------------------------------------
    def text(self, chunk: str) -> None:
        """One streamed chunk of assistant text, printed as it arrives."""
        if not self._streaming:
            self.console.print()
            self._streaming = True
        self.console.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)

    def end_text(self) -> None:
        """The assistant turn is over: close the streamed line."""
        if self._streaming:
            self.console.print()
            self._streaming = False

    # -- tool calls -----------------------------------------------------------------------
    def tool_call(self, name: str, arguments: dict, defaults: dict | None = None,
                  cost: str | None = None, title: str = "tool call",
                  order: list[str] | None = None, quiet: Collection[str] = ()) -> None:
        """The call about to be approved or run: tool name, arguments table (in the schema's
        `order`, defaults marked, `quiet` defaults counted), cost line."""
        self.end_text()
        parts: list[Any] = [arguments_table(arguments, defaults, order, quiet)]
        if cost:
            parts.append(Text(f"cost: {cost}", style="yellow"))
        self.console.print(
            Panel(Group(*parts), title=f"[bold]{escape(title)}: {escape(name)}[/]",
                  title_align="left", border_style="cyan", expand=False)
        )

    def tool_result(self, name: str, result: Any, seconds: float) -> None:
        """A finished call's JSON result: one line per field, lists item by item (the paths
        of sampled images matter to the user). Text (hints, paths) is printed whole and left
        to the terminal to wrap, so it can be copied; only structured values are cut to fit.
        A tool that stopped early says where, instead of "done"."""
        self.console.print(_headline(name, result, seconds), highlight=False)
        if not isinstance(result, dict):
            return
        for key, value in list(result.items())[:12]:
            if isinstance(value, list) and value:
                self._line(f"  [dim]{escape(key)}:[/] {len(value)} item(s)")
                for item in value[:4]:
                    self._field("    - ", item)
                if len(value) > 4:
                    self._line(f"    [dim]… and {len(value) - 4} more[/]")
            else:
                self._field(f"  [dim]{escape(key)}:[/] ", value)

    def _field(self, label: str, value: Any) -> None:
        text = value if isinstance(value, str) else _short(value, _WHOLE)
        if isinstance(value, str) or len(text) <= _WHOLE:  # hints, paths, a rejection: whole
            self.console.print(label + escape(text), highlight=False, soft_wrap=True)
        else:
            self._line(label + escape(_short(value)))

    def _line(self, markup: str) -> None:
        self.console.print(markup, highlight=False, no_wrap=True, overflow="ellipsis")

    def tool_error(self, name: str, message: str) -> None:
        self.console.print(f"[red]✗ {escape(name)}: {escape(message)}[/]", highlight=False,
                           soft_wrap=True)

    def invalid_call(self, name: str, message: str) -> None:
        """A call that failed validation: nothing ran; the model is told why."""
        self.end_text()
        self.console.print(
            f"[red]✗ invalid call to {escape(name or '(no name)')}: {escape(message)}[/] "
            "[dim](nothing ran; the model was told)[/]",
            highlight=False, soft_wrap=True,
        )

    def refused(self, name: str, reason: str | None) -> None:
        extra = f": {escape(reason)}" if reason else ""
        self.console.print(f"[yellow]refused {escape(name)}{extra}[/]", highlight=False,
                           soft_wrap=True)

    # -- the session ----------------------------------------------------------------------
    def error(self, message: str) -> None:
        self.end_text()
        self.errors.print(f"[bold red]error:[/] [red]{escape(message)}[/]", highlight=False,
                          soft_wrap=True)

    def notice(self, message: str) -> None:
        self.end_text()
        self.console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        self.console.print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)
