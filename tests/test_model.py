"""The endpoint client, through the real openai SDK, against a real HTTP server on loopback."""

from __future__ import annotations

import re
import socket
import time

import pytest
from fakellm import FakeLLM, call, calls, error, hang, reply

from booth.agent.endpoint import OpenAIChatModel
from booth.agent.model import AssistantTurn, EndpointError, ReplayModel, ScriptedModel, ToolCall
from booth.agent.settings import EndpointSettings, resolve_settings
from booth.agent.wire import assistant_message, check_request

ID = re.compile(r"^[a-zA-Z0-9]{9}$")
SECRET = "sk-test-do-not-leak-1234"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "train",
            "description": "Fine-tune the model on a prepared dataset.",
            "parameters": {
                "type": "object",
                "properties": {"steps": {"type": "integer"}, "dataset": {"type": "string"}},
                "required": ["steps"],
            },
        },
    }
]
START = [
    {"role": "system", "content": "You are booth."},
    {"role": "user", "content": "Teach the model my corgi rex."},
]


def model_for(llm: FakeLLM, **options) -> OpenAIChatModel:
    settings = resolve_settings(env={}, base_url=llm.base_url, retry_backoff=0.01, **options)
    return OpenAIChatModel(settings)


def assert_all_requests_valid(llm: FakeLLM) -> None:
    for body in llm.requests:
        check_request(body["messages"], body.get("tools"), body["model"])


