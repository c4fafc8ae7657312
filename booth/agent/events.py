"""Transcript events: one JSON schema per type, one constructor, one check.

    make_event("notice", text="history shortened")   # {"type": "notice", "time": ..., "text": ...}

`make_event` is the only place that builds an event; `check_event` is what the transcript writer
runs before writing a line and what its reader runs on every line read (Draft 2020-12, the
same validator), with errors in plain words naming the field: "'message.content' must be a
string, not 5". The format around the events (header, versions, files) is in transcript.py.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

# -- the events: one JSON schema per type ----------------------------------------------------
_TEXT = {"type": "string"}
_TOOL_MESSAGE = {"type": "object", "required": ["role", "tool_call_id", "content"],
                 "properties": {"role": {"const": "tool"}, "tool_call_id": _TEXT,
                                "content": _TEXT}}
_SENT_CALL = {"type": "object", "required": ["id", "function"], "properties": {
    "id": _TEXT,
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": _TEXT, "arguments": _TEXT}}}}
# The call as the model sent it: any name, arguments as text (maybe not JSON) or an object.
_RAW_CALL = {"type": "object", "properties": {
    "id": _TEXT, "name": _TEXT, "arguments": {"type": ["string", "object"]}}}
_MESSAGES = {
    "user": {"type": "object", "required": ["role", "content"],
             "properties": {"role": {"const": "user"}, "content": _TEXT}},
    "assistant": {"type": "object", "required": ["role"], "properties": {
        "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
        "tool_calls": {"type": "array", "items": _SENT_CALL}}},
    "tool": _TOOL_MESSAGE,
}
_CALL = {"call_id": _TEXT, "tool": _TEXT}
_ABSENT = {"not": {}}  # not `false`: jsonschema names the field of a "not" error, not of false


def _schema(required: dict, optional: dict | None = None, rules: dict | None = None) -> dict:
    """An event type's schema. Fields not named are allowed (a "resumed" event carries the
    new header), except "message" on a type that adds none to the conversation."""
    properties = {"type": _TEXT, "time": _TEXT, "message": _ABSENT, **required, **(optional or {})}
    return {"type": "object", "required": list(required), "properties": properties,
            **(rules or {})}


SCHEMAS: dict[str, dict] = {
    "user": _schema({"message": _MESSAGES["user"]}),
    "assistant": _schema({"message": _MESSAGES["assistant"],
                          "tool_calls": {"type": "array", "items": _RAW_CALL}},
                         {"content": _TEXT, "finish_reason": _TEXT}),
    "validation_error": _schema({**_CALL, "error": _TEXT, "message": _TOOL_MESSAGE}),
    # A refused call is answered by the approval event itself ("Cancelled by the user").
    "approval": _schema({**_CALL, "decision": {"enum": ["approved", "always", "edited",
                                                        "refused"]},
                         "arguments": {"type": "object"}},
                        {"edited": {"type": "boolean"}, "reason": _TEXT,
                         "message": _TOOL_MESSAGE}),
    "tool_result": _schema({**_CALL, "ok": {"type": "boolean"}, "message": _TOOL_MESSAGE},
                           {"arguments": {"type": "object"}, "error": _TEXT,
                            "seconds": {"type": "number"}, "traceback": _TEXT},
                           # a failure always says why
                           {"if": {"required": ["ok"], "properties": {"ok": {"const": False}}},
                            "then": {"required": ["error"]}}),
    "endpoint_error": _schema({"error": _TEXT}),
    "notice": _schema({"text": _TEXT}, {"call_id": _TEXT}),
    "interrupted": _schema({"text": _TEXT}, {"call_id": _TEXT}),
    "retracted": _schema({"text": _TEXT}),
    "resumed": _schema({}),
}


def timestamp() -> str:
    """Now, as events and headers record it."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


class EventError(ValueError):
    """An event does not match its type's schema; the message names the field."""


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    """The one constructor of transcript events: stamped with the time, contents given as
    OpenAI content parts turned into text, fields given as None left out, checked against
    the type's schema (EventError otherwise)."""
    record = {"type": kind, "time": timestamp()}
    record.update((key, value) for key, value in fields.items() if value is not None)
    check_event(as_text(record))
    return record


def tool_answer(kind: str, call_id: str, content: str, **fields: Any) -> dict[str, Any]:
    """An event whose message answers the call `call_id` (a tool-role message)."""
    message = {"role": "tool", "tool_call_id": call_id, "content": content}
    return make_event(kind, call_id=call_id, message=message, **fields)


def text_content(content: Any) -> str | None:
    """A message content as text. OpenAI allows a list of parts ([{"type": "text", "text":
    ...}]); booth records and sends text only, so text parts are joined and any other part
    is named in brackets (anything else a server might send is written as JSON)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):  # from a server, so data: never a crash
        return json.dumps(content, ensure_ascii=False, default=str)
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            texts.append(f"[{kind} part left out]")
    return "".join(texts)


def as_text(record: dict) -> dict:
    """`record` with its contents (its own and its message's) as text, changed in place."""
    if isinstance(record.get("content"), list):
        record["content"] = text_content(record["content"])
    message = record.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        record["message"] = {**message, "content": text_content(message["content"])}
    return record


@functools.cache
def _validator(kind: str):
    import jsonschema

    return jsonschema.Draft202012Validator(SCHEMAS[kind])


def check_event(record: dict) -> None:
    """EventError unless `record` is a valid event: its type's schema, then the two links
    between fields no JSON schema can state."""
    kind = record.get("type")
    if kind not in SCHEMAS:
        raise EventError(f"unknown event type {kind!r}")
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(kind).iter_errors(record))
    if error is not None:
        raise EventError(f"{kind} event: {_plain(error)}")
    message = record.get("message")
    if message and message["role"] == "tool" and message["tool_call_id"] != record["call_id"]:
        raise EventError(f"{kind} event: 'message.tool_call_id' must equal 'call_id'")
    sent = (message or {}).get("tool_calls") or []
    if kind == "assistant" and len(record["tool_calls"]) != len(sent):
        raise EventError(f"{kind} event: 'tool_calls' has {len(record['tool_calls'])} calls "
                         f"but 'message.tool_calls' has {len(sent)}")


_KIND_NAMES = {"string": "a string", "object": "a JSON object", "array": "a list",
               "boolean": "true or false", "number": "a number", "null": "null"}


def _plain(error) -> str:
    """A schema error in plain words, naming the field as a path ('message.tool_calls[0]')."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    name = f"'{path.lstrip('.')}'"
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        return f"'{(path + '.' + missing).lstrip('.')}' is missing"
    if error.validator == "type":
        kinds = error.validator_value
        wanted = " or ".join(_KIND_NAMES[k] for k in ([kinds] if isinstance(kinds, str) else kinds))
        return f"{name} must be {wanted}, not {_short_json(error.instance)}"
    if error.validator == "const":
        return f"{name} must be {error.validator_value!r}, not {_short_repr(error.instance)}"
    if error.validator == "enum":
        allowed = ", ".join(map(repr, error.validator_value))
        return f"{name} must be one of {allowed}, not {_short_repr(error.instance)}"
    if error.validator == "not":  # _ABSENT: the field may not be there at all
        return f"this event type carries no {name}"
    return f"{name}: {error.message[:200]}"


def _short_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:39] + "…"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


