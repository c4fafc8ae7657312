"""Keep the conversation inside the model's context window.

The whole conversation is sent on every turn, so a long session (many tool outputs, a
training log or two) eventually outgrows the window. `fit_history` makes it fit the way that
loses least: first the OLDEST tool outputs are shortened to their first lines (what the model
needs from an old output is mostly that it happened), then, only if that is not enough, the
oldest exchanges are dropped whole. The system prompt — which carries the live state of the
workspace — and the user's latest message are never dropped, and an assistant's tool calls
are never separated from their answers (Mistral refuses such a history).

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
KEEP_CHARS = 200  # what a shortened tool output keeps of its beginning
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
    shortened, saved_chars = _shorten_tool_outputs(kept, sizes, budget)
    dropped = _drop_oldest(kept, sizes, budget)
    notice = _notice(shortened, saved_chars, dropped, sum(sizes) > budget, context_window)
    return [m for m in kept if m is not None], notice


def _shorten_tool_outputs(kept: list, sizes: list[int], budget: int) -> tuple[int, int]:
    """Shorten tool outputs oldest first until the total fits; (count, characters removed)."""
    count = removed = 0
    for index, message in enumerate(kept):
        if sum(sizes) <= budget:
            break
        content = message.get("content")
        if message.get("role") != "tool" or not isinstance(content, str):
            continue
        if len(content) <= SHORTEN_ABOVE:
            continue
        short = f"{content[:KEEP_CHARS]}\n[output shortened: {len(content)} chars]"
        kept[index] = {**message, "content": short}
        sizes[index] = message_tokens(kept[index])
        count += 1
        removed += len(content) - len(short)
    return count, removed


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


def _drop_oldest(kept: list, sizes: list[int], budget: int) -> int:
    """Drop whole units oldest first (a user message takes its exchange with it) until the
    total fits. Never the system prompt, the last user message, or the latest unit."""
    units = _units(kept)
    user_units = [u for u in units if kept[u[0]].get("role") == "user"]
    protected = {id(units[-1])} | ({id(user_units[-1])} if user_units else set())
    dropped = 0
    for position, unit in enumerate(units):
        if sum(sizes) <= budget:
            break
        if id(unit) in protected or kept[unit[0]] is None:
            continue
        if kept[unit[0]].get("role") == "system":
            continue
        for drop in _exchange(units, position, kept, protected):
            for index in drop:
                dropped += 1
                kept[index], sizes[index] = None, 0
    return dropped


def _exchange(units: list[list[int]], position: int, kept: list, protected: set) -> list:
    """The unit at `position` and, for a user message, the replies up to the next user one."""
    group = [units[position]]
    if kept[units[position][0]].get("role") != "user":
        return group
    for unit in units[position + 1 :]:
        if id(unit) in protected or kept[unit[0]].get("role") in ("user", "system"):
            break
        group.append(unit)
    return group


def _notice(shortened: int, saved: int, dropped: int, still_over: bool, window: int) -> str:
    parts = []
    if shortened:
        parts.append(f"shortened {shortened} old tool output(s) by {saved} characters")
    if dropped:
        parts.append(f"left out the {dropped} oldest message(s)")
    if not parts:
        return (
            f"The conversation is longer than the model's {window}-token context window and "
            "nothing more can be left out; the endpoint may refuse it."
        )
    text = f"To fit the model's {window}-token context window, booth " + " and ".join(parts)
    if still_over:
        text += "; the conversation is still too long, the endpoint may refuse it"
    return text + "."
