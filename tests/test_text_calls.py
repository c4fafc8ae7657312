"""Servers that do not parse Mistral's tool calls, or break streaming them: calls written as
text are run as calls (after approval, once); prose naming a tool stays prose; a stream whose
tool calls broke is asked again without streaming; the server's identity is recorded.
Against tests/fakellm.py on loopback with a real Session."""

from __future__ import annotations

import time

import pytest
from fakellm import PARSE_ERROR, FakeLLM, broken, call, calls, error, hang, reply, written
from test_endpoint_faults import NOTE, RAN, SPECS, events, model_for, session_for, shown

from booth.agent.text_calls import Holdback, find_calls

NAMES = {"note", "train"}
TWO = [call("note", {"text": "a"}), call("note", {"text": "b"})]


@pytest.fixture(autouse=True)
def _nothing_ran_yet():
    RAN.clear()


@pytest.mark.parametrize("form", ["v11", "marker_list", "list", "bare"])
@pytest.mark.parametrize("stream", [True, False])
def test_calls_written_as_text_run_after_approval_with_their_arguments(tmp_path, form, stream):
    raw = written(TWO, form)["text"]
    with FakeLLM([written(TWO, form), reply("Noted twice.")]) as llm:
        session = session_for(llm, tmp_path, stream=stream)
        assert session.send("note a and b")
    assert RAN == [{"text": "a"}, {"text": "b"}]
    approvals = events(tmp_path, "approval")
    assert [a["arguments"] for a in approvals] == [{"text": "a"}, {"text": "b"}]
    assert all(a["decision"] == "approved" for a in approvals)
    first = events(tmp_path, "assistant")[0]
    assert first["raw_content"] == raw and first["content"] == ""
    assert first["message"]["content"] is None  # sent back as a turn of calls, not text
    sent_ids = [c["id"] for c in first["message"]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in sent_ids) and len(set(sent_ids)) == 2
    # the second request carries the calls as native calls, answered by their ids
    history = llm.requests[1]["messages"]
    assert [m["tool_call_id"] for m in history if m["role"] == "tool"] == sent_ids
    text = shown(session)
    before, notice, _ = text.partition("The server returned the model's tool calls as text")
    assert notice and "Noted twice." in text
    assert "[TOOL_CALLS]" not in before and '{"text": "a"}' not in text


def test_the_user_is_told_how_to_fix_the_server_once_a_session(tmp_path):
    script = [written([NOTE]), reply("One."), written([NOTE], "bare"), reply("Two.")]
    with FakeLLM(script, info={"/version": {"version": "0.9.1"}}) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("note") and session.send("note again")
    assert len(RAN) == 2
    text = shown(session)
    assert text.count("returned the model's tool calls as text") == 1
    assert "--tool-call-parser mistral --enable-auto-tool-choice" in text
    assert "--jinja" not in text  # the server said it is vLLM: only its fix
    (notice,) = events(tmp_path, "notice")
    assert "as text ([TOOL_CALLS])" in notice["text"]


def test_prose_before_the_marker_stays_the_turns_text(tmp_path):
    with FakeLLM([written([NOTE], text="Let me note that.\n"), reply("Done.")]) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("note x")
    assert RAN == [{"text": "x"}]
    assert events(tmp_path, "assistant")[0]["content"] == "Let me note that."
    assert "Let me note that." in shown(session)
    assert "[TOOL_CALLS]note" not in shown(session)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("text", [
    "I will call note next, then train.",
    'note{"text": "x"} is what I would run, if you agree.',
    '[{"name": "shout", "arguments": {"text": "x"}}]',  # not every name is a tool
    '[{"name": "note", "arguments": {"text": "x"}}, {"name": "rm", "arguments": {}}]',
    "[1, 2, 3]",
    "[see the docs](https://example.com)",
])
def test_prose_and_lists_that_are_not_all_tools_stay_text(tmp_path, text, stream):
    with FakeLLM([reply(text)]) as llm:
        session = session_for(llm, tmp_path, stream=stream)
        assert session.send("hi")
    assert RAN == [] and events(tmp_path, "approval") == []
    assert shown(session).count(text) == 1
    (turn,) = events(tmp_path, "assistant")
    assert turn["content"] == text and "raw_content" not in turn


