"""Tool calls that come back as text, from a server that does not parse Mistral's calls.

vLLM without `--tool-call-parser mistral --enable-auto-tool-choice`, llama-server without
`--jinja`, LM Studio and Ollama's broken mistral-small3.2 template hand the model's calls back
in `content`. What counts as a call:

- text with the `[TOOL_CALLS]` marker: always a call. Small 3.2 (v11) writes
  `[TOOL_CALLS]name[ARGS]{...}`, several in a row; older models `[TOOL_CALLS][{"name": ...,
  "arguments": ...}]`. An unknown name or broken JSON after the marker is still a call: the
  loop refuses it and tells the model, like a native one. Prose before the marker stays the
  turn's text.
- a bare JSON list of {"name", "arguments"} objects, or `name{...}` (one or more in a row, what
  is left when a server strips the special tokens): a call only when it is the whole answer
  (give or take whitespace) and every name is a tool offered; prose that names a tool
  ("I will call train next") is text.

`Holdback` keeps streamed text that may turn out to be such a call off the screen until the
answer ends, so a call is never shown as prose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass

from booth.agent import wire
from booth.agent.model import AssistantTurn, ToolCall

MARKER = "[TOOL_CALLS]"
_ARGS, _CALL_ID = "[ARGS]", "[CALL_ID]"
_WORD = re.compile(r"[A-Za-z0-9_-]+")
_BARE_NAME = re.compile(r"\s*([A-Za-z0-9_-]+)\s*")
_NAME_IN_JSON = re.compile(r'"name"\s*:\s*"([^"]{1,64})"')
_EOS = "</s>"


@dataclass
class TextCalls:
    prose: str  # the text before the calls: the turn's content
    calls: list[ToolCall]
    form: str  # which form they came in, for the notice


def tool_names(tools: list[dict]) -> set[str]:
    """The function names of an OpenAI `tools` list."""
    names = set()
    for spec in tools or []:
        function = spec.get("function") if isinstance(spec, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def find_calls(content: str, names: Collection[str], bare: bool = True) -> TextCalls | None:
    """The calls written in `content`, or None when it is prose. `bare=False` looks for the
    marker only (a turn that already has native calls is no bare call)."""
    before, marker, _ = content.partition(MARKER)
    if marker:
        return TextCalls(before.strip(), _marked(content[len(before):]), MARKER)
    if not bare:
        return None
    text = content.strip()
    for form, parse in (("a JSON list of calls", _json_list), ("name{arguments}", _name_args)):
        calls = parse(text, names)
        if calls:
            return TextCalls("", calls, form)
    return None


def read_calls(turn: AssistantTurn, names: Collection[str]
               ) -> tuple[AssistantTurn, str | None]:
    """`turn` with the calls its text holds made calls (the text kept in `raw_content`, the
    prose before them left as its content), and the form they came in (None: no calls)."""
    found = find_calls(turn.content, names, bare=not turn.tool_calls)
    if found is None:
        return turn, None
    turn.raw_content, turn.content = turn.content, found.prose
    turn.tool_calls = [*turn.tool_calls, *found.calls]
    return turn, found.form


def _marked(text: str) -> list[ToolCall]:
    """Every call after a marker: each may be v11's `name[ARGS]{...}` (with v13's
    `[CALL_ID]id` before the arguments) or a JSON list; what cannot be read becomes a call
    with whatever name could be salvaged, which the loop refuses with a reason."""
    calls = []
    for part in text.split(MARKER)[1:]:
        part = part.strip().removesuffix(_EOS).strip()
        if part.startswith(("[", "{")):  # a list of calls (or one call) in JSON
            calls.extend(_listed(part))
        elif part:
            calls.append(_v11(part))
    return calls or [ToolCall(wire.new_call_id(), "", "")]


def _v11(part: str) -> ToolCall:
    name = re.match(r"[^\[{\s]*", part).group()
    rest, call_id = part[len(name):].lstrip(), ""
    if rest.startswith(_CALL_ID):
        call_id, _, rest = rest[len(_CALL_ID):].partition(_ARGS)
        rest = _ARGS + rest
    rest = rest.removeprefix(_ARGS).strip()
    call_id = call_id.strip()
    return ToolCall(call_id if wire.is_valid_call_id(call_id) else wire.new_call_id(), name,
                    rest)


def _listed(part: str) -> list[ToolCall]:
    try:
        items = json.loads(part)
    except (ValueError, RecursionError):
        items = None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        found = _NAME_IN_JSON.search(part)
        return [ToolCall(wire.new_call_id(), found.group(1) if found else "", part)]
    return [_from_json(item) for item in items]


def _from_json(item) -> ToolCall:
    if not isinstance(item, dict):
        return ToolCall(wire.new_call_id(), "", json.dumps(item, ensure_ascii=False))
    name = item.get("name")
    arguments = item.get("arguments", item.get("parameters", {}))
    return ToolCall(wire.new_call_id(), name if isinstance(name, str) else "",
                    arguments if isinstance(arguments, str) else
                    json.dumps(arguments, ensure_ascii=False))


def _json_list(text: str, names: Collection[str]) -> list[ToolCall] | None:
    if not text.startswith("["):
        return None
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(items, list) and items and all(
        isinstance(i, dict) and i.get("name") in names and "arguments" in i
        and isinstance(i["arguments"], (dict, str)) for i in items)
    return [_from_json(item) for item in items] if ok else None


def _name_args(text: str, names: Collection[str]) -> list[ToolCall] | None:
    """`name{...}` once or more in a row, the whole text; each arguments a JSON object."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        found = _BARE_NAME.match(text, at)
        if not found or found.group(1) not in names:
            return None
        try:
            arguments, end = decoder.raw_decode(text, found.end())
        except (ValueError, RecursionError):
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(wire.new_call_id(), found.group(1), text[found.end():end]))
        at = len(text) - len(text[end:].lstrip())
    return calls or None


