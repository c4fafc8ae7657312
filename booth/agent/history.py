"""Keep the conversation inside the model's context window.

The whole conversation is sent on every turn, so a long session (many tool outputs, a
training log or two, an oversized argument) eventually outgrows the window. `fit_history`
makes it fit the way that loses least: first, oldest first, long tool outputs are shortened to
their beginning and long call arguments have their long values cut (what the model needs
from an old call is mostly that it happened; the arguments stay a JSON object, because vLLM
parses them again); then, only if that is not enough, the oldest assistant turns are dropped
with their answers, and the user's own messages last of all. The system prompt — which
carries the live state of the workspace — and the user's latest message are never dropped,
and an assistant's tool calls are never separated from their answers (Mistral refuses such a
history).

Token counts are ESTIMATES. mistral-common ships only older tokenizers, not Small 3.2's own
(so its counts are approximations too) and loading one costs ~1.4 s. The estimate below was
calibrated against its tekken tokenizer: English prose ~4.3 characters per token, French ~4,
Japanese ~1.6, and JSON full of numbers ~1.4, because digits and punctuation are mostly a
token each. Counting digits and non-ASCII characters as ~1 token, other punctuation as 0.9
and the remaining letters at 3.8 per token landed within -13%..+28% of it on those texts;
leave a margin in `reserve_tokens` accordingly.
"""

from __future__ import annotations

import json
from typing import Any

MESSAGE_OVERHEAD = 5  # role and control tokens around each message
KEEP_CHARS = 200  # what a shortened tool output or argument string keeps of its beginning
KEEP_ITEMS = 8  # what a shortened argument list keeps of its items
SHORTEN_ABOVE = 400  # outputs shorter than this are not worth shortening


