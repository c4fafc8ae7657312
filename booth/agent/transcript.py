"""Versioned JSONL transcripts: a header line, then one line per event, written as it happens.

    {"type": "header", "format": "booth-transcript", "version": 1, "model": ..., ...}
    {"type": "user", "time": ..., "message": {"role": "user", "content": "..."}}
    {"type": "assistant", "content": ..., "tool_calls": [raw calls], "message": {...sent form}}
    {"type": "validation_error", "call_id": ..., "tool": ..., "error": ..., "message": {...}}
    {"type": "approval", "call_id": ..., "decision": "approved|refused|edited|always", ...}
    {"type": "tool_result", "call_id": ..., "arguments": ..., "ok": ..., "result"|"error": ...}
    {"type": "endpoint_error" | "notice" | "interrupted" | "resumed", ...}
    {"type": "retracted", "text": ...}

One rule makes resuming trivial: every event that adds a message to the conversation carries
that exact message in its "message" field, so the conversation is
`[e["message"] for e in events if "message" in e]` (the system prompt lives in the header and
is rebuilt fresh on resume, because the workspace has changed since). The one exception is a
"retracted" event (written by /retry): it withdraws the message carried by the latest event
before it that is still in the conversation, so `conversation()` drops that message and
replay skips that assistant turn. Lines are never rewritten; this keeps the file append-only.

`read_transcript` checks each event's fields and message shape for its type, so a file edited
by hand fails with its line named instead of deep inside resume or replay.

Each line is flushed and fsynced before the loop goes on, so a crash leaves a valid file up to
the last event. The API key is never given to the writer; as a second guard the writer masks
any secret it was told about should it ever appear in a line.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

FORMAT = "booth-transcript"
VERSION = 1

EVENT_TYPES = {
    "user",
    "assistant",
    "validation_error",
    "approval",
    "tool_result",
    "endpoint_error",
    "notice",
    "interrupted",
    "resumed",
    "retracted",
}

# The role of the message an event type carries; other event types carry none.
_ROLES = {"user": "user", "assistant": "assistant", "validation_error": "tool",
          "approval": "tool", "tool_result": "tool"}
# Per event type: field -> (allowed types, required). An optional field may also be null.
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "user": {"message": ((dict,), True)},
    "assistant": {"message": ((dict,), True), "tool_calls": ((list,), True),
                  "content": ((str,), False), "finish_reason": ((str,), False)},
    "validation_error": {"call_id": ((str,), True), "tool": ((str,), True),
                         "message": ((dict,), True), "error": ((str,), False)},
    "approval": {"call_id": ((str,), True), "tool": ((str,), True),
                 "decision": ((str,), True), "arguments": ((dict,), True),
                 "reason": ((str,), False)},
    "tool_result": {"call_id": ((str,), True), "tool": ((str,), True), "ok": ((bool,), True),
                    "message": ((dict,), True), "arguments": ((dict,), False),
                    "error": ((str,), False)},
    "endpoint_error": {"error": ((str,), False)},
    "notice": {"text": ((str,), False)},
    "interrupted": {"text": ((str,), False)},
    "retracted": {"text": ((str,), False)},
    "resumed": {},
}
_KIND_NAMES = {str: "a string", dict: "a JSON object", list: "a list", bool: "true or false"}


class TranscriptError(Exception):
    """A transcript file cannot be read; the message names the file and the line."""


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def make_header(
    *,
    model: str,
    endpoint: str | dict[str, Any],
    sampling: dict[str, Any],
    tools: list[dict],
    system_prompt: str,
    **extra: Any,
) -> dict[str, Any]:
    """The first line of a transcript. `endpoint` is settings.describe(): never the key."""
    from booth import __version__

    return {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "booth_version": __version__,
        "created": _now(),
        "model": model,
        "endpoint": endpoint,
        "sampling": sampling,
        "tools": tools,
        "system_prompt": system_prompt,
        **extra,
    }


def default_path(transcripts_dir: Path, goal: str | None, now: datetime | None = None) -> Path:
    """<transcripts>/<yyyymmdd-HHMMSS>-<slug of the goal>.jsonl, never an existing file."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9]+", "-", (goal or "chat").lower()).strip("-")[:40].strip("-")
    path = transcripts_dir / f"{stamp}-{slug or 'chat'}.jsonl"
    counter = 2
    while path.exists():
        path = transcripts_dir / f"{stamp}-{slug or 'chat'}-{counter}.jsonl"
        counter += 1
    return path


