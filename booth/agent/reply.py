"""What a chat-completions server sends, read into an `AssistantTurn` without trusting it.

Everything here is data from the network. A malformed *reply* (a body that is not JSON, an
HTML page, a stream that stops before the model finished, no choices, an error event) raises
`BrokenReply`, which the endpoint retries and then reports. A malformed *call* (`function`
null, `tool_calls` a string, arguments nested too deep to parse) becomes a `ToolCall` with
whatever name and arguments text could be salvaged: the loop's validation refuses it, tells
the model, and nothing runs.

booth reads the raw bytes itself rather than the SDK's parsed objects: the SDK builds those
without validation (so `call.function` may be None), and its stream reader cannot tell a
stream that ended with `[DONE]` from one cut off, nor survive a line that is not JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from booth.agent.model import AssistantTurn, ToolCall

SNIPPET = 120  # characters of a bad body quoted in the message


class BrokenReply(Exception):
    """The server's answer cannot be used; the message says how it was broken."""


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…")


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise BrokenReply(f"sent {what} nested too deeply to read") from None
    except ValueError:
        raise BrokenReply(f"sent {what} that is not JSON: {_snippet(text)}") from None


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BrokenReply(f"sent {what} that is not UTF-8 text") from None


def as_text(value: Any) -> str:
    """A value from the wire as text: strings as they are, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (RecursionError, TypeError, ValueError):
        return ""


def _content(value: Any) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        return "".join(p.get("text") or "" for p in value
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return as_text(value)


def _error_of(data: dict) -> str | None:
    """The server's own words when `data` is an error object, else None."""
    error = data.get("error")
    if not error and data.get("object") == "error":  # an older vLLM's error, not wrapped
        error = data
    if not error:
        return None
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error
    return as_text(error)[:500] or "no details"


def _calls_of(value: Any) -> list[dict]:
    """`tool_calls` as a list of entries; anything else becomes one entry holding it."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v if isinstance(v, dict) else {"function": {"arguments": v}} for v in value]
    return [{"function": {"arguments": value}}]  # e.g. a string: salvaged as arguments text


def _function_of(entry: dict) -> dict:
    function = entry.get("function")
    return function if isinstance(function, dict) else {}


def _name(value: Any) -> str:
    return value if isinstance(value, str) else as_text(value)[:200]


def turn_from_body(data: bytes) -> AssistantTurn:
    """The turn in a whole (non-streamed) chat-completions response body."""
    body = _loads(_decode(data, "a body"), "a body")
    if not isinstance(body, dict):
        raise BrokenReply(f"sent a body that is not a chat completion: {_snippet(as_text(body))}")
    problem = _error_of(body)
    if problem:
        raise BrokenReply(f"reported an error: {problem}")
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise BrokenReply("did not answer like a chat-completions endpoint (no choices[0]."
                          f"message): {_snippet(as_text(body))}")
    calls = [
        ToolCall(_name(entry.get("id")), _name(_function_of(entry).get("name")),
                 as_text(_function_of(entry).get("arguments")))
        for entry in _calls_of(message.get("tool_calls"))
    ]
    finish = choice.get("finish_reason")
    turn = _checked(AssistantTurn(_content(message.get("content")), calls,
                                  finish if isinstance(finish, str) else None))
    turn.served_model = _model_of(body)
    return turn


def _model_of(data: dict) -> str | None:
    model = data.get("model")
    return model[:200] if isinstance(model, str) and model else None


def _checked(turn: AssistantTurn) -> AssistantTurn:
    if not turn.content.strip() and not turn.tool_calls:
        raise BrokenReply("answered with nothing: no text and no tool call")
    return turn


def sse_events(chunks: Iterable[bytes]) -> Iterator[str]:
    """The `data` of each server-sent event in a byte stream (comments and other fields
    carry nothing booth needs). Lines are split on bytes, so a character is never cut."""
    buffer, data = b"", []
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = _decode(raw.rstrip(b"\r"), "a stream")
            if not line:
                if data:
                    yield "\n".join(data)
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    if buffer.strip():
        line = _decode(buffer.rstrip(b"\r"), "a stream")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


class StreamReader:
    """Assembles a streamed turn: text as it comes, tool calls accumulated by index.

    As vLLM streams them, a call's id and name come in its first delta and its arguments in
    pieces after; a server that sends a call whole in one delta works the same way.
    `read` yields the text pieces to show; `turn()` is the finished turn, or `BrokenReply`
    when the stream ended before the model finished (no finish_reason) or said nothing.
    """

    def __init__(self) -> None:
        self.text: list[str] = []
        self.slots: dict[int, dict[str, str]] = {}
        self.finish: str | None = None
        self.events = 0
        self.error: str | None = None  # what an error event in the stream said
        self.model: str | None = None  # the first `model` field the stream named

    def read(self, chunks: Iterable[bytes]) -> Iterator[str]:
        for data in sse_events(chunks):
            if data.strip() == "[DONE]":
                return
            self.events += 1
            chunk = _loads(data, "a stream event")
            if not isinstance(chunk, dict):
                raise BrokenReply(f"sent a stream event that is not an object: {_snippet(data)}")
            problem = _error_of(chunk)
            self.model = self.model or _model_of(chunk)
            if problem:
                self.error = problem
                raise BrokenReply(f"reported an error while answering: {problem}")
            yield from self._choices(chunk.get("choices"), data)

    def _choices(self, choices: Any, data: str) -> Iterator[str]:
        if choices is None:
            return  # e.g. the final usage chunk
        if not isinstance(choices, list):
            raise BrokenReply(f"sent a stream event with unusable choices: {_snippet(data)}")
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue  # booth asks for one choice; ignore any other
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            piece = _content(delta.get("content"))
            if piece:
                self.text.append(piece)
                yield piece
            for part in _calls_of(delta.get("tool_calls")):
                self._add_call_part(part)
            if isinstance(choice.get("finish_reason"), str):
                self.finish = choice["finish_reason"]

    def _add_call_part(self, part: dict) -> None:
        index = part.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = len(self.slots)
        slot = self.slots.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if part.get("id"):
            slot["id"] = _name(part["id"])
        function = _function_of(part)
        if function.get("name"):
            slot["name"] = _name(function["name"])
        slot["arguments"] += as_text(function.get("arguments"))

    @property
    def begun(self) -> bool:
        """Whether the answer has begun: text or a tool call has come."""
        return bool(self.text or self.slots)

    def turn(self) -> AssistantTurn:
        if self.finish is None:
            if not self.events:
                raise BrokenReply("sent no chat-completions events (is this an OpenAI-"
                                  "compatible endpoint?)")
            raise BrokenReply("ended the stream before the model finished (no finish_reason)")
        slots = sorted(self.slots.items())
        calls = [ToolCall(s["id"], s["name"], s["arguments"]) for _, s in slots]
        turn = _checked(AssistantTurn("".join(self.text), calls, self.finish))
        turn.served_model = self.model
        return turn
