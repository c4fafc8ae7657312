"""Hostile servers: what a broken endpoint or a malformed call does to the model client and to
a real Session (tests/fakellm.py on loopback, the real openai SDK). Nothing from the network
may raise out of Session.send, run a call, or show a secret."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path
from typing import Annotated

import pytest
from fakellm import FakeLLM, broken, call, calls, error, hang, message, raw, reply, trickle
from rich.console import Console

from booth.agent import endpoint
from booth.agent.approval import AutoApprove
from booth.agent.endpoint import OpenAIChatModel
from booth.agent.loop import Session
from booth.agent.masking import Masker
from booth.agent.model import AssistantTurn, EndpointError, ScriptedModel, ToolCall
from booth.agent.settings import EndpointSettings, resolve_settings
from booth.agent.transcript import TranscriptWriter, make_header, read_transcript
from booth.agent.ui import ChatUI
from booth.agent.wire import check_request
from booth.tools import ToolContext
from booth.tools.registry import Param, tool

KEY = "sk-live-0123456789abcdef"
START = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
RAN: list[dict] = []


@tool
def note(ctx, text: Annotated[str, Param("what to note")]) -> dict:
    """Write nothing anywhere; count that it ran."""
    RAN.append({"text": text})
    return {"noted": text}


TOOLS = {"note": note}
SPECS = [note.openai_spec()]


@pytest.fixture(autouse=True)
def _nothing_ran_yet():
    RAN.clear()


def model_for(llm: FakeLLM, **options) -> OpenAIChatModel:
    options = {"retry_backoff": 0.01, "max_retries": 1, **options}
    return OpenAIChatModel(resolve_settings(env={}, base_url=llm.base_url, **options))


def session_for(llm: FakeLLM, tmp_path: Path, *, stream: bool = True, api_key: str = "EMPTY",
                base_url: str | None = None, **options) -> Session:
    options = {"retry_backoff": 0.01, "max_retries": 1, **options}
    settings = EndpointSettings(base_url=base_url or llm.base_url, model=llm.model,
                                stream=stream, api_key=api_key, **options)
    ui = ChatUI(Console(file=io.StringIO(), width=200, color_system=None))
    header = make_header(model=settings.model, endpoint=settings.describe(), sampling={},
                         tools=SPECS, system_prompt="You are booth.")
    writer = TranscriptWriter.create(tmp_path / "t.jsonl", header, secrets=settings.secrets())
    ctx = ToolContext.from_options(workspace=str(tmp_path / "ws"), base_model=str(tmp_path),
                                   console=Console(file=io.StringIO()))
    return Session(OpenAIChatModel(settings), ctx, AutoApprove(ui=ui),
                   system_prompt="You are booth.", transcript=writer, ui=ui, tools=TOOLS)


def shown(session: Session) -> str:
    return session.ui.console.file.getvalue()


def events(tmp_path: Path, kind: str) -> list[dict]:
    return [e for e in read_transcript(tmp_path / "t.jsonl")[1] if e["type"] == kind]


NOTE = call("note", {"text": "x"})
BROKEN_REPLIES = {
    "garbage SSE line": raw('data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
                            "data: {this is not json\n\n"),
    "not UTF-8": raw(b'data: {"choices": [{"index": 0, "delta": {"content": "caf\xe9"}}]}\n\n'),
    "HTML page": raw("<html><body>Please log in</body></html>", "text/html"),
    "cut before finishing": broken(reply("I will start"), "cut"),
    "[DONE] without finish_reason": broken(reply("Half"), "no_finish"),
    "empty choices": broken(reply("Hello there"), "empty_choices"),
    "error event before any tool delta": broken(reply("I will note"), "error_event"),
    "tool call cut off": broken(NOTE, "cut"),
    "empty answer": reply(""),
}


@pytest.mark.parametrize("kind", list(BROKEN_REPLIES))
def test_a_broken_streamed_reply_is_retried_then_one_clear_error(kind):
    step = BROKEN_REPLIES[kind]
    with FakeLLM([step, step]) as llm:
        with pytest.raises(EndpointError) as caught:
            model_for(llm).complete(START, SPECS)
    assert len(llm.requests) == 2  # retried once, as max_retries says
    text = str(caught.value)
    assert f"{llm.base_url} sent a broken answer" in text and "tried 2 times" in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


BROKEN_BODIES = {
    "not JSON": raw("Internal proxy hiccup", "text/plain"),
    "not UTF-8": raw(b'{"choices": [{"message": {"content": "caf\xe9"}}]}', "application/json"),
    "HTML page": raw("<html>502 Bad Gateway</html>", "text/html"),
    "no choices": raw('{"choices": []}', "application/json"),
    "a list": raw("[1, 2]", "application/json"),
    "message null": message(None),
    "empty message": message({"role": "assistant", "content": None}, "stop"),
}


@pytest.mark.parametrize("kind", list(BROKEN_BODIES))
def test_a_broken_whole_reply_is_retried_then_one_clear_error(kind):
    step = BROKEN_BODIES[kind]
    with FakeLLM([step, reply("Recovered.")]) as llm:
        turn = model_for(llm, stream=False).complete(START, SPECS)
    assert turn.content == "Recovered." and len(llm.requests) == 2


def test_a_stream_with_finish_reason_but_no_done_is_a_whole_answer():
    with FakeLLM([broken(reply("All there."), "no_done")]) as llm:
        assert model_for(llm).complete(START, SPECS).content == "All there."


def test_a_call_from_an_unfinished_stream_never_runs_and_the_chat_goes_on(tmp_path):
    # (an error event after tool deltas is asked again unstreamed: test_text_calls.py)
    script = [broken(NOTE, "cut"), broken(reply("I will"), "error_event"),
              reply("Sorry, go on?")]
    with FakeLLM(script) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("note x") is False
        assert session.send("again")
    assert RAN == []
    (failure,) = events(tmp_path, "endpoint_error")
    assert "sent a broken answer" in failure["error"] and "CUDA out of memory" in failure["error"]
    assert "Traceback" not in shown(session) and "Sorry, go on?" in shown(session)
    for body in llm.requests:
        check_request(body["messages"], body.get("tools"), body["model"])


MALFORMED_CALLS = {
    "function null": {"tool_calls": [{"id": "abcDEF123", "type": "function", "function": None}]},
    "function missing": {"tool_calls": [{"id": "abcDEF123", "type": "function"}]},
    "tool_calls a string": {"tool_calls": "note(text='x')"},
    "tool_calls an object": {"tool_calls": {"function": {"name": "nope", "arguments": "{}"}}},
    "a call that is a number": {"tool_calls": [7]},
    "name a list": {"tool_calls": [{"id": "x", "function": {"name": ["note"], "arguments": {}}}]},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", list(MALFORMED_CALLS))
def test_a_malformed_call_is_refused_as_invalid_and_nothing_runs(kind, stream, tmp_path):
    script = [message({"role": "assistant", "content": None, **MALFORMED_CALLS[kind]}),
              reply("Let me fix that.")]
    with FakeLLM(script) as llm:
        session = session_for(llm, tmp_path, stream=stream)
        assert session.send("note x")
    assert RAN == []
    (invalid,) = events(tmp_path, "validation_error")
    assert "unknown tool" in invalid["error"]
    told = [m["content"] for m in llm.requests[1]["messages"] if m["role"] == "tool"]
    assert len(told) == 1 and "Nothing was run" in told[0]
    assert "invalid call" in shown(session) and "Let me fix that." in shown(session)
    check_request(llm.requests[1]["messages"], llm.requests[1]["tools"], llm.model)


def test_arguments_nested_too_deep_reach_the_loop_as_an_invalid_call(tmp_path):
    deep = "[" * 2000 + "]" * 2000
    with FakeLLM([call("note", deep), reply("Sorry.")]) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("note x")
    assert RAN == []
    assert events(tmp_path, "validation_error")
    sent = llm.requests[1]["messages"][2]["tool_calls"][0]["function"]["arguments"]
    assert sent == "{}"  # repaired for the history; the raw text stays in the transcript
    (turn,) = events(tmp_path, "assistant")[:1]
    assert turn["tool_calls"][0]["arguments"] == deep


def test_no_stream_shows_the_text_before_a_call_and_the_final_answer(tmp_path):
    script = [calls([call("note", {"text": "x"})], text="Noting it now."), reply("Noted.")]
    with FakeLLM(script) as llm:
        session = session_for(llm, tmp_path, stream=False)
        assert session.send("note x")
    assert "Noting it now." in shown(session) and "Noted." in shown(session)
    assert RAN == [{"text": "x"}]


def test_retries_say_what_booth_waits_for(tmp_path):
    with FakeLLM([error(429, "slow down"), error(503, "loading"), reply("Hello.")]) as llm:
        session = session_for(llm, tmp_path, max_retries=3)
        assert session.send("hi")
    text = shown(session)
    assert "server busy (429), retrying in 0 s, 1/3" in text
    assert "server error (503), retrying in 0 s, 2/3" in text


def test_a_hang_ends_at_the_first_token_timeout_and_the_wait_is_shown(monkeypatch):
    statuses: list[tuple[str | None, bool]] = []
    with FakeLLM([hang(5), hang(5), hang(5)]) as llm:
        model = model_for(llm, first_token_timeout=1.2, max_retries=3, timeout=30)
        monkeypatch.setattr(endpoint.Waiting, "__init__", _quick_waiting)
        started = time.monotonic()
        with pytest.raises(EndpointError) as caught:
            model.complete(START, SPECS, on_status=lambda t, lasting=False:
                           statuses.append((t, lasting)))
        took = time.monotonic() - started
    assert took < 3
    assert "did not begin answering within 1.2 s" in str(caught.value)
    assert "--first-token-timeout" in str(caught.value)
    waits = [t for t, lasting in statuses if t and not lasting]
    assert waits and waits[0].startswith(f"waiting for the model at {llm.base_url}… ")
    assert "(gives up at 1.2 s)" in waits[0]
    assert statuses[-1] == (None, False)  # cleared at the end


def test_keep_alives_alone_do_not_hold_booth_past_the_first_token_timeout():
    with FakeLLM([trickle(6)]) as llm:
        started = time.monotonic()
        with pytest.raises(EndpointError, match="did not begin answering within 1 s"):
            model_for(llm, first_token_timeout=1.0, timeout=30).complete(START, SPECS)
        assert time.monotonic() - started < 2.5


_real_waiting_init = endpoint.Waiting.__init__


def _quick_waiting(self, on_status, mask, what, limit, first_after=2.0):
    _real_waiting_init(self, on_status, mask, what, limit, first_after=0.2)


def test_a_host_that_accepts_no_connection_is_reported_within_the_connect_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue: further SYNs go unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        settings = resolve_settings(env={}, base_url=f"http://127.0.0.1:{port}/v1",
                                    connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(EndpointError, match="Could not reach the model endpoint"):
            OpenAIChatModel(settings).complete(START, SPECS)
        assert time.monotonic() - started < 3  # one try, not four read timeouts
        for filler in fillers:
            filler.close()


def test_the_bearer_key_is_sent_even_with_user_and_password_in_the_url(tmp_path):
    with FakeLLM([reply("Hello.")]) as llm:
        url = llm.base_url.replace("http://", "http://bob:hunter22@")
        session = session_for(llm, tmp_path, api_key=KEY, base_url=url)
        assert session.send("hi")
    headers = llm.headers[0]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert "hunter22" not in json.dumps(headers)


def test_a_401_echoing_the_key_shows_it_nowhere(tmp_path):
    with FakeLLM([error(401, f"Invalid API key {KEY} for bob:hunter22")]) as llm:
        url = llm.base_url.replace("http://", "http://bob:hunter22@")
        session = session_for(llm, tmp_path, api_key=KEY, base_url=url)
        assert session.send("hi") is False
    text = shown(session)
    assert "HTTP 401" in text and "Invalid API key ***" in text
    assert KEY not in text and "hunter22" not in text
    assert KEY not in (tmp_path / "t.jsonl").read_text()


def test_a_key_the_model_streams_back_is_masked_even_split_over_chunks(tmp_path):
    with FakeLLM([reply(f"Your key is {KEY}, keep it safe.")]) as llm:
        session = session_for(llm, tmp_path, api_key=KEY)
        assert session.send("what is my key?")
    assert "Your key is ***, keep it safe." in shown(session) and KEY not in shown(session)


def test_the_masker_holds_back_only_what_could_start_a_secret():
    masker = Masker(["abcdef"])
    out = [masker.feed(p) for p in ["xx ab", "cd", "ef yy a", "b"]]
    assert "".join(out) + masker.flush() == "xx *** yy ab"
    assert out[0] == "xx " and Masker([]).feed("abc") == "abc"


def test_the_loop_answers_each_call_with_the_id_it_sent(tmp_path):
    used = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "note", "arguments": "{}"}}]}
    answered = {"role": "tool", "tool_call_id": "abcDEF123", "content": "ok"}
    model = ScriptedModel([
        AssistantTurn("", [ToolCall("abcDEF123", "note", '{"text": "a"}'),
                           ToolCall("call_0123456789abc", "note", '{"text": "b"}')]),
        AssistantTurn("Done."),
    ])
    ui = ChatUI(Console(file=io.StringIO()))
    ctx = ToolContext.from_options(workspace=str(tmp_path), base_model=str(tmp_path),
                                   console=Console(file=io.StringIO()))
    session = Session(model, ctx, AutoApprove(ui=ui), system_prompt="s", ui=ui, tools=TOOLS,
                      messages=[{"role": "user", "content": "x"}, used, answered])
    assert session.send("again")
    sent, first, second = session.messages[4:7]
    ids = [c["id"] for c in sent["tool_calls"]]
    assert ids[0] != "abcDEF123" and ids[1] == "456789abc"
    assert [first["tool_call_id"], second["tool_call_id"]] == ids
    check_request(model.requests[1][0], None, "m")


def test_waiting_lines_in_a_pipe_are_occasional_and_retries_always_shown():
    ui = ChatUI(Console(file=io.StringIO(), width=200, color_system=None))
    for second in range(2, 6):
        ui.status(f"waiting for the model… {second} s")
    ui.status("server busy (429), retrying in 4 s, 1/3", lasting=True)
    ui.status(None)
    ui.status("waiting for the model… 2 s")  # a new wait starts its own series
    lines = ui.console.file.getvalue().splitlines()
    assert lines == ["waiting for the model… 2 s", "server busy (429), retrying in 4 s, 1/3",
                     "waiting for the model… 2 s"]


def test_credentials_in_the_url_are_said_to_be_unsent_and_count_as_secrets():
    settings = resolve_settings(env={}, base_url="http://bob:hunter22@box:8000/v1", api_key=KEY)
    assert "user:password in the URL not sent" in settings.describe()
    assert set(settings.secrets()) == {KEY, "hunter22", "bob:hunter22"}
    assert resolve_settings(env={}).secrets() == []  # the local placeholder is no secret


def test_an_answer_broken_mid_stream_is_asked_again_and_the_user_told(tmp_path):
    script = [broken(reply("I will prep"), "cut"), reply("I will prepare your photos.")]
    with FakeLLM(script) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("hi")
    text = shown(session)
    assert "broken answer, retrying in 0 s, 1/1" in text
    assert text.rstrip().endswith("I will prepare your photos.")
    (answer,) = events(tmp_path, "assistant")
    assert answer["content"] == "I will prepare your photos."


def test_the_defaults_bound_every_wait():
    settings = resolve_settings(env={})
    assert settings.first_token_timeout <= 180 and settings.connect_timeout <= 5


def test_a_hidden_console_masks_what_tools_and_approvals_print(tmp_path):
    model = ScriptedModel([AssistantTurn("", [ToolCall("abcDEF123", "note", json.dumps(
        {"text": f"my key is {KEY}"}))]), AssistantTurn("Noted.")])
    ui = ChatUI(Console(file=io.StringIO(), width=200, color_system=None), secrets=[KEY])
    ctx = ToolContext.from_options(workspace=str(tmp_path), base_model=str(tmp_path),
                                   console=Console(file=io.StringIO()))
    session = Session(model, ctx, AutoApprove(ui=ui), system_prompt="s", ui=ui, tools=TOOLS)
    assert session.send("note my key")
    assert RAN == [{"text": f"my key is {KEY}"}]  # the tool gets the real value
    text = ui.console.file.getvalue()
    assert "my key is ***" in text and KEY not in text


def test_an_older_vllms_unwrapped_error_event_is_reported_in_its_words():
    step = raw('data: {"object": "error", "message": "prompt too long for this model", '
               '"type": "BadRequestError", "code": 400}\n\ndata: [DONE]\n\n')
    with FakeLLM([step, step]) as llm:
        with pytest.raises(EndpointError) as caught:
            model_for(llm).complete(START, SPECS)
    assert "reported an error while answering: prompt too long" in str(caught.value)


def test_an_answer_cut_at_the_token_limit_says_to_raise_max_tokens(tmp_path):
    cut = call("note", '{"text": "abc')
    cut["finish_reason"] = "length"
    with FakeLLM([cut, reply("Sorry.")]) as llm:
        session = session_for(llm, tmp_path, max_tokens=64)
        session.send("note x")
    said = [e["text"] for e in events(tmp_path, "notice")]
    assert any("cut off at the token limit (--max-tokens 64)" in text for text in said)
    assert RAN == []  # the cut call never ran
