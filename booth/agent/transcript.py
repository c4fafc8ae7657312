"""Versioned JSONL transcripts: a header line, then one line per event, written as it happens.

    {"type": "header", "format": "booth-transcript", "version": 2, "model": ..., ...}
    {"type": "user", "time": ..., "message": {"role": "user", "content": "..."}}
    {"type": "assistant", "content": ..., "tool_calls": [raw calls], "message": {...sent form}}
    {"type": "validation_error", "call_id": ..., "tool": ..., "error": ..., "message": {...}}
    {"type": "approval", "call_id": ..., "decision": "approved|refused|edited|always", ...}
    {"type": "tool_result", "call_id": ..., "arguments": ..., "ok": ..., "result"|"error": ...}
    {"type": "endpoint_error" | "notice" | "interrupted" | "resumed", ...}
    {"type": "retracted", "text": ...}

Each event type has one JSON schema (`SCHEMAS`) and one constructor (`make_event`); the writer
checks every event against its schema before writing it and the reader checks every line with
the same validator, so a file edited by hand fails with its line and field named instead of
deep inside resume or replay. Contents are always text: a content given as OpenAI content
parts is joined when the event is made, so what booth writes, booth reads.

One rule makes resuming trivial: every event that adds a message to the conversation carries
that exact message in its "message" field, so the conversation is
`[e["message"] for e in events if "message" in e]` (the system prompt lives in the header and
is rebuilt fresh on resume, because the workspace has changed since). The one exception is a
"retracted" event (written by /retry): it withdraws the message carried by the latest event
before it that is still in the conversation, so `conversation()` drops that message and
replay skips that assistant turn. Lines are never rewritten; this keeps the file append-only.

Version 2 differs from 1 in what it promises, not in its shape: the fields booth always wrote
are required, a field is absent rather than null, contents are text. Version-1 files are still
read (nulls dropped, content parts joined, then the same schemas); a resumed one keeps its
version-1 header and gets version-2 events, which version 1's reading accepts.

Each line is flushed and fsynced before the loop goes on, so a crash leaves a valid file up to
the last event. The API key is never given to the writer; as a second guard the writer masks
any secret it was told about should it ever appear in a line.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Any

from booth.agent.events import EventError, as_text, check_event, make_event, timestamp, tool_answer

FORMAT = "booth-transcript"
VERSION = 2  # 2: every field booth always writes is required, contents are text, no nulls
READABLE_VERSIONS = (1, 2)


class TranscriptError(Exception):
    """A transcript file cannot be read; the message names the file and the line."""


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
        "created": timestamp(),
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
    slug = re.sub(r"[^a-z0-9]+", "-", _latin(goal or "chat").lower()).strip("-")[:40].strip("-")
    path = transcripts_dir / f"{stamp}-{slug or 'chat'}.jsonl"
    counter = 2
    while path.exists():
        path = transcripts_dir / f"{stamp}-{slug or 'chat'}-{counter}.jsonl"
        counter += 1
    return path


# Latin letters that NFKD does not take apart into a base letter and a mark.
_LATIN_LETTERS = str.maketrans({"ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe",
                                "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d",
                                "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i"})


def _latin(text: str) -> str:
    """`text` with accented Latin letters as plain ones (é -> e, ß -> ss), so a file name
    keeps the words; other scripts pass through (the slug then leaves them out)."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_LATIN_LETTERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


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

    def write(self, record: dict) -> dict[str, Any]:
        """Append one event (built by `make_event`, or read from another transcript and copied as
        it was, its time included), checked against its schema first; returns it."""
        check_event(record)
        self._write_line(record)
        return record

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


def read_transcript(path: str | os.PathLike,
                    notices: list[str] | None = None) -> tuple[dict, list[dict]]:
    """(header, events) of a transcript, or a TranscriptError naming the bad line. What is
    left out without failing (a last line torn by a crash) is said in `notices`, if given."""
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
        if notices is not None:
            notices.append(f"{path}: its last line ({len(lines) + 1}) was cut off while it "
                           "was written (a crash?) and is left out")
    records = [(n, _parse_line(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise TranscriptError(f"{path} is empty: a transcript starts with a header line")
    (first_line, header), events = records[0], records[1:]
    _check_header(path, first_line, header)
    upgrade = _from_v1 if header["version"] == 1 else None
    for number, record in events:
        try:
            check_event(upgrade(record) if upgrade else record)
        except EventError as error:
            raise TranscriptError(f"{path}:{number}: {error}") from None
    return header, [record for _, record in events]


def _from_v1(record: dict) -> dict:
    """A version-1 event in today's form, changed in place. Version 1 let an optional field
    be null, and booth 0.1 recorded content given as a list of parts as it came."""
    for key in [k for k, v in record.items() if v is None and k != "type"]:
        del record[key]
    return as_text(record)


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
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not True, not 1.0
        raise TranscriptError(
            f"{path}:{number}: transcript version {version!r} is not supported "
            f"(this booth reads versions {', '.join(map(str, READABLE_VERSIONS))})"
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
        writer.write(make_event("resumed", **fresh))
    else:
        writer = TranscriptWriter.create(Path(new_path), {**header, "resumed_from": str(path)},
                                         secrets)
        for record in events:
            writer.write(record)
    messages = conversation(events)
    for call_id, name in unanswered_calls(messages):
        answer = tool_answer("tool_result", call_id, "Error: no result: the session ended "
                             "before this call finished.", tool=name, ok=False,
                             error="no result (the session ended)")
        writer.write(answer)
        messages.append(answer["message"])
    return writer, messages


def unanswered_calls(messages: list[dict]) -> list[tuple[str, str]]:
    """(id, tool) of the last assistant turn's calls that no tool message answers."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return []
    answered = {m.get("tool_call_id") for m in messages[last + 1 :]}
    calls = messages[last].get("tool_calls") or []
    return [(c["id"], c["function"]["name"]) for c in calls if c["id"] not in answered]