@pytest.mark.parametrize("text", [
    "[TOOL_CALLS]train[ARGS]{not json",
    "[TOOL_CALLS]shout[ARGS]{}",
    "[TOOL_CALLS][{\"name\": \"note\", \"arguments\": ",
    "[TOOL_CALLS]",
])
def test_a_broken_call_after_the_marker_is_an_invalid_call_the_model_hears_of(tmp_path, text):
    with FakeLLM([reply(text), reply("Sorry.")]) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("hi")
    assert RAN == []
    (invalid,) = events(tmp_path, "validation_error")
    assert invalid["message"]["content"].startswith("Error: ")
    assert shown(session).count("[TOOL_CALLS]") == 1  # in the notice only


def test_find_calls_reads_each_form():
    v11 = find_calls('[TOOL_CALLS]note[ARGS]{"text": "a"}[TOOL_CALLS]train[ARGS]{}', NAMES)
    assert [(c.name, c.arguments) for c in v11.calls] == [("note", '{"text": "a"}'),
                                                          ("train", "{}")]
    v13 = find_calls('[TOOL_CALLS]note[CALL_ID]abcDEF123[ARGS]{"text": "a"}</s>', NAMES)
    assert [(c.id, c.name, c.arguments) for c in v13.calls] == [
        ("abcDEF123", "note", '{"text": "a"}')]
    bare = find_calls(' note {"text": "a"}\n train{"steps": 5} ', NAMES)
    assert [(c.name, c.arguments) for c in bare.calls] == [("note", '{"text": "a"}'),
                                                           ("train", '{"steps": 5}')]
    one = find_calls('[TOOL_CALLS]{"name": "note", "arguments": {"text": "a"}}', NAMES)
    assert [(c.name, c.arguments) for c in one.calls] == [("note", '{"text": "a"}')]
    assert find_calls('note{"text": "a"} and more', NAMES) is None
    assert find_calls('[{"name": "note", "arguments": {}}]', NAMES, bare=False) is None


def feed_all(text: str, size: int) -> tuple[str, Holdback]:
    held = Holdback(NAMES)
    shown = "".join(held.feed(text[i:i + size]) for i in range(0, len(text), size))
    return shown, held


@pytest.mark.parametrize("size", [1, 3, 7])
def test_streamed_text_that_may_be_a_call_is_held_until_the_end(size):
    for text in ('[TOOL_CALLS]note[ARGS]{"text": "a"}', ' note{"text": "a"}',
                 '[ {"name": "note", "arguments": {}}]'):
        assert feed_all(text, size)[0] == ""
    shown, held = feed_all('Sure. [TOOL_CALLS]note[ARGS]{}', size)
    assert shown == "Sure. " and held.rest() == "[TOOL_CALLS]note[ARGS]{}"
    for prose in ("Training now [see below].", "notebooks are fine", "train the dog"):
        shown, held = feed_all(prose, size)
        assert shown + held.rest() == prose and len(shown) >= len(prose) - len("[TOOL_CALLS]")


@pytest.mark.parametrize("how", ["error_event", "parse_error"])
def test_a_stream_broken_after_tool_deltas_is_asked_again_unstreamed(tmp_path, how):
    step = calls([NOTE], text="Noting.")
    script = [broken(step, how), step, reply("Noted."), reply("Again.")]
    with FakeLLM(script) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("note x")
        assert session.send("and?")
    assert RAN == [{"text": "x"}]  # the broken stream's call never ran; the re-asked one once
    assert [r.get("stream", False) for r in llm.requests] == [True, False, False, False]
    assert llm.requests[1]["messages"] == llm.requests[0]["messages"]  # the same request
    text = shown(session)
    assert text.count("Noting.") == 1
    assert text.count("will not stream for the rest of this session") == 1
    assert len(events(tmp_path, "approval")) == 1
    assert "not stream" in events(tmp_path, "notice")[0]["text"]


def test_a_500_naming_the_tool_parser_is_asked_again_unstreamed(tmp_path):
    with FakeLLM([error(500, PARSE_ERROR), NOTE, reply("Noted.")]) as llm:
        session = session_for(llm, tmp_path, max_retries=0)
        assert session.send("note x")
    assert RAN == [{"text": "x"}]
    assert [r.get("stream", False) for r in llm.requests] == [True, False, False]
    assert "partial_json_parser" in events(tmp_path, "notice")[0]["text"]


