"""Replaying a saved session: show it as it looked, or run its tool calls again without an LLM.

`execute` drives the very same `Session` loop as a live chat, with a `ReplayModel` that plays
back the recorded assistant turns. Every call is validated and put to the approval policy
again, so a transcript from elsewhere can run nothing unchecked; calls the user refused in
the recording stay refused, edits are re-applied (and re-validated). Each new result is
compared with the recorded one; a call that ran in the recording but not in the replay
(refused now, invalid now, never reached) counts as a mismatch, so nothing-ran never passes.
Each user message is replayed with only the assistant turns recorded after it, so a user turn
the recording ended early (endpoint error, Ctrl-C, a limit, the file's end) ends early again; a
call the user stopped with Ctrl-C is stopped again at the recorded step (replay_setup.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from booth.agent.approval import Decision, show_call
from booth.agent.model import AssistantTurn, ReplayModel
from booth.agent.replay_compare import Comparison, compare
from booth.agent.replay_setup import RecordedStop, ReplayPlaces, recorded_stops
from booth.agent.transcript import assistant_turns, read_transcript, retracted
from booth.agent.ui import ChatUI
from booth.tools import ToolArgumentError, ToolError

# What a replay prints of one text; the transcript keeps it all. rich's wrapping grows faster
# than linearly with a text's length: a 10 M-character message took 26 s to show, whole.
SHOW_CHARS = 4000
RECAP_CHARS = 600  # a recap of the conversation before `chat --resume` goes on


@dataclass
class ReplayReport:
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def all_match(self) -> bool:
        return all(c.matches for c in self.comparisons)

    @property
    def not_run(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.not_run]


@dataclass
class UserTurn:
    """A recorded user message and the assistant turns that answered it."""

    text: str
    turns: list[AssistantTurn]
    ended: str | None = None  # why the recorded turn stopped before a final answer


def user_turns(events: list[dict]) -> list[UserTurn]:
    """The recorded user messages, each with its own assistant turns (those withdrawn by
    /retry left out) and, when it ended early, the reason."""
    return [UserTurn(text, assistant_turns(group), _ending(group))
            for text, group in _user_groups(events)]


def _user_groups(events: list[dict]) -> list[tuple[str, list[dict]]]:
    """(user message, the events after it up to the next one), /retry's withdrawals left out."""
    gone = retracted(events)
    groups: list[tuple[str, list[dict]]] = []
    for index, event in enumerate(events):
        if event["type"] == "user" and index not in gone:
            groups.append((event["message"]["content"], []))
        elif groups and index not in gone and event["type"] != "retracted":
            groups[-1][1].append(event)
    return groups