def test_streamed_text_arrives_in_several_pieces():
    text = "I will prepare the dataset first, then generate class images."
    with FakeLLM([reply(text)]) as llm:
        pieces: list[str] = []
        turn = model_for(llm).complete(START, TOOLS, on_text=pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == text
    assert turn == AssistantTurn(text, [], "stop")
    body = llm.requests[0]
    assert body["stream"] is True and body["temperature"] == 0.15
    assert body["model"] == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    assert body["tools"] == TOOLS
    assert_all_requests_valid(llm)


def test_streamed_tool_calls_are_assembled_and_the_sent_history_normalized_and_repaired():
    step = calls(
        [
            call("train", '{"steps": 400, "dataset": "rex"}', id="call_0123456789abc"),
            call("train", '{"steps": 10,', id="call_1"),  # cut off: not JSON
        ],
        text="Training now.",
    )
    with FakeLLM([step, reply("Both runs are done.")]) as llm:
        model = model_for(llm)
        turn = model.complete(START, TOOLS)
        # The turn is what the server sent; the message sent back is made valid, once.
        first, second = turn.tool_calls
        assert first == ToolCall("call_0123456789abc", "train", '{"steps": 400, "dataset": "rex"}')
        assert second == ToolCall("call_1", "train", '{"steps": 10,')
        assert turn.content == "Training now." and turn.finish_reason == "tool_calls"

        sent = assistant_message(turn)
        ids = [c["id"] for c in sent["tool_calls"]]
        assert ids[0] == "456789abc" and ID.match(ids[1])
        answers = [{"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids]
        final = model.complete([*START, sent, *answers], TOOLS)
    assert final.content == "Both runs are done."
    history = llm.requests[1]["messages"][2]
    assert [c["id"] for c in history["tool_calls"]] == ids
    assert history["tool_calls"][1]["function"]["arguments"] == "{}"
    assert_all_requests_valid(llm)


def test_non_streaming_path_shows_the_same_text():
    step = calls([call("train", {"steps": 5}, id="abcDEF123")], text="Here goes.")
    with FakeLLM([step, reply("All done.")]) as llm:
        pieces: list[str] = []
        model = model_for(llm, stream=False)
        turn = model.complete(START, TOOLS, on_text=pieces.append)
        final = model.complete(START, TOOLS, on_text=pieces.append)
    assert turn == AssistantTurn(
        "Here goes.", [ToolCall("abcDEF123", "train", '{"steps": 5}')], "tool_calls"
    )
    assert final.content == "All done."
    assert pieces == ["Here goes.", "All done."]  # what streaming would have shown
    assert not llm.requests[0].get("stream")


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retried(status):
    with FakeLLM([error(status, "busy"), reply("Hello.")]) as llm:
        waits: list[float] = []
        model = OpenAIChatModel(
            EndpointSettings(base_url=llm.base_url, model=llm.model), sleep=waits.append
        )
        turn = model.complete(START, TOOLS)
    assert turn.content == "Hello."
    assert len(llm.requests) == 2
    assert waits == [0.01]  # the server's retry-after-ms, not our own backoff


def test_backoff_is_used_when_the_server_names_no_wait():
    with FakeLLM([error(502, "bad gateway", retry_after_ms=None), reply("Hello.")]) as llm:
        waits: list[float] = []
        settings = EndpointSettings(base_url=llm.base_url, model=llm.model, retry_backoff=0.5)
        OpenAIChatModel(settings, sleep=waits.append).complete(START, TOOLS)
    assert len(waits) == 1 and 0.4 <= waits[0] <= 0.6


def test_persistent_server_errors_give_up_with_one_message():
    script = [error(503, "model overloaded")] * 3
    with FakeLLM(script) as llm:
        with pytest.raises(EndpointError) as caught:
            model_for(llm, max_retries=2).complete(START, TOOLS)
    assert len(llm.requests) == 3
    message = str(caught.value)
    assert llm.base_url in message and "HTTP 503" in message
    assert "model overloaded" in message and "tried 3 times" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_silent_server_times_out():
    with FakeLLM([hang(3), hang(3)]) as llm:
        started = time.monotonic()
        with pytest.raises(EndpointError, match=r"did not answer within 0.3 s.*tried 2 times"):
            model_for(llm, timeout=0.3, max_retries=1).complete(START, TOOLS)
        assert time.monotonic() - started < 2.5
    assert len(llm.requests) == 2


def test_endpoint_down_names_the_url_and_how_to_start_vllm():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    model = OpenAIChatModel(resolve_settings(env={}, base_url=url))
    with pytest.raises(EndpointError) as caught:
        model.complete(START, TOOLS)
    message = str(caught.value)
    assert url in message and "vllm serve mistralai/Mistral-Small-3.2-24B-Instruct-2506" in message
    assert "--tool-call-parser mistral" in message and "--base-url" in message
    assert "Traceback" not in message and caught.value.__suppress_context__


def test_a_refused_key_names_the_variables_and_never_the_key():
    with FakeLLM([error(401, "Unauthorized")]) as llm:
        model = model_for(llm, api_key=SECRET)
        with pytest.raises(EndpointError) as caught:
            model.complete(START, TOOLS)
    message = str(caught.value)
    assert "HTTP 401" in message and "BOOTH_API_KEY" in message and "MISTRAL_API_KEY" in message
    assert SECRET not in message
    assert llm.headers[0]["authorization"] == f"Bearer {SECRET}"  # it was sent, as a header
    assert SECRET not in str(llm.requests) and len(llm.requests) == 1  # and never retried


def test_an_unknown_model_says_which_and_where_to_look():
    with FakeLLM([reply("unused")], models=["mistral-small3.2:24b"]) as llm:
        with pytest.raises(EndpointError) as caught:
            model_for(llm, model="mistral-small-2506").complete(START, TOOLS)
    message = str(caught.value)
    assert "'mistral-small-2506'" in message and f"{llm.base_url}/models" in message
    assert "does not exist" in message and "--model" in message


def test_a_bad_request_shows_the_servers_message():
    reason = "This model's maximum context length is 32768 tokens."
    with FakeLLM([error(400, reason)]) as llm:
        with pytest.raises(EndpointError, match="HTTP 400.*maximum context length is 32768"):
            model_for(llm).complete(START, TOOLS)
    assert len(llm.requests) == 1


def test_a_request_breaking_mistrals_rules_is_never_sent():
    unanswered = [*START, {"role": "assistant", "content": "Let me think."}]
    with FakeLLM([reply("unused")]) as llm:
        with pytest.raises(EndpointError, match="did not send.*last message"):
            model_for(llm).complete(unanswered, TOOLS)
    assert llm.requests == []


def test_sampling_settings_reach_the_server_as_each_provider_takes_them():
    options = dict(top_p=0.9, max_tokens=512, frequency_penalty=0.2, presence_penalty=0.1,
                   repetition_penalty=1.05, temperature=0.3)
    bodies = {}
    for provider in ("vllm", "llamacpp", "ollama"):
        with FakeLLM([reply("ok")]) as llm:
            model_for(llm, provider=provider, **options).complete(START, TOOLS)
        bodies[provider] = llm.requests[0]
    for body in bodies.values():
        assert (body["top_p"], body["max_tokens"], body["temperature"]) == (0.9, 512, 0.3)
        assert (body["frequency_penalty"], body["presence_penalty"]) == (0.2, 0.1)
    assert bodies["vllm"]["repetition_penalty"] == 1.05
    assert bodies["llamacpp"]["repeat_penalty"] == 1.05
    assert "repetition_penalty" not in bodies["ollama"]
    assert "repeat_penalty" not in bodies["ollama"]


def test_unset_sampling_parameters_are_not_sent():
    with FakeLLM([reply("ok")]) as llm:
        model_for(llm).complete(START, [])
    body = llm.requests[0]
    assert "tools" not in body and "top_p" not in body and "max_tokens" not in body


# --- settings --------------------------------------------------------------------------------


def test_default_is_a_local_vllm_with_mistral_small_3_2():
    settings = resolve_settings(env={})
    assert settings.provider == "vllm" and settings.base_url == "http://localhost:8000/v1"
    assert settings.model == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    assert settings.api_key == "EMPTY" and settings.temperature == 0.15
    assert settings.context_window == 131072 and settings.stream and settings.max_retries == 3


def test_a_mistral_key_is_used_for_mistrals_api_and_never_sent_elsewhere():
    local = resolve_settings(env={"MISTRAL_API_KEY": SECRET})
    assert local.provider == "vllm" and local.api_key == "EMPTY"
    settings = resolve_settings(env={"MISTRAL_API_KEY": SECRET}, provider="mistral")
    assert settings.base_url == "https://api.mistral.ai/v1"
    assert settings.model == "mistral-small-latest" and settings.api_key == SECRET


def test_flags_beat_environment_beats_preset():
    env = {"BOOTH_BASE_URL": "http://gpu-box:8000/v1/", "BOOTH_MODEL": "env-model",
           "BOOTH_API_KEY": "env-key"}
    from_env = resolve_settings(env=env)
    assert (from_env.base_url, from_env.model, from_env.api_key) == (
        "http://gpu-box:8000/v1", "env-model", "env-key")
    flags = resolve_settings(env=env, base_url="http://other:9000/v1", model="flag-model",
                             api_key="flag-key", temperature=0.5, max_tokens=None)
    assert (flags.base_url, flags.model, flags.api_key) == (
        "http://other:9000/v1", "flag-model", "flag-key")
    assert flags.temperature == 0.5 and flags.max_tokens is None


def test_provider_presets_and_guesses():
    ollama = resolve_settings(env={}, provider="ollama")
    assert ollama.base_url == "http://localhost:11434/v1" and ollama.model.startswith(
        "mistral-small3.2")
    assert ollama.context_window < 131072
    assert resolve_settings(env={}, provider="llamacpp").base_url == "http://localhost:8080/v1"
    assert resolve_settings(env={}, base_url="http://box:11434/v1").provider == "ollama"
    guessed = resolve_settings(env={"MISTRAL_API_KEY": SECRET},
                               base_url="https://api.mistral.ai/v1")
    assert guessed.provider == "mistral" and guessed.api_key == SECRET
    assert resolve_settings(env={}, provider="ollama", context_window=32768).context_window == 32768


def test_a_mistral_key_is_never_handed_to_another_server():
    settings = resolve_settings(env={"MISTRAL_API_KEY": SECRET}, provider="vllm")
    assert settings.api_key == "EMPTY"
    # Not even when the provider says mistral but the URL points elsewhere.
    with pytest.raises(EndpointError, match="only sent to api.mistral.ai"):
        resolve_settings(env={"MISTRAL_API_KEY": SECRET, "BOOTH_PROVIDER": "mistral"},
                         base_url="http://other.example/v1")


def test_a_password_in_the_url_never_reaches_a_message():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAIChatModel(resolve_settings(env={}, base_url=f"http://bob:s3cretpw@127.0.0.1:{port}/v1"))
    with pytest.raises(EndpointError) as caught:
        model.complete(START, TOOLS)
    assert "s3cretpw" not in str(caught.value)
    assert f"http://127.0.0.1:{port}/v1" in str(caught.value)


def test_settings_mistakes_are_clear():
    with pytest.raises(EndpointError, match="MISTRAL_API_KEY"):
        resolve_settings(env={}, provider="mistral")
    with pytest.raises(EndpointError, match="vllm, ollama, llamacpp, mistral"):
        resolve_settings(env={}, provider="openrouter")


def test_describe_and_repr_never_show_the_key():
    settings = resolve_settings(env={"MISTRAL_API_KEY": SECRET}, provider="mistral", top_p=0.9)
    line = settings.describe()
    assert "mistral-small-latest" in line and "https://api.mistral.ai/v1" in line
    assert "temperature 0.15" in line and "top_p 0.9" in line and "key set" in line
    assert SECRET not in line and SECRET not in repr(settings)
    hidden = resolve_settings(env={}, base_url="http://me:hunter2@box:8000/v1").describe()
    assert "hunter2" not in hidden and "box:8000" in hidden


# --- models without an endpoint -----------------------------------------------------------------


def test_scripted_and_replay_models_answer_in_order_then_say_they_are_done():
    turns = [AssistantTurn("one"), AssistantTurn("two")]
    for cls in (ScriptedModel, ReplayModel):
        model = cls(turns)
        shown: list[str] = []
        assert model.complete(START, TOOLS, on_text=shown.append).content == "one"
        assert model.complete(START, TOOLS).content == "two"
        assert shown == ["one"]
        with pytest.raises(EndpointError, match="no more recorded|no turn left"):
            model.complete(START, TOOLS)


def test_each_preset_assumes_the_window_its_start_hint_gives_the_server():
    import re

    from booth.agent.settings import PRESETS

    for name in ("ollama", "llamacpp"):
        preset = PRESETS[name]
        started = re.search(r"(?:OLLAMA_CONTEXT_LENGTH=|-c )(\d+)", preset.start_hint)
        assert started and int(started.group(1)) == preset.context_window, name


@pytest.mark.parametrize("url", ["http://localhost:80x0/v1", "http://[abc/v1", "ftp://host/v1",
                                 "localhost:8000/v1"])
def test_a_mistyped_base_url_is_a_clear_error(url):
    from booth.agent.model import EndpointError
    from booth.agent.settings import resolve_settings

    with pytest.raises(EndpointError, match="is not an http"):
        resolve_settings(env={}, base_url=url)