def test_other_stream_failures_stay_streamed_retries():
    with FakeLLM([error(500, "CUDA out of memory"), reply("Hi.")]) as llm:
        turn = model_for(llm).complete([{"role": "user", "content": "hi"}], SPECS)
    assert turn.content == "Hi." and turn.notices == []
    assert [r.get("stream", False) for r in llm.requests] == [True, True]


def test_the_first_turn_records_what_the_server_says_it_is(tmp_path):
    info = {"/version": {"version": "0.9.1"}}
    with FakeLLM([reply("Hi."), reply("Again.")], served="served-name", info=info) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("hi") and session.send("again")
    first, second = events(tmp_path, "assistant")
    assert first["server"] == {"model": "served-name", "kind": "vLLM", "version": "0.9.1"}
    assert "server" not in second
    assert llm.gets == ["/version"]  # one GET, at the server's root, once


def test_a_server_that_says_nothing_records_only_its_model(tmp_path):
    with FakeLLM([reply("Hi.")]) as llm:
        session = session_for(llm, tmp_path)
        assert session.send("hi")
    assert events(tmp_path, "assistant")[0]["server"] == {"model": llm.model}


@pytest.mark.parametrize("provider, path, body, kind, version", [
    ("ollama", "/api/version", {"version": "0.9.6"}, "Ollama", "0.9.6"),
    ("llamacpp", "/props", {"build_info": "b5880-abc123", "total_slots": 1}, "llama.cpp",
     "b5880-abc123"),
])
def test_ollama_and_llama_server_are_asked_at_their_own_paths(tmp_path, provider, path, body,
                                                             kind, version):
    with FakeLLM([written([NOTE], "bare"), reply("Done.")], info={path: body}) as llm:
        session = session_for(llm, tmp_path, provider=provider)
        assert session.send("note")
    assert llm.gets == [path] and RAN == [{"text": "x"}]
    server = events(tmp_path, "assistant")[0]["server"]
    assert server == {"model": llm.model, "kind": kind, "version": version}
    (notice,) = events(tmp_path, "notice")  # the fix for that server, not the others'
    fix = {"ollama": "ollama#11155", "llamacpp": "--jinja"}[provider]
    assert fix in notice["text"] and "--tool-call-parser" not in notice["text"]


@pytest.mark.parametrize("answer", [hang(6.0), "not an object", {"version": None}])
def test_a_version_path_that_hangs_or_says_nonsense_costs_at_most_the_probes_timeout(
        tmp_path, monkeypatch, answer):
    from booth.agent import servers

    monkeypatch.setattr(servers, "PROBE_TIMEOUT", 0.3)
    with FakeLLM([reply("Hi.")], info={"/version": answer}) as llm:
        session = session_for(llm, tmp_path)
        started = time.monotonic()
        assert session.send("hi")
        took = time.monotonic() - started
    assert took < 4.5  # the probe gave up long before the 6 s hang ended
    assert events(tmp_path, "assistant")[0]["server"] == {"model": llm.model}


def test_a_notice_on_a_final_answer_is_no_early_end_for_a_replay(tmp_path):
    from booth.agent.replay import user_turns
    from booth.agent.transcript import read_transcript

    with FakeLLM([error(500, PARSE_ERROR), reply("All done.")]) as llm:
        session = session_for(llm, tmp_path, max_retries=0)
        assert session.send("hi")
    (turn,) = user_turns(read_transcript(tmp_path / "t.jsonl")[1])
    assert turn.ended is None and [t.content for t in turn.turns] == ["All done."]


def test_the_probe_goes_to_the_servers_root_without_the_key_or_url_password():
    from booth.agent.servers import server_root

    assert server_root("http://me:pw@gpu:8000/proxy/v1/") == "http://gpu:8000/proxy"
    assert server_root("http://localhost:11434/v1") == "http://localhost:11434"
    with FakeLLM([reply("Hi.")], info={"/version": {"version": "0.9.1"}}) as llm:
        turn = model_for(llm, api_key="sk-secret-key-123").complete(
            [{"role": "user", "content": "hi"}], SPECS)
    assert turn.server["version"] == "0.9.1"
    assert "authorization" not in llm.get_headers[0]
    assert llm.headers[0]["authorization"] == "Bearer sk-secret-key-123"