class TranscriptWriter:
    """Appends events to a transcript file, one fsynced JSON line each."""

    def __init__(self, path: Path, secrets: list[str] | None = None):
        self.path = Path(path)
        self._secrets = [s for s in (secrets or []) if s and len(s) >= 4]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # kept open: one line per event

    @classmethod
    def create(cls, path: Path, header: dict, secrets: list[str] | None = None):
        """Start a new transcript with `header` as its first line."""
        if Path(path).exists() and Path(path).stat().st_size > 0:
            raise TranscriptError(f"{path} already exists; choose another --transcript path")
        writer = cls(path, secrets)
        writer._write_line(header)
        return writer

    def write(self, type: str, **fields: Any) -> dict[str, Any]:
        """Record one event now; returns the event as written."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown transcript event type {type!r}")
        event = {"type": type, "time": _now(), **fields}
        self._write_line(event)
        return event

    def write_event(self, event: dict) -> None:
        """Copy an event read from another transcript, as it was (its time included)."""
        if event.get("type") not in EVENT_TYPES:
            raise ValueError(f"unknown transcript event type {event.get('type')!r}")
        self._write_line(event)

    def _write_line(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str)
        for secret in self._secrets:
            line = line.replace(secret, "***")
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left half-written by a crash, so appended events start on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    tail = data[data.rfind(b"\n") + 1 :]
    with open(path, "r+b") as file:
        if _is_json(tail.decode("utf-8", "replace")):
            file.seek(0, os.SEEK_END)
            file.write(b"\n")  # a whole event, only missing its newline (edited by hand)
        else:
            file.truncate(len(data) - len(tail))


def read_transcript(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, events) of a transcript, or a TranscriptError naming the bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TranscriptError(f"cannot read transcript {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise TranscriptError(f"{path} is not a text file (not UTF-8)") from None
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line breaks.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    elif not _is_json(lines[-1]):
        lines.pop()  # a last line torn by a crash mid-write: every event before it is whole
    records = [(n, _parse_line(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise TranscriptError(f"{path} is empty: a transcript starts with a header line")
    (first_line, header), events = records[0], records[1:]
    _check_header(path, first_line, header)
    for number, event in events:
        if event["type"] not in EVENT_TYPES:
            raise TranscriptError(f"{path}:{number}: unknown event type {event['type']!r}")
        try:
            _check_event(event)
        except _BadField as error:
            raise TranscriptError(f"{path}:{number}: {event['type']} event: {error}") from None
    return header, [event for _, event in events]


class _BadField(Exception):
    """One field of an event is missing or of the wrong kind (the text names it)."""


def _need(record: dict, key: str, kinds: tuple[type, ...], where: str = "",
          required: bool = True) -> Any:
    """record[key], checked: present when required, else absent or null; of one of `kinds`."""
    name = f"'{where}{key}'"
    value = record.get(key)
    if value is None:
        if required:
            raise _BadField(f"{name} is missing")
        return None
    if not isinstance(value, kinds):
        wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise _BadField(f"{name} must be {wanted}, not {_short_json(value)}")
    return value


def _short_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:39] + "…"


def _check_event(event: dict) -> None:
    """Raise _BadField unless `event` has the fields its type needs, message included."""
    kind = event["type"]
    for key, (kinds, required) in _FIELDS[kind].items():
        _need(event, key, kinds, required=required)
    if "message" in event and kind not in _ROLES:
        raise _BadField("this event type carries no 'message'")
    message = event.get("message")
    if message is None:
        return
    role = _need(message, "role", (str,), "message.")
    if role != _ROLES[kind]:
        raise _BadField(f"'message.role' must be {_ROLES[kind]!r}, not {role!r}")
    if role == "user":
        _need(message, "content", (str,), "message.")
    elif role == "assistant":
        _check_assistant(event, message)
    else:
        _need(message, "content", (str,), "message.")
        if _need(message, "tool_call_id", (str,), "message.") != event["call_id"]:
            raise _BadField("'message.tool_call_id' must equal 'call_id'")


def _check_assistant(event: dict, message: dict) -> None:
    _need(message, "content", (str,), "message.", required=False)
    sent = _need(message, "tool_calls", (list,), "message.", required=False) or []
    for i, call in enumerate(sent):
        where = f"message.tool_calls[{i}]"
        if not isinstance(call, dict):
            raise _BadField(f"'{where}' must be a JSON object")
        _need(call, "id", (str,), f"{where}.")
        function = _need(call, "function", (dict,), f"{where}.")
        _need(function, "name", (str,), f"{where}.function.")
        _need(function, "arguments", (str,), f"{where}.function.")
    raw = event["tool_calls"]
    if len(raw) != len(sent):
        raise _BadField(f"'tool_calls' has {len(raw)} calls but 'message.tool_calls' has "
                        f"{len(sent)}")
    for i, call in enumerate(raw):
        if not isinstance(call, dict):
            raise _BadField(f"'tool_calls[{i}]' must be a JSON object")
        _need(call, "arguments", (str, dict), f"tool_calls[{i}].", required=False)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _parse_line(path: Path, number: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise TranscriptError(
            f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(record, dict):
        raise TranscriptError(f"{path}:{number}: each line must be a JSON object")
    if not isinstance(record.get("type"), str):
        raise TranscriptError(f"{path}:{number}: the line has no 'type' field")
    return record


def _check_header(path: Path, number: int, header: dict) -> None:
    if header["type"] != "header" or header.get("format") != FORMAT:
        raise TranscriptError(
            f"{path}:{number}: the first line must be a {FORMAT} header "
            "(is this a booth transcript?)"
        )
    if header.get("version") != VERSION:
        raise TranscriptError(
            f"{path}:{number}: transcript version {header.get('version')!r} is not supported "
            f"(this booth reads version {VERSION})"
        )
    if not isinstance(header.get("system_prompt", ""), str):
        raise TranscriptError(f"{path}:{number}: header: 'system_prompt' must be a string")


def retracted(events: list[dict]) -> set[int]:
    """Indexes of the events whose message a later "retracted" event withdrew."""
    live: list[int] = []  # indexes of the message-carrying events still in the conversation
    withdrawn: set[int] = set()
    for index, event in enumerate(events):
        if "message" in event:
            live.append(index)
        elif event["type"] == "retracted" and live:
            withdrawn.add(live.pop())
    return withdrawn


def conversation(events: list[dict]) -> list[dict]:
    """The messages of the conversation (without the system prompt), in order."""
    gone = retracted(events)
    return [e["message"] for i, e in enumerate(events) if "message" in e and i not in gone]


def assistant_turns(events: list[dict]):
    """The recorded assistant turns, in order, for replay: each call with the id that was
    sent (so its recorded result can be found) and the model's raw name and arguments (so a
    malformed call fails validation again, as it did). Turns withdrawn by /retry are left
    out."""
    from booth.agent.model import AssistantTurn, ToolCall

    gone = retracted(events)
    turns = []
    for index, event in enumerate(events):
        if event["type"] != "assistant" or index in gone:
            continue
        sent = event["message"].get("tool_calls") or []
        calls = [ToolCall(s["id"], r.get("name") or s["function"]["name"],
                          r.get("arguments") or "")
                 for s, r in zip(sent, event["tool_calls"], strict=True)]
        turns.append(AssistantTurn(event.get("content") or "", calls, event.get("finish_reason")))
    return turns


def open_for_resume(
    path: str | os.PathLike,
    header: dict,
    new_path: str | os.PathLike | None = None,
    secrets: list[str] | None = None,
) -> tuple[TranscriptWriter, list[dict]]:
    """(writer, conversation) to continue the session saved in `path`.

    Without `new_path` the events go on in the same file, after a "resumed" event carrying the
    new session's header fields. With `new_path`, a new file starts with `header` plus
    `resumed_from` and a copy of the old events, so that either file alone holds the whole
    conversation. Calls a crash left unanswered are answered ("no result"), so the history
    obeys Mistral's rules again.
    """
    _, events = read_transcript(path)
    if new_path is None or Path(new_path).resolve() == Path(path).resolve():
        writer = TranscriptWriter(Path(path), secrets)
        fresh = {k: v for k, v in header.items() if k not in ("type", "format", "version")}
        writer.write("resumed", **fresh)
    else:
        writer = TranscriptWriter.create(Path(new_path), {**header, "resumed_from": str(path)},
                                         secrets)
        for event in events:
            writer.write_event(event)
    messages = conversation(events)
    for call_id, name in unanswered_calls(messages):
        message = {"role": "tool", "tool_call_id": call_id,
                   "content": "Error: no result: the session ended before this call finished."}
        writer.write("tool_result", call_id=call_id, tool=name, ok=False,
                     error="no result (the session ended)", message=message)
        messages.append(message)
    return writer, messages


def unanswered_calls(messages: list[dict]) -> list[tuple[str, str]]:
    """(id, tool) of the last assistant turn's calls that no tool message answers."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return []
    answered = {m.get("tool_call_id") for m in messages[last + 1 :]}
    calls = messages[last].get("tool_calls") or []
    return [(c["id"], c["function"]["name"]) for c in calls if c["id"] not in answered]
