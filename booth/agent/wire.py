"""Mistral's wire rules, applied to every request booth sends.

Mistral models (and vLLM serving them with `--tokenizer-mode mistral`) are strict about the
conversation they are given:
- tool-call ids are exactly 9 letters or digits (vLLM cuts longer ids to their last 9);
- an assistant message's `tool_calls[].function.arguments` must be a JSON object text, or
  vLLM answers 400 when it re-parses the history;
- every tool call is answered by a tool message carrying its id before the next assistant
  turn, and the last message sent is a user or tool message.

Rather than learn of a broken history from a 400 in the middle of a training session, booth
checks each request offline with mistral-common's own validator before sending it.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from booth.agent.model import AssistantTurn

ID_LENGTH = 9
_ID_RE = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALNUM = string.ascii_letters + string.digits
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_-]")


class WireError(ValueError):
    """A request breaks Mistral's rules; the message says which message and why."""


def new_call_id() -> str:
    """A fresh random tool-call id: 9 characters from [a-zA-Z0-9]."""
    return "".join(secrets.choice(_ALNUM) for _ in range(ID_LENGTH))


def is_valid_call_id(call_id: Any) -> bool:
    return isinstance(call_id, str) and bool(_ID_RE.match(call_id))


def normalize_call_id(raw: str | None, used: set[str]) -> str:
    """A Mistral-valid id for `raw`, unique among `used` (which it is added to).

    Longer alphanumeric-ending ids keep their last 9 characters, as vLLM does, so an id the
    server shortened itself still matches; anything else gets a fresh random id.
    """
    candidate = ""
    if isinstance(raw, str):
        tail = raw[-ID_LENGTH:]
        if len(raw) >= ID_LENGTH and is_valid_call_id(tail):
            candidate = tail
    while not candidate or candidate in used:
        candidate = new_call_id()
    used.add(candidate)
    return candidate


def used_call_ids(messages: list[dict]) -> set[str]:
    """Every tool-call id the conversation has used, in calls and in the answers to them."""
    used = {m["tool_call_id"] for m in messages if isinstance(m.get("tool_call_id"), str)}
    for message in messages:
        used.update(c["id"] for c in message.get("tool_calls") or []
                    if isinstance(c, dict) and isinstance(c.get("id"), str))
    return used


def repair_arguments(raw: Any) -> str:
    """Canonical JSON text of a call's arguments for the history: an object or `{}`.

    The raw text stays in the transcript (and is what the model is told was malformed);
    only what is re-sent is repaired, because vLLM re-parses it and answers 400 otherwise.
    """
    try:
        if isinstance(raw, dict):
            return json.dumps(raw, ensure_ascii=False)
        parsed = json.loads(raw) if isinstance(raw, (str, bytes)) else None
        return json.dumps(parsed, ensure_ascii=False) if isinstance(parsed, dict) else "{}"
    except (ValueError, TypeError, RecursionError):  # nested too deep for json: a malformed call
        return "{}"


def safe_function_name(name: Any) -> str:
    """`name` made to match `^[a-zA-Z0-9_-]{1,64}$`.

    A model may call a tool that does not exist under a name Mistral would refuse
    ("train model"); the loop answers it as an unknown tool, but the history must still be
    sendable, or every later request would be refused.
    """
    cleaned = _NAME_BAD.sub("_", name if isinstance(name, str) else "")[:64]
    return cleaned or "unnamed_tool"


def assistant_message(turn: AssistantTurn, used: set[str] | None = None) -> dict:
    """The OpenAI-format assistant message for `turn`, safe to send back.

    Ids are normalized (pass the conversation's `used` ids to keep them unique across it),
    arguments repaired and function names made valid. Content is None when the turn is
    only tool calls (what OpenAI and vLLM expect); an empty turn with no calls keeps `""`
    so the message still has text.
    The caller must answer each call with the id found in the returned message; ids that
    are already valid and unused are kept as they are.
    """
    used = set() if used is None else used
    message: dict[str, Any] = {"role": "assistant", "content": turn.content or None}
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": normalize_call_id(call.id, used),
                "type": "function",
                "function": {
                    "name": safe_function_name(call.name),
                    "arguments": repair_arguments(call.arguments),
                },
            }
            for call in turn.tool_calls
        ]
    elif not turn.content:
        message["content"] = ""
    return message


def _describe(index: int, message: dict) -> str:
    return f"message {index} ({message.get('role', '?')})"


def _check_tool_answers(messages: list[dict]) -> None:
    """Every tool call answered, by id, before the next assistant turn; no stray answers."""
    pending: dict[str, str] = {}  # id -> tool name, calls not yet answered
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            if pending:
                _raise_unanswered(
                    pending, f"before the next assistant turn ({_describe(index, message)})"
                )
            for call in message.get("tool_calls") or []:
                call_id = call.get("id")
                if not is_valid_call_id(call_id):
                    raise WireError(
                        f"{_describe(index, message)}: tool-call id {call_id!r} must be exactly "
                        "9 letters or digits"
                    )
                _check_arguments(index, call)
                pending[call_id] = (call.get("function") or {}).get("name", "?")
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in pending:
                raise WireError(
                    f"{_describe(index, message)}: answers tool call {call_id!r}, which is not "
                    "an unanswered call of the previous assistant turn"
                )
            del pending[call_id]
    if pending:
        _raise_unanswered(pending, "at the end of the conversation")


def _raise_unanswered(pending: dict[str, str], where: str) -> None:
    calls = ", ".join(f"{name} ({call_id})" for call_id, name in pending.items())
    raise WireError(f"tool call(s) {calls} left without a tool message answering them {where}")


def _check_arguments(index: int, call: dict) -> None:
    arguments = (call.get("function") or {}).get("arguments")
    try:
        ok = isinstance(json.loads(arguments), dict)
    except (TypeError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise WireError(
            f"message {index} (assistant): arguments of call {call.get('id')!r} are not a "
            "JSON object text (send them through repair_arguments())"
        )


def _check_last(messages: list[dict]) -> None:
    if not messages:
        raise WireError("the conversation is empty")
    last = messages[-1].get("role")
    if last not in ("user", "tool"):
        raise WireError(f"the last message sent must be a user or tool message, not {last!r}")


def check_request(messages: list[dict], tools: list[dict] | None, model_name: str) -> None:
    """Raise `WireError` if this chat-completions request breaks Mistral's rules.

    booth's own checks (clear messages naming the offending message) run first, then
    mistral-common's validator for Mistral Small 3.2's protocol (V11, serving mode), which
    also checks roles order, function names and tool schemas (JSON Schema draft 7).
    """
    _check_last(messages)
    _check_tool_answers(messages)
    # mistral-common costs ~0.8 s to import: only when a request is about to go out.
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import (
        MistralRequestValidatorV11,
        ValidationMode,
    )

    try:
        request = ChatCompletionRequest.from_openai(messages, tools or None, model=model_name)
        MistralRequestValidatorV11(mode=ValidationMode.serving).validate_request(request)
    # pydantic's errors are ValueErrors; a malformed message dict raises KeyError/TypeError.
    except KeyError as err:
        raise WireError(f"request breaks Mistral's rules: a message lacks the field {err}") from err
    except (MistralCommonException, ValueError, TypeError) as err:
        raise WireError(f"request breaks Mistral's rules: {_short(err)}") from err


def _short(err: Exception, limit: int = 400) -> str:
    """The error's text on one line (pydantic's come on several), cut to `limit`."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