class Holdback:
    """Streamed text, minus what may be a call written as text, until the answer ends.

    The rule: from a `[TOOL_CALLS]` marker on, everything is held; and an answer that opens
    (after whitespace) with `[` then `{`, or with a tool's name then `{`, is held whole. While
    the opening is undecided ("tra" may become "train{"; "[" may become "[{" or the marker)
    nothing is shown yet; once it reads as prose it is shown as it comes, except a tail that
    may be the start of the marker. `rest()` is what was held, for an answer that turned out
    to be no call after all.
    """

    def __init__(self, names: Collection[str]):
        self.names = set(names)
        self.text, self.shown = "", 0
        self.held = self.prose = False

    def feed(self, piece: str) -> str:
        """What of the text so far may be shown now."""
        self.text += piece
        if self.held:
            return ""
        if not self.prose:
            opening = self._opening(self.text.lstrip())
            if opening != "prose":
                self.held = opening == "call"
                return ""
            self.prose = True
        marker = self.text.find(MARKER, self.shown)
        end = marker if marker >= 0 else len(self.text) - _marker_start(self.text)
        self.held = marker >= 0
        out, self.shown = self.text[self.shown:end], max(self.shown, end)
        return out

    def rest(self) -> str:
        return self.text[self.shown:]

    def _opening(self, text: str) -> str:
        """"call", "prose", or "wait" for more text."""
        if text.startswith(MARKER):
            return "call"
        if not text or MARKER.startswith(text):
            return "wait"
        if text[0] == "[":
            after = text[1:].lstrip()
            return "wait" if not after else "call" if after[0] == "{" else "prose"
        word = _WORD.match(text)
        if not word:
            return "prose"
        after = text[word.end():].lstrip()
        if not after:
            return "wait" if any(n.startswith(word.group()) for n in self.names) else "prose"
        return "call" if word.group() in self.names and after[0] == "{" else "prose"


def _marker_start(text: str) -> int:
    """How many characters at the end of `text` could begin the marker."""
    for size in range(min(len(MARKER) - 1, len(text)), 0, -1):
        if MARKER.startswith(text[-size:]):
            return size
    return 0
