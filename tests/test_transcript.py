"""Transcripts: versioned JSONL, one fsynced line per event, readable after a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from booth.agent.events import EventError, make_event
from booth.agent.transcript import (
    TranscriptError,
    TranscriptWriter,
    assistant_turns,
    conversation,
    default_path,
    make_header,
    open_for_resume,
    read_transcript,
    retracted,
)

DATA = Path(__file__).parent / "data"


def header(**extra):
    return make_header(model="m", endpoint="m at http://x/v1 (vllm), no key",
                       sampling={"temperature": 0.15}, tools=[], system_prompt="be nice", **extra)


def add(writer, kind, **fields):
    return writer.write(make_event(kind, **fields))


def write_session(path):
    writer = TranscriptWriter.create(path, header())
    add(writer, "user", message={"role": "user", "content": "hi"})
    sent = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function",
         "function": {"name": "sample", "arguments": "{}"}}]}
    add(writer, "assistant", content="", finish_reason="tool_calls", message=sent,
                 tool_calls=[{"id": "call_1", "name": "sample", "arguments": "{oops"}])
    add(writer, "validation_error", call_id="abcDEF123", tool="sample", error="not JSON",
                 message={"role": "tool", "tool_call_id": "abcDEF123", "content": "Error: x"})
    add(writer, "notice", text="history shortened")
    return writer


def test_header_then_events_round_trip_and_conversation_is_the_messages(tmp_path):
    path = tmp_path / "t.jsonl"
    write_session(path).close()
    head, events = read_transcript(path)
    assert head["format"] == "booth-transcript" and head["version"] == 2
    assert head["booth_version"] and head["created"] and head["system_prompt"] == "be nice"
    assert [e["type"] for e in events] == ["user", "assistant", "validation_error", "notice"]
    assert all("time" in e for e in events)
    roles = [m["role"] for m in conversation(events)]
    assert roles == ["user", "assistant", "tool"]
    # The raw text the model sent is kept beside the repaired form that was sent back.
    assert events[1]["tool_calls"][0]["arguments"] == "{oops"
    (turn,) = assistant_turns(events)
    assert turn.tool_calls[0].arguments == "{oops" and turn.finish_reason == "tool_calls"


def test_each_event_is_on_disk_before_the_writer_is_closed(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = write_session(path)  # not closed: as if the process were about to die
    _, events = read_transcript(path)
    assert len(events) == 4
    writer.close()


def test_a_killed_process_leaves_a_valid_transcript(tmp_path):
    path = tmp_path / "t.jsonl"
    code = (
        "import os, sys\n"
        "from booth.agent.events import make_event\n"
        "from booth.agent.transcript import TranscriptWriter, make_header\n"
        "w = TranscriptWriter.create(sys.argv[1], make_header(model='m', endpoint='e', "
        "sampling={}, tools=[], system_prompt='s'))\n"
        "w.write(make_event('user', message={'role': 'user', 'content': 'hi'}))\n"
        "w._file.write('{\"type\": \"assist')\n"  # a line torn mid-write
        "w._file.flush()\n"
        "os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    _, events = read_transcript(path)
    assert [e["type"] for e in events] == ["user"]
    # Appending after the crash starts on a fresh line: the torn one is cut.
    writer = TranscriptWriter(path)
    add(writer, "notice", text="resumed")
    writer.close()
    assert [e["type"] for e in read_transcript(path)[1]] == ["user", "notice"]


def test_line_separators_inside_strings_do_not_split_events(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TranscriptWriter.create(path, header())
    add(writer, "user", message={"role": "user", "content": "a\u2028b\u0085c"})
    writer.close()
    assert read_transcript(path)[1][0]["message"]["content"] == "a\u2028b\u0085c"


def test_secrets_are_masked_wherever_they_appear(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TranscriptWriter.create(path, header(), secrets=["sk-SECRET-123"])
    add(writer, "user", message={"role": "user", "content": "my key is sk-SECRET-123"})
    writer.close()
    text = path.read_text()
    assert "sk-SECRET-123" not in text and "my key is ***" in text


def test_create_refuses_to_overwrite_a_transcript(tmp_path):
    path = tmp_path / "t.jsonl"
    write_session(path).close()
    with pytest.raises(TranscriptError, match="already exists"):
        TranscriptWriter.create(path, header())


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["{not json"], r"t\.jsonl:1: not valid JSON"),
        ([json.dumps(header()), "[1, 2]"], r":2: each line must be a JSON object"),
        ([json.dumps(header()), '{"message": {}}'], r":2: the line has no 'type' field"),
        ([json.dumps(header()), '{"type": "dance"}'], r":2: unknown event type 'dance'"),
        ([json.dumps({**header(), "version": 7})], r":1: transcript version 7 is not supported"),
        (['{"type": "user", "message": {}}'], r":1: the first line must be a booth-transcript"),
        ([json.dumps(header()), "", "oops", '{"type": "notice"}'], r":3: not valid JSON"),
        ([], r"is empty"),
    ],
)
def test_malformed_transcripts_name_the_line(tmp_path, lines, expected):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(TranscriptError, match=expected):
        read_transcript(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TranscriptError, match="cannot read transcript"):
        read_transcript(tmp_path / "nope.jsonl")


def test_default_path_is_dated_slugged_and_never_reused(tmp_path):
    now = datetime(2026, 5, 4, 3, 2, 1)
    first = default_path(tmp_path, "Teach the model my dog Rex!", now)
    assert first.name == "20260504-030201-teach-the-model-my-dog-rex.jsonl"
    first.write_text("x")
    assert default_path(tmp_path, "Teach the model my dog Rex!", now).name.endswith("-2.jsonl")
    assert default_path(tmp_path, "犬を月に", now).name == "20260504-030201-chat.jsonl"


@pytest.mark.parametrize(("goal", "slug"), [
    ("Apprends au modèle mon chien", "apprends-au-modele-mon-chien"),
    ("Straße in Köln, crème brûlée", "strasse-in-koln-creme-brulee"),
    ("Ærø Łódź øre œuvre", "aero-lodz-ore-oeuvre"),
    ("ﬁne ½ ＲＥＸ", "fine-1-2-rex"),  # compatibility forms, taken apart by NFKD
    ("犬を月に dog", "dog"),  # a script with no Latin letters is left out, the rest kept
])
def test_default_path_transliterates_accented_letters(tmp_path, goal, slug):
    now = datetime(2026, 5, 4, 3, 2, 1)
    assert default_path(tmp_path, goal, now).name == f"20260504-030201-{slug}.jsonl"


def test_a_retracted_message_leaves_the_conversation(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TranscriptWriter.create(path, header())
    add(writer, "user", message={"role": "user", "content": "hi"})
    add(writer, "assistant", content="Meh.", tool_calls=[],
                 message={"role": "assistant", "content": "Meh."})
    add(writer, "retracted", text="the last answer was withdrawn for a retry")
    add(writer, "assistant", content="Hello!", tool_calls=[],
                 message={"role": "assistant", "content": "Hello!"})
    writer.close()
    _, events = read_transcript(path)
    assert retracted(events) == {1}
    assert [m["content"] for m in conversation(events)] == ["hi", "Hello!"]
    assert [t.content for t in assistant_turns(events)] == ["Hello!"]


def _event_line(event: dict) -> list[str]:
    return [json.dumps(header()), json.dumps(event)]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"type": "user", "message": {"role": "user", "content": 5}},
         r":2: user event: 'message.content' must be a string, not 5"),
        ({"type": "assistant", "tool_calls": [], "message": {"role": "assistant",
          "tool_calls": [{"id": "abcDEF123", "function": {"name": "x"}}]}},
         r":2: assistant event: 'message.tool_calls\[0\].function.arguments' is missing"),
        ({"type": "assistant", "tool_calls": [], "message": {"role": "assistant",
          "tool_calls": [{"id": "abcDEF123", "function": {"name": "x", "arguments": "{}"}}]}},
         r":2: assistant event: 'tool_calls' has 0 calls but 'message.tool_calls' has 1"),
        ({"type": "validation_error", "call_id": "abcDEF123", "tool": "x", "error": "x",
          "message": {"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "Error"}},
         r":2: validation_error event: 'message.tool_call_id' must equal 'call_id'"),
        ({"type": "tool_result", "call_id": "abcDEF123", "tool": "x",
          "message": {"role": "tool", "tool_call_id": "abcDEF123", "content": "{}"}},
         r":2: tool_result event: 'ok' is missing"),
        ({"type": "approval", "call_id": "abcDEF123", "decision": "approved", "arguments": {}},
         r":2: approval event: 'tool' is missing"),
        ({"type": "notice", "text": "x", "message": {"role": "user", "content": "x"}},
         r":2: notice event: this event type carries no 'message'"),
    ],
)
def test_events_missing_fields_name_the_line_and_the_field(tmp_path, event, expected):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(line + "\n" for line in _event_line(event)))
    with pytest.raises(TranscriptError, match=expected):
        read_transcript(path)


def test_the_writer_refuses_an_event_its_schema_refuses_and_writes_nothing(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TranscriptWriter.create(path, header())
    before = path.read_text()
    with pytest.raises(EventError, match=r"user event: 'message.content' must be a string"):
        writer.write({"type": "user", "time": "now", "message": {"role": "user", "content": 5}})
    with pytest.raises(EventError, match=r"tool_result event: 'ok' is missing"):
        make_event("tool_result", call_id="abcDEF123", tool="x",
                   message={"role": "tool", "tool_call_id": "abcDEF123", "content": "{}"})
    with pytest.raises(EventError, match=r"tool_result event: 'error' is missing"):
        make_event("tool_result", call_id="abcDEF123", tool="x", ok=False,
                   message={"role": "tool", "tool_call_id": "abcDEF123", "content": "{}"})
    writer.close()
    assert path.read_text() == before


def test_the_same_schema_checks_what_is_read(tmp_path):
    """A line the writer would refuse is refused on reading, with its line and field."""
    good = make_event("notice", text="x")
    path = tmp_path / "t.jsonl"
    path.write_text("".join(line + "\n" for line in [
        json.dumps(header()), json.dumps(good), json.dumps({**good, "text": None})]))
    with pytest.raises(TranscriptError, match=r"t\.jsonl:3: notice event: 'text' must be a "
                                              r"string, not null"):
        read_transcript(path)


def test_content_parts_are_recorded_as_text(tmp_path):
    parts = [{"type": "text", "text": "a photo "}, {"type": "text", "text": "of rex"}]
    made = make_event("user", message={"role": "user", "content": parts})
    assert made["message"]["content"] == "a photo of rex"
    image = make_event("user", message={"role": "user", "content": [
        {"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "x"}}]})
    assert image["message"]["content"] == "look: [image_url part left out]"


def test_version_1_files_are_still_read(tmp_path):
    """Version 1 allowed nulls, and booth 0.1 wrote content parts as they came."""
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    lines = [
        {**header(), "version": 1},
        {"type": "user", "time": "t", "message": {"role": "user", "content": parts}},
        {"type": "assistant", "time": "t", "content": parts, "finish_reason": None,
         "tool_calls": [], "message": {"role": "assistant", "content": parts}},
        {"type": "approval", "call_id": "abcDEF123", "tool": "sample", "decision": "refused",
         "arguments": {}, "edited": False, "reason": None,
         "message": {"role": "tool", "tool_call_id": "abcDEF123", "content": "Cancelled."}},
    ]
    path = tmp_path / "v1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    head, events = read_transcript(path)
    assert head["version"] == 1
    assert [m["content"] for m in conversation(events)] == ["hi there", "hi there", "Cancelled."]
    assert "reason" not in events[2] and "finish_reason" not in events[1]
    (turn,) = assistant_turns(events)
    assert turn.content == "hi there"


def test_the_version_1_demo_transcript_is_still_read_shown_and_resumed(tmp_path, workspace):
    from typer.testing import CliRunner

    from booth.cli import app

    head, events = read_transcript(DATA / "demo-v1.jsonl")
    assert head["version"] == 1
    assert [e["tool"] for e in events if e["type"] == "tool_result"] == [
        "prepare_dataset", "generate_priors", "train", "sample"]
    assert conversation(events)[0]["content"].startswith("Teach the model my dog Rex")
    shown = CliRunner().invoke(app, ["--workspace", workspace, "replay",
                                     str(DATA / "demo-v1.jsonl")])
    assert shown.exit_code == 0, shown.output
    assert "invalid call to train" in " ".join(shown.output.split())
    # Resumed in place it keeps its version-1 header; into a new file it becomes version 2.
    old = tmp_path / "old.jsonl"
    old.write_bytes((DATA / "demo-v1.jsonl").read_bytes())
    open_for_resume(old, header())[0].close()
    open_for_resume(old, header(), tmp_path / "new.jsonl")[0].close()
    for path, version in ((old, 1), (tmp_path / "new.jsonl", 2)):
        head, resumed = read_transcript(path)
        assert head["version"] == version
        assert conversation(resumed) == conversation(events)


def test_content_parts_from_the_user_and_the_endpoint_are_written_read_replayed_resumed(
        tmp_path, workspace):
    """OpenAI allows content as a list of parts; what booth writes from it, booth reads."""
    import io

    from fakellm import FakeLLM
    from rich.console import Console
    from typer.testing import CliRunner

    from booth.agent.approval import AutoApprove
    from booth.agent.endpoint import OpenAIChatModel
    from booth.agent.loop import Session
    from booth.agent.settings import EndpointSettings
    from booth.agent.ui import ChatUI
    from booth.cli import app
    from booth.tools import ToolContext

    parts = [{"type": "text", "text": "Rex is "}, {"type": "text", "text": "a fine dog."}]
    answer = {"kind": "reply", "text": parts, "tool_calls": [], "finish_reason": "stop"}
    path = tmp_path / "t.jsonl"
    with FakeLLM([answer]) as llm:
        settings = EndpointSettings(base_url=llm.base_url, model=llm.model, stream=False,
                                    retry_backoff=0.01)
        writer = TranscriptWriter.create(path, header())
        ui = ChatUI(Console(file=io.StringIO(), width=120, color_system=None))
        session = Session(OpenAIChatModel(settings), ToolContext.from_options(workspace=workspace),
                          AutoApprove(ui=ui), system_prompt="s", transcript=writer, ui=ui)
        assert session.send([{"type": "text", "text": "my dog "},
                             {"type": "text", "text": "is Rex"}]) is True
        writer.close()
        assert llm.requests[0]["messages"][1]["content"] == "my dog is Rex"
    _, events = read_transcript(path)
    assert [m["content"] for m in conversation(events)] == ["my dog is Rex",
                                                            "Rex is a fine dog."]
    assert events[1]["content"] == "Rex is a fine dog."

    runner = CliRunner()
    shown = runner.invoke(app, ["--workspace", workspace, "replay", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "my dog is Rex" in shown.output and "Rex is a fine dog." in shown.output
    with FakeLLM([{**answer, "text": [{"type": "text", "text": "Still Rex."}]}]) as llm:
        resumed = runner.invoke(app, ["--workspace", workspace, "chat", "his name?",
                                      "--resume", str(path), "--base-url", llm.base_url,
                                      "--no-stream"])
        sent = llm.requests[0]["messages"]
    assert resumed.exit_code == 0, resumed.output
    assert [m["content"] for m in sent[1:]] == ["my dog is Rex", "Rex is a fine dog.",
                                               "his name?"]
    assert [m["content"] for m in conversation(read_transcript(path)[1])][-1] == "Still Rex."


def test_an_answer_of_odd_types_from_a_server_is_recorded_as_text(tmp_path, workspace):
    """What a server sends is data: content parts, a reason that is a number, a call's name
    that is no string; the transcript stays valid and the call fails validation."""
    import io

    from rich.console import Console

    from booth.agent.approval import AutoApprove
    from booth.agent.loop import Session
    from booth.agent.model import AssistantTurn, ScriptedModel, ToolCall
    from booth.agent.ui import ChatUI
    from booth.tools import ToolContext

    odd = AssistantTurn([{"type": "text", "text": "Trying."}], [ToolCall(None, 7, None)], 3)
    path = tmp_path / "t.jsonl"
    writer = TranscriptWriter.create(path, header())
    ui = ChatUI(Console(file=io.StringIO()))
    Session(ScriptedModel([odd, AssistantTurn("Done.")]), ToolContext.from_options(
        workspace=workspace), AutoApprove(ui=ui), system_prompt="s", transcript=writer,
        ui=ui).send("go")
    writer.close()
    _, events = read_transcript(path)
    assert [e["type"] for e in events] == ["user", "assistant", "validation_error", "assistant"]
    assert events[1]["content"] == "Trying." and events[1]["finish_reason"] == "3"
    assert events[1]["tool_calls"][0]["name"] == "7"