def _ending(group: list[dict]) -> str | None:
    """What ended a user turn after its last assistant turn (None: it ended normally)."""
    last = max((i for i, e in enumerate(group) if e["type"] == "assistant"), default=-1)
    for event in reversed(group[last + 1 :]):
        if event["type"] == "endpoint_error":
            return "endpoint error: " + _first_line(event["error"])
        if event["type"] in ("notice", "interrupted"):
            return _first_line(event["text"])
    if last >= 0 and group[last]["tool_calls"]:  # the model was still at work
        if any(e["type"] == "resumed" for e in group[last + 1 :]):
            return "the session stopped here and was resumed later"
        return "the transcript ends before the model's next answer"
    return None


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().split("\n")[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


class RecordedDecisions:
    """Approval for a replay: the recording's refusals and edits stand, then the live policy
    (ask / --yes) decides."""

    def __init__(self, policy, approvals: dict[str, dict], ui: ChatUI,
                 stops: dict[str, dict] | None = None):
        self.policy, self.approvals, self.ui = policy, approvals, ui
        self.stops = stops or {}  # call id -> recorded result, for calls stopped part-way
        self.refused: set[str] = set()  # call ids refused in this replay

    def decide(self, tool, call_id: str, arguments: dict, ctx) -> Decision:
        decision = self._decide(tool, call_id, arguments, ctx)
        if decision.action != "run":
            self.refused.add(call_id)
        elif isinstance(ctx.stop_requested, RecordedStop):
            ctx.stop_requested.stop_at(*self._stop_point(tool.name, call_id, ctx))
        return decision

    def _stop_point(self, name: str, call_id: str, ctx) -> tuple:
        """(metrics file, step) where the recording stopped this call; (None,) for none."""
        if call_id not in self.stops:
            return (None,)
        result = self.stops[call_id]
        step, run = result.get("steps"), result.get("run")
        if result.get("status") == "interrupted" and isinstance(step, int) \
                and isinstance(run, str):
            try:
                metrics = ctx.workspace.run_dir(run) / "metrics.jsonl"
            except ToolError:  # a name no workspace accepts: the call fails anyway
                return (None,)
            self.ui.info(f"(the recording stopped this call at step {step}; the replay stops "
                         "it there too)")
            return metrics, step
        self.ui.notice(f"The recording stopped this {name} call part-way; the replay cannot "
                       "stop it at the same point, so it runs to its end.")
        return (None,)

    def _decide(self, tool, call_id: str, arguments: dict, ctx) -> Decision:
        recorded = self.approvals.get(call_id, {})
        if recorded and recorded["decision"] == "refused":
            reason = "refused in the recorded session"
            if recorded.get("reason"):
                reason += f" ({recorded['reason']})"
            show_call(self.ui, tool, arguments, None)
            self.ui.refused(tool.name, reason)
            return Decision("refuse", arguments, reason=reason)
        # A version-1 file may say "edited" in the decision alone (its `edited` was null).
        if recorded.get("edited") or recorded.get("decision") == "edited":
            try:
                arguments = tool.validate(recorded["arguments"])
            except ToolArgumentError as error:
                self.ui.refused(tool.name, f"the recorded edit is invalid: {error}")
                return Decision("refuse", arguments, reason=f"recorded edit invalid: {error}")
            self.ui.info("arguments as edited by the user in the recorded session")
        return self.policy.decide(tool, call_id, arguments, ctx)


def places(header: dict) -> dict[str, str]:
    """Where a session ran (workspace, base model, working folder) -> placeholders, longest
    first, so that a replay elsewhere compares paths relative to those places."""
    named = {header.get(key): f"<{key}>" for key in ("workspace", "base_model", "cwd")}
    return {k: v for k, v in sorted(named.items(), key=lambda kv: -len(kv[0] or "")) if k}


def session_places(ctx) -> dict[str, str]:
    """The header fields that say where a session runs (see `places`)."""
    import os

    return {"workspace": str(ctx.workspace.root), "base_model": ctx.base_model,
            "cwd": os.getcwd()}


def execute(path: str | Path, ctx, policy, ui: ChatUI, transcript=None) -> ReplayReport:
    """Re-run the session at `path` through the real loop; compare each result."""
    from booth.agent.loop import Session

    notices: list[str] = []
    header, events = read_transcript(path, notices)
    for notice in notices:
        ui.notice(notice)
    recorded = {e["call_id"]: e for e in events if e["type"] == "tool_result"}
    approvals = {e["call_id"]: e for e in events if e["type"] == "approval"}
    report = ReplayReport()
    old_places = places(header)
    new_places = places(session_places(ctx))

    def on_result(event: dict) -> None:
        comparison = compare(recorded.get(event["call_id"]), event, old_places, new_places)
        report.comparisons.append(comparison)
        show_comparison(ui, comparison)

    model = ReplayModel([])
    decisions = RecordedDecisions(policy, approvals, ui, recorded_stops(events))
    session = Session(
        model, ctx, decisions, system_prompt=header.get("system_prompt") or "",
        transcript=transcript, ui=ui, on_result=on_result,
    )
    # The stand-in for Ctrl-C, for this replay only (a real Ctrl-C still works through it).
    saved, ctx.stop_requested = ctx.stop_requested, RecordedStop()
    try:
        for turn in user_turns(events):
            show_user(ui, turn.text)
            model.next_user_turn(turn.turns, turn.ended)
            session.send(turn.text)
    finally:
        ctx.stop_requested = saved
    _add_not_run(report, events, decisions.refused)
    return report


def _add_not_run(report: ReplayReport, events: list[dict], refused: set[str]) -> None:
    """A mismatch for each call that ran in the recording but got no result in the replay.

    Only calls the recording approved count: a refused call has no recorded result, and a
    call answered without running (skipped, interrupted before it ran) ran neither time.
    """
    ran = {e["call_id"] for e in events if e["type"] == "approval" and e["decision"] != "refused"}
    seen = {c.call_id for c in report.comparisons}
    for event in events:
        call_id = event.get("call_id")
        if event["type"] != "tool_result" or call_id not in ran or call_id in seen:
            continue
        why = "not run: refused" if call_id in refused else "not run"
        report.comparisons.append(Comparison(call_id, event["tool"], False, [why], not_run=True))
        seen.add(call_id)


def show_comparison(ui: ChatUI, comparison: Comparison) -> None:
    if comparison.matches:
        ui.console.print("  [green]= matches the recorded result[/]", highlight=False)
        return
    ui.console.print("  [yellow]≠ differs from the recorded result:[/]", highlight=False)
    for line in comparison.differences[:8]:
        ui.info(f"    {line}")


def show_user(ui: ChatUI, text: str) -> None:
    ui.end_text()
    ui.console.print()
    ui.console.print("[bold magenta]you>[/] ", end="", highlight=False)
    ui.console.print(shortened(text), markup=False, highlight=False)


def shortened(text: str, limit: int = SHOW_CHARS) -> str:
    """`text` as a replay shows it: its beginning, and how much more the transcript holds."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters in the transcript]"


def show(path: str | Path, ui: ChatUI) -> None:
    """Print a saved session the way the chat showed it (nothing runs)."""
    notices: list[str] = []
    header, events = read_transcript(path, notices)
    ui.info(f"session of {header.get('created', '?')} with {header.get('model', '?')}; "
            f"workspace {header.get('workspace', '?')}")
    for event in events:
        _show_event(ui, event)
    for notice in notices:
        ui.notice(notice)
    ui.end_text()


def recap(ui: ChatUI, path: str | Path, last: int = 3) -> None:
    """The end of a saved conversation, as `chat --resume` shows it before going on: the last
    user messages, each with one line on its tool calls and the model's last answer."""
    _, events = read_transcript(path)
    groups = _user_groups(events)
    if not groups:
        return
    shown = groups[-last:]
    count = f"the last {len(shown)} of {len(groups)}" if len(groups) > last else len(groups)
    ui.info(f"(the conversation so far: {count} turn{'s' if len(groups) > 1 else ''})")
    for text, group in shown:
        show_user(ui, shortened(text, RECAP_CHARS))
        calls = _calls_line(group)
        if calls:
            ui.info(f"  {calls}")
        answers = [e["content"] for e in group
                   if e["type"] == "assistant" and e.get("content") and not e["tool_calls"]]
        if answers:
            ui.text(shortened(answers[-1], RECAP_CHARS))
            ui.end_text()
        ending = _ending(group)
        if ending:
            ui.info(f"  (the turn ended early: {ending})")


def _calls_line(group: list[dict]) -> str:
    """One line on the tool calls of a user turn: 'train stopped at step 3 · sample error'."""
    said = []
    for event in group:
        kind = event["type"]
        if kind == "validation_error":
            said.append(f"{event['tool']} invalid")
        elif kind == "approval" and event["decision"] == "refused":
            said.append(f"{event['tool']} refused")
        elif kind == "tool_result" and not event["ok"]:
            said.append(f"{event['tool']} failed")
        elif kind == "tool_result":
            result = event.get("result")
            if isinstance(result, dict) and result.get("status") == "interrupted":
                step = f" at step {result['steps']}" if "steps" in result else ""
                said.append(f"{event['tool']} stopped{step}")
            else:
                said.append(f"{event['tool']} ok")
    return "tools: " + " · ".join(said) if said else ""


def _show_event(ui: ChatUI, event: dict) -> None:
    kind = event["type"]
    if kind == "user":
        show_user(ui, event["message"]["content"])
    elif kind == "assistant" and event.get("content"):
        ui.text(shortened(event["content"]))
        ui.end_text()
    elif kind == "validation_error":
        ui.invalid_call(event["tool"], shortened(event["error"]))
    elif kind == "approval":
        _show_recorded_call(ui, event["tool"], event["arguments"])
        if event["decision"] == "refused":
            ui.refused(event["tool"], shortened(event.get("reason") or ""))
        else:
            how = f" ({event['reason']})" if event.get("reason") else ""
            ui.info(f"{event['decision']}{how}")
    elif kind == "tool_result":
        if event["ok"]:
            ui.tool_result(event["tool"], event.get("result"), event.get("seconds", 0))
        else:
            ui.tool_error(event["tool"], shortened(event["error"]))
    elif kind == "endpoint_error":
        ui.error(shortened(event["error"]))
    elif kind in ("notice", "interrupted", "retracted"):
        ui.notice(shortened(event["text"]))
    elif kind == "resumed":
        ui.info("(the session was resumed here)")


def _show_recorded_call(ui: ChatUI, name: str, arguments: dict) -> None:
    """As the approval prompt showed it, when the tool still exists; plainly otherwise."""
    from booth.tools import TOOLS

    if name in TOOLS:
        show_call(ui, TOOLS[name], arguments, None)
    else:
        ui.tool_call(name, arguments)


def summarise(ui: ChatUI, report: ReplayReport, places: ReplayPlaces | None = None,
              source: str | Path | None = None) -> None:
    """The closing lines: calls that did not run, then how many results match, then, when
    the replay ran where the recorded session had left its outputs, why that differs."""
    total = len(report.comparisons)
    same = sum(c.matches for c in report.comparisons)
    missing = report.not_run
    if missing:
        ui.console.print("\n[yellow]Recorded calls that did not run in the replay:[/]",
                         highlight=False)
        for comparison in missing:
            ui.info(f"  {comparison.tool} ({comparison.call_id}): {comparison.differences[0]}")
    style = "green" if report.all_match else "yellow"
    tail = f"; {len(missing)} not run" if missing else ""
    ui.console.print(f"\n[{style}]{same} of {total} tool results match the recording{tail}.[/]",
                     highlight=False)
    if places is not None and places.into_recorded and not report.all_match:
        ui.notice(f"This replay ran in the recorded workspace {places.workspace}, which already "
                  "holds what the recorded session made: a run of the same name is refused "
                  "there and a dataset or checkpoint may have changed since, which shows as "
                  "differences. To compare cleanly, replay into a fresh workspace: "
                  f"booth replay {source or 'PATH'} --execute --workspace NEW")
