"""Mistral's wire rules: ids, arguments, and the offline request check."""

from __future__ import annotations

import json
import re

import pytest

from booth.agent.model import AssistantTurn, ToolCall
from booth.agent.wire import (
    WireError,
    assistant_message,
    check_request,
    new_call_id,
    normalize_call_id,
    repair_arguments,
    used_call_ids,
)

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
ID = re.compile(r"^[a-zA-Z0-9]{9}$")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "train",
            "description": "Fine-tune the model.",
            "parameters": {
                "type": "object",
                "properties": {"steps": {"type": "integer", "minimum": 1}},
                "required": ["steps"],
                "additionalProperties": False,
            },
        },
    }
]


def conversation(call_id: str = "abcDEF123") -> list[dict]:
    return [
        {"role": "system", "content": "You are booth."},
        {"role": "user", "content": "Train rex."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "train", "arguments": '{"steps": 10}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"loss": 0.1}'},
    ]


def test_new_ids_are_nine_letters_or_digits_and_random():
    ids = {new_call_id() for _ in range(200)}
    assert all(ID.match(i) for i in ids)
    assert len(ids) == 200


def test_normalize_keeps_valid_ids_cuts_long_ones_like_vllm_and_replaces_the_rest():
    used: set[str] = set()
    assert normalize_call_id("abcDEF123", used) == "abcDEF123"
    assert normalize_call_id("call_0123456789abc", used) == "456789abc"
    for raw in ("call_1", "", None, "abc-def-ghi", "ab cd efgh"):
        assert ID.match(normalize_call_id(raw, used))
    assert len(used) == 7


def test_normalize_keeps_ids_unique_in_the_conversation():
    used = {"abcDEF123"}
    again = normalize_call_id("abcDEF123", used)
    assert ID.match(again) and again != "abcDEF123"
    assert again in used


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ('{"steps": 10}', '{"steps": 10}'),
        ('{ "steps":10 ,"name":"rex" }', '{"steps": 10, "name": "rex"}'),
        ('{"prompt": "chien sur la lune, été"}', '{"prompt": "chien sur la lune, été"}'),
        ('{"steps": 10,', "{}"),  # cut off mid-object
        ("[1, 2]", "{}"),
        ('"steps"', "{}"),
        ("", "{}"),
        (None, "{}"),
        ({"steps": 3}, '{"steps": 3}'),
    ],
)
def test_repair_arguments_always_gives_a_json_object_text(raw, sent):
    assert repair_arguments(raw) == sent
    assert isinstance(json.loads(repair_arguments(raw)), dict)


def test_assistant_message_repairs_arguments_and_normalizes_ids():
    turn = AssistantTurn(
        content="",
        tool_calls=[
            ToolCall("call_0123456789abc", "train", '{"steps": 10,'),
            ToolCall("x", "train", '{"steps": 5}'),
        ],
    )
    message = assistant_message(turn)
    assert message["role"] == "assistant" and message["content"] is None
    first, second = message["tool_calls"]
    assert first["id"] == "456789abc" and first["function"]["arguments"] == "{}"
    assert ID.match(second["id"]) and second["function"]["arguments"] == '{"steps": 5}'
    assert turn.tool_calls[0].arguments == '{"steps": 10,'  # the raw text is left for the loop
    answers = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in (first, second)]
    check_request([*conversation()[:2], message, *answers], TOOLS, MODEL)


def test_assistant_message_makes_hallucinated_tool_names_sendable():
    turn = AssistantTurn(tool_calls=[ToolCall("abcDEF123", "train model!", "{}")])
    message = assistant_message(turn)
    assert message["tool_calls"][0]["function"]["name"] == "train_model_"
    answer = {"role": "tool", "tool_call_id": "abcDEF123", "content": "Error: unknown tool"}
    check_request([*conversation()[:2], message, answer], TOOLS, MODEL)


def test_assistant_message_text_and_empty_turns_are_accepted():
    for turn in (AssistantTurn("Done: 3 samples saved."), AssistantTurn("")):
        message = assistant_message(turn)
        assert "tool_calls" not in message and isinstance(message["content"], str)
        check_request([*conversation(), message, {"role": "user", "content": "thanks"}], [], MODEL)


def test_a_good_conversation_passes():
    check_request(conversation(), TOOLS, MODEL)
    check_request(conversation()[:2], TOOLS, MODEL)


def test_a_bad_tool_call_id_is_refused():
    with pytest.raises(WireError, match="9 letters or digits"):
        check_request(conversation("call_123"), TOOLS, MODEL)


def test_a_tool_call_left_unanswered_is_refused():
    with pytest.raises(WireError, match=r"train \(abcDEF123\) left without a tool message"):
        check_request([*conversation()[:3], {"role": "user", "content": "go on"}], TOOLS, MODEL)


def test_an_assistant_turn_after_an_unanswered_call_is_refused():
    messages = conversation()[:3] + [
        {"role": "assistant", "content": "I trained it."},
        {"role": "user", "content": "show me"},
    ]
    with pytest.raises(WireError, match="before the next assistant turn"):
        check_request(messages, TOOLS, MODEL)


def test_the_last_message_must_be_user_or_tool():
    messages = [*conversation(), {"role": "assistant", "content": "Done."}]
    with pytest.raises(WireError, match="last message"):
        check_request(messages, TOOLS, MODEL)


def test_an_answer_to_an_unknown_call_is_refused():
    messages = [*conversation(), {"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "?"}]
    with pytest.raises(WireError, match="zzzzzzzzz"):
        check_request(messages, TOOLS, MODEL)


def test_arguments_that_are_not_a_json_object_are_refused():
    messages = conversation()
    messages[2]["tool_calls"][0]["function"]["arguments"] = '{"steps": 10,'
    with pytest.raises(WireError, match="repair_arguments"):
        check_request(messages, TOOLS, MODEL)


def test_mistral_common_checks_schemas_and_names():
    bad_schema = [{"type": "function", "function": {"name": "t", "parameters": {"type": "obj"}}}]
    with pytest.raises(WireError, match="Invalid tool schema"):
        check_request(conversation()[:2], bad_schema, MODEL)
    messages = conversation()
    messages[2]["tool_calls"][0]["function"]["name"] = "train model"
    with pytest.raises(WireError, match="Function name"):
        check_request(messages, TOOLS, MODEL)
    with pytest.raises(WireError, match="lacks the field"):
        check_request([{"role": "user"}], TOOLS, MODEL)


def test_booths_own_tool_schemas_pass_mistral_common():
    tools_package = pytest.importorskip("booth.tools")
    specs = [t.openai_spec() for t in tools_package.TOOLS.values()]
    assert specs
    check_request(conversation()[:2], specs, MODEL)


def test_arguments_nested_too_deep_are_repaired_not_raised():
    deep = "[" * 5000 + "]" * 5000
    assert repair_arguments(deep) == "{}"
    nested: dict = {}
    for _ in range(5000):
        nested = {"a": nested}
    assert repair_arguments(nested) == "{}"


def test_used_call_ids_gathers_calls_and_answers_and_ignores_junk():
    messages = [
        {"role": "assistant", "tool_calls": [{"id": "abcDEF123"}, {"id": None}, "junk"]},
        {"role": "tool", "tool_call_id": "zzzZZZ999"},
        {"role": "tool", "tool_call_id": 5},
    ]
    assert used_call_ids(messages) == {"abcDEF123", "zzzZZZ999"}
    turn = AssistantTurn("", [ToolCall("abcDEF123", "train", "{}")])
    assert assistant_message(turn, used_call_ids(messages))["tool_calls"][0]["id"] != "abcDEF123"