def estimate_tokens(value: Any) -> int:
    """Estimated token count of a text, or of any JSON-able value (e.g. the tool schemas)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    digits = non_ascii = punctuation = 0
    for char in text:
        if char.isdigit():
            digits += 1
        elif not char.isascii():
            non_ascii += 1
        elif not char.isalnum() and not char.isspace():
            punctuation += 1
    letters = len(text) - digits - non_ascii - punctuation
    return int(digits + 0.8 * non_ascii + 0.9 * punctuation + letters / 3.8) + 1


def message_tokens(message: dict) -> int:
    """Estimated tokens of one chat message, tool calls included."""
    total = MESSAGE_OVERHEAD
    content = message.get("content")
    if content:
        total += estimate_tokens(content)
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        total += estimate_tokens(function.get("name", "")) + 10  # id and call markers
        total += estimate_tokens(function.get("arguments") or "")
    return total


def fit_history(
    messages: list[dict], context_window: int, reserve_tokens: int
) -> tuple[list[dict], str | None]:
    """The messages to send so that they fit `context_window - reserve_tokens`, and a notice
    for the user saying what was shortened or dropped (None when nothing was).

    `reserve_tokens` must cover the reply (max_tokens) and the tool schemas sent beside the
    messages (`estimate_tokens(tools)`). The input list and its messages are not modified.
    If even the minimal history does not fit, it is returned anyway and the notice says so.
    """
    budget = context_window - reserve_tokens
    sizes = [message_tokens(m) for m in messages]
    if sum(sizes) <= budget:
        return list(messages), None
    kept = list(messages)
    shortened = _shorten_oldest(kept, sizes, budget)
    dropped = _drop_oldest(kept, sizes, budget)
    notice = _notice(shortened, dropped, sum(sizes) > budget, context_window)
    return [m for m in kept if m is not None], notice


def _shorten_oldest(kept: list, sizes: list[int], budget: int) -> dict[str, list[int]]:
    """Shorten long tool outputs and call arguments oldest first until the total fits;
    {"outputs"|"arguments": [count, characters removed]}."""
    done = {"outputs": [0, 0], "arguments": [0, 0]}
    for index, message in enumerate(kept):
        if sum(sizes) <= budget:
            break
        short, kind = _shortened(message)
        if short is None:
            continue
        removed = _chars(message) - _chars(short)
        kept[index], sizes[index] = short, message_tokens(short)
        done[kind][0] += 1
        done[kind][1] += removed
    return done


def _shortened(message: dict) -> tuple[dict | None, str]:
    """`message` with its long tool output or long call arguments cut (None: nothing long)."""
    content = message.get("content")
    if message.get("role") == "tool" and isinstance(content, str):
        if len(content) <= SHORTEN_ABOVE:
            return None, ""
        short = f"{content[:KEEP_CHARS]}\n[output shortened: {len(content)} chars]"
        return {**message, "content": short}, "outputs"
    calls = message.get("tool_calls") or []
    if not any(len(_arguments(c)) > SHORTEN_ABOVE for c in calls):
        return None, ""
    cut = [{**c, "function": {**c["function"], "arguments": shorten_arguments(_arguments(c))}}
           if len(_arguments(c)) > SHORTEN_ABOVE else c for c in calls]
    return {**message, "tool_calls": cut}, "arguments"


def _arguments(call: dict) -> str:
    return (call.get("function") or {}).get("arguments") or ""


def _chars(message: dict) -> int:
    content = message.get("content")
    return len(content or "") + sum(len(_arguments(c)) for c in message.get("tool_calls") or [])


def shorten_arguments(text: str) -> str:
    """Call arguments (a JSON object text) with each long string cut to its beginning and
    each long list to its first items: still a JSON object, as vLLM parses them again. An
    object that stays long, or a text that is no JSON object, becomes a note saying so."""
    try:
        value = json.loads(text)
        short = json.dumps(_cut(value), ensure_ascii=False) if isinstance(value, dict) else ""
    except (ValueError, RecursionError):  # a model can nest thousands of levels deep
        short = ""
    if short and len(short) <= 4 * SHORTEN_ABOVE:
        return short
    return json.dumps({"booth_note": f"arguments shortened: {len(text)} chars"})


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > KEEP_CHARS:
        return f"{value[:KEEP_CHARS]}… [shortened: {len(value)} chars]"
    if isinstance(value, list):
        items = [_cut(v) for v in value[:KEEP_ITEMS]]
        return items + ([f"… [{len(value) - KEEP_ITEMS} more items]"]
                        if len(value) > KEEP_ITEMS else [])
    if isinstance(value, dict):
        return {key: _cut(v) for key, v in value.items()}
    return value


def _units(messages: list) -> list[list[int]]:
    """Indices grouped so that no unit splits a tool call from its answers: each system or
    user message alone; each assistant message with the tool messages that follow it."""
    units: list[list[int]] = []
    for index, message in enumerate(messages):
        if message.get("role") == "tool" and units:
            units[-1].append(index)
        else:
            units.append([index])
    return units


def _drop_oldest(kept: list, sizes: list[int], budget: int) -> tuple[int, int]:
    """Drop whole units until the total fits: the oldest assistant turns (each with its tool
    answers) first, then, only if that is not enough, the oldest user messages. Never the
    system prompt, the last user message, or the latest unit. (messages dropped, of them
    the user's)."""
    units = _units(kept)
    user_units = [u for u in units if kept[u[0]].get("role") == "user"]
    protected = {id(units[-1])} | ({id(user_units[-1])} if user_units else set())
    dropped = users = 0
    for users_too in (False, True):
        for unit in units:
            if sum(sizes) <= budget:
                return dropped, users
            role = kept[unit[0]].get("role") if kept[unit[0]] is not None else None
            if id(unit) in protected or role in (None, "system") or (role == "user") != users_too:
                continue
            for index in unit:
                kept[index], sizes[index] = None, 0
            dropped += len(unit)
            users += role == "user"
    return dropped, users


def _notice(shortened: dict[str, list[int]], dropped: tuple[int, int], still_over: bool,
            window: int) -> str:
    parts = []
    (outputs, output_chars), (calls, argument_chars) = shortened["outputs"], shortened["arguments"]
    if outputs:
        parts.append(f"shortened {outputs} old tool output(s) by {output_chars} characters")
    if calls:
        parts.append(f"shortened the arguments of {calls} old tool call turn(s) by "
                     f"{argument_chars} characters")
    if dropped[0]:
        yours = f", {dropped[1]} of them yours" if dropped[1] else ""
        parts.append(f"left out the {dropped[0]} oldest message(s){yours}")
    if not parts:
        return (
            f"The conversation is longer than the model's {window}-token context window and "
            "nothing more can be left out; the endpoint may refuse it."
        )
    text = f"To fit the model's {window}-token context window, booth " + " and ".join(parts)
    if still_over:
        text += "; the conversation is still too long, the endpoint may refuse it"
    return text + "."
