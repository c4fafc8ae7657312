"""Fitting a long conversation into the context window, without breaking Mistral's rules."""

from __future__ import annotations

import copy
import json

import pytest

from booth.agent.history import estimate_tokens, fit_history, message_tokens
from booth.agent.wire import check_request

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
SYSTEM = {"role": "system", "content": "You are booth. Workspace: datasets rex; runs none."}


def tool_round(n: int, output_chars: int) -> list[dict]:
    call_id = f"call{n:05d}"
    log = json.dumps({"step": n, "losses": [round(0.1 + i / 1000, 4) for i in range(400)]})
    return [
        {
            "role": "assistant",
            "content": f"Step {n}.",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "train", "arguments": json.dumps({"steps": n})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": log[:output_chars]},
    ]


def session(rounds: int = 4, output_chars: int = 2000) -> list[dict]:
    """A long session: an early exchange, then one goal worked through many tool rounds."""
    messages = [
        SYSTEM,
        {"role": "user", "content": "Hello, what can you do?"},
        {"role": "assistant", "content": "I fine-tune Stable Diffusion on your photos. " * 20},
        {"role": "user", "content": "Teach it my corgi rex, then show him as an astronaut."},
    ]
    for n in range(1, rounds + 1):
        messages += tool_round(n, output_chars)
    return messages


def total(messages: list[dict]) -> int:
    return sum(message_tokens(m) for m in messages)


def test_a_conversation_that_fits_is_sent_as_is():
    messages = session()
    sent, notice = fit_history(messages, 128_000, 4096)
    assert sent == messages and notice is None


def test_oldest_tool_outputs_are_shortened_first():
    messages = session(rounds=3)
    before = copy.deepcopy(messages)
    budget = total(messages) - 100  # one shortened output is enough
    sent, notice = fit_history(messages, budget + 1000, 1000)
    assert messages == before  # the caller's history is untouched
    assert len(sent) == len(messages)
    outputs = [m["content"] for m in sent if m["role"] == "tool"]
    assert outputs[0].endswith("[output shortened: 2000 chars]")
    assert outputs[0].startswith(before[5]["content"][:200])
    assert outputs[1:] == [before[7]["content"], before[9]["content"]]
    assert "shortened 1 old tool output" in notice
    assert total(sent) <= budget


def test_oldest_exchanges_are_dropped_whole_when_shortening_is_not_enough():
    messages = session(rounds=6)
    shortened = [
        {**m, "content": m["content"][:200] + "\n[output shortened: 2000 chars]"}
        if m["role"] == "tool"
        else m
        for m in messages
    ]
    budget = total(shortened) - 50  # every output shortened is not quite enough
    sent, notice = fit_history(messages, budget + 500, 500)
    assert sent[0] == SYSTEM
    assert messages[3] in sent  # the user's latest message
    assert "Hello, what can you do?" not in [m["content"] for m in sent]
    assert sent[-1]["role"] == "tool"  # still answering the latest call
    assert "left out the 2 oldest message(s)" in notice
    assert total(sent) <= budget
    check_request(sent, None, MODEL)


@pytest.mark.parametrize("window", [200, 800, 1500, 3000, 6000, 20000])
def test_whatever_the_budget_the_result_keeps_mistrals_rules(window):
    messages = session(rounds=8)
    sent, notice = fit_history(messages, window, 100)
    check_request(sent, None, MODEL)  # no call separated from its answer, ends with a tool
    assert sent[0] == SYSTEM and messages[3] in sent
    assert notice or total(messages) <= window - 100
    if total(sent) > window - 100:
        assert "still too long" in notice


def test_estimates_count_digits_and_non_latin_text_as_dearer():
    prose = "Teach the model my corgi, then show him as an astronaut on the moon."
    assert 10 < estimate_tokens(prose) < 25
    assert estimate_tokens("0.1234 0.2345 0.3456") > estimate_tokens("loss went down nicely")
    assert estimate_tokens("宇宙飛行士のコーギー") >= 8
    assert estimate_tokens({"steps": 800}) == estimate_tokens('{"steps": 800}')
