"""Fitting a long conversation into the context window, without breaking Mistral's rules."""

from __future__ import annotations

import copy
import json
import re

import pytest

from booth.agent.history import estimate_tokens, fit_history, message_tokens, shorten_arguments
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


def test_oldest_assistant_turns_are_dropped_before_the_users_messages():
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
    # The old answer goes; what the user said stays, both messages of theirs.
    assert messages[2] not in sent
    assert [m["content"] for m in sent if m["role"] == "user"] == [
        messages[1]["content"], messages[3]["content"]]
    assert sent[-1]["role"] == "tool"  # still answering the latest call
    assert "left out the 1 oldest message(s)." in notice
    assert total(sent) <= budget
    check_request(sent, None, MODEL)


def test_the_users_messages_go_last_and_say_so():
    messages = session(rounds=6)
    least, _ = fit_history(messages, 100, 0)  # all that can be left out is left out
    sent, notice = fit_history(messages, total(least) + 502, 500)  # "Hello" is one too many
    assert sent == least
    assert [m["content"] for m in sent if m["role"] == "user"] == [messages[3]["content"]]
    assert ", 1 of them yours" in notice and "still too long" not in notice
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


def oversized_session(exchanges: int = 12, huge: int = 1_000_000) -> list[dict]:
    """A session where the model once sent a 1,000,000-character class_prompt (refused by
    validation, as booth does), then went on with ordinary calls."""
    messages = [SYSTEM]
    for n in range(exchanges):
        prompt = "x" * huge if n == 1 else f"a photo of a dog, take {n}"
        call_id = f"prior{n:04d}"
        messages += [
            {"role": "user", "content": f"Make class images, attempt {n}."},
            {"role": "assistant", "content": f"Priors {n}.", "tool_calls": [
                {"id": call_id, "type": "function", "function": {
                    "name": "generate_priors", "arguments": json.dumps({"class_prompt": prompt,
                                                                        "num_images": 4})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": f"Error: attempt {n} failed."},
        ]
    return messages + [{"role": "user", "content": "Try once more."}]


def test_an_oversized_argument_is_shortened_and_every_user_message_kept():
    messages = oversized_session()
    sent, notice = fit_history(messages, 32_000, 4096)
    assert total(sent) <= 32_000 - 4096
    assert [m for m in sent if m["role"] == "user"] == [
        m for m in messages if m["role"] == "user"]
    assert len(sent) == len(messages)  # shortening the one argument was enough
    arguments = [json.loads(c["function"]["arguments"])
                 for m in sent for c in m.get("tool_calls") or []]
    assert all(isinstance(a, dict) for a in arguments)
    assert arguments[1]["class_prompt"].startswith("x" * 200)
    assert "[shortened: 1000000 chars]" in arguments[1]["class_prompt"]
    assert arguments[1]["num_images"] == 4 and arguments[2] == json.loads(
        messages[8]["tool_calls"][0]["function"]["arguments"])
    assert "shortened the arguments of 1 old tool call turn(s)" in notice
    check_request(sent, None, MODEL)


@pytest.mark.parametrize("arguments", [
    json.dumps({"prompts": ["a dog " * 100] * 5000}),  # long list of long strings
    json.dumps({f"k{i}": i for i in range(20000)}),  # long object: a note instead
    "not json at all " * 100,
    '{"a": ' * 100_000 + "1" + "}" * 100_000,  # nested deeper than Python recurses
])
def test_shortened_arguments_are_always_a_short_json_object(arguments):
    short = shorten_arguments(arguments)
    assert isinstance(json.loads(short), dict) and len(short) < 2000


def test_a_validation_error_quotes_only_an_excerpt_of_an_oversized_value():
    from booth.tools import TOOLS, ToolArgumentError

    with pytest.raises(ToolArgumentError) as caught:
        TOOLS["generate_priors"].validate({"class_prompt": "x" * 1_000_000, "y" * 5000: 1})
    message = str(caught.value)
    assert len(message) < 500
    assert re.search(r"class_prompt: 'x{20,}… \(100000\d characters\) is too long", message)
    assert re.search(r"unknown field\(s\) 'y{20,}… \(500\d characters\)", message)
