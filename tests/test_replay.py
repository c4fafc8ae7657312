"""`booth replay` and `booth demo`: a saved session shown, re-executed without any LLM, compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from booth.agent.approval import AutoApprove, Decision
from booth.agent.loop import Session
from booth.agent.model import AssistantTurn, EndpointError, ScriptedModel, ToolCall
from booth.agent.replay import session_places
from booth.agent.transcript import TranscriptWriter, make_header, read_transcript
from booth.cli import app
from booth.tools import TOOLS, ToolContext

runner = CliRunner()


def turn(text, *calls):
    tool_calls = [ToolCall(cid, name, args if isinstance(args, str) else json.dumps(args))
                  for cid, name, args in calls]
    return AssistantTurn(text, tool_calls, "tool_calls" if tool_calls else "stop")


class RefuseSample(AutoApprove):
    """The recorded user approved everything but the sample call."""

    def decide(self, tool, call_id, arguments, ctx):
        if tool.name == "sample":
            return Decision("refuse", arguments, reason="not now")
        return super().decide(tool, call_id, arguments, ctx)


@pytest.fixture(scope="module")
def recording(tmp_path_factory, tiny_model) -> Path:
    """A real session, recorded once for the module: prepare (valid), a malformed call,
    priors, and a refused sample. Its folder holds the photos and session.jsonl."""
    from booth.demo import draw_subject_photos

    root = tmp_path_factory.mktemp("recorded")
    draw_subject_photos(root / "photos", count=3, size=64)
    ctx = ToolContext.from_options(workspace=str(root / "ws-recorded"), base_model=tiny_model)
    script = [
        turn("Preparing.", ("Prepare001", "prepare_dataset",
                            {"images_dir": "photos", "class_noun": "dog", "resolution": 64})),
        turn("Priors.", ("Priors001", "generate_priors", '{"class_prompt": "a dog",')),
        turn("Priors again.", ("Priors002", "generate_priors",
                               {"class_prompt": "a photo of a dog", "num_images": 2,
                                "resolution": 64, "num_inference_steps": 2})),
        turn("A look at the base model.", ("Sample001", "sample", {"prompts": ["a dog"]})),
        turn("All done."),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the session names its photos relative to where it ran
        header = make_header(model="scripted", endpoint="none", sampling={},
                             tools=[t.openai_spec() for t in TOOLS.values()],
                             system_prompt="sys", **session_places(ctx))
        writer = TranscriptWriter.create(root / "session.jsonl", header)
        Session(ScriptedModel(script), ctx, RefuseSample(), system_prompt="sys",
                transcript=writer).send("make me a dog dataset")
        writer.close()
    return root


@pytest.fixture
def recorded(recording, tmp_path, tiny_model, monkeypatch) -> tuple[Path, str]:
    """The module's recorded session as this test's own copy (a test may edit it), replayed
    from the folder it was recorded in (its relative photo path resolves there again)."""
    monkeypatch.chdir(recording)
    path = tmp_path / "session.jsonl"
    shutil.copyfile(recording / "session.jsonl", path)
    return path, tiny_model


def replay(path, *options, workspace, base_model):
    return runner.invoke(app, ["--workspace", workspace, "--base-model", base_model,
                               "replay", str(path), *options])


@pytest.mark.slow  # the recording generates class images
def test_replay_shows_the_session_and_runs_nothing(recorded, tmp_path):
    path, model = recorded
    result = replay(path, workspace=str(tmp_path / "ws-show"), base_model=model)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "make me a dog dataset" in text
    assert "prepare_dataset" in text and "invalid call to generate_priors" in text
    assert "refused sample: not now" in text
    assert not (tmp_path / "ws-show").exists()


@pytest.mark.slow  # the recording generates class images
def test_execute_reruns_approved_calls_and_reports_matches(recorded, tmp_path):
    path, model = recorded
    workspace = tmp_path / "ws-replay"
    result = replay(path, "--execute", "--yes", workspace=str(workspace), base_model=model)
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "2 of 2 tool results match the recording" in text
    # The malformed call failed validation again and the refused call stayed refused.
    assert "invalid call to generate_priors" in text
    assert "refused in the recorded session (not now)" in text
    assert len(list((workspace / "datasets" / "photos" / "images").glob("*.png"))) == 3
    assert not (workspace / "samples").exists()
    # The replay is itself recorded as a session.
    (replayed,) = (workspace / "transcripts").glob("*.jsonl")
    header, events = read_transcript(replayed)
    assert header["replay_of"] == str(path)
    assert [e["tool"] for e in events if e["type"] == "tool_result"] == [
        "prepare_dataset", "generate_priors"]


@pytest.mark.slow  # the recording generates class images
def test_execute_reports_a_result_that_differs(recorded, tmp_path):
    path, model = recorded
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        event = json.loads(line)
        if event["type"] == "tool_result" and event["tool"] == "prepare_dataset":
            event["result"]["kept"] = 99
            lines[i] = json.dumps(event)
    path.write_text("\n".join(lines) + "\n")
    result = replay(path, "--execute", "--yes", workspace=str(tmp_path / "ws"), base_model=model)
    text = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "kept: recorded 99, now 3" in text
    assert "1 of 2 tool results match" in text


@pytest.mark.slow  # the recording generates class images
def test_execute_without_a_terminal_or_yes_runs_nothing_and_fails(recorded, tmp_path):
    path, model = recorded
    result = replay(path, "--execute", workspace=str(tmp_path / "ws"), base_model=model)
    text = " ".join(result.output.split())
    assert "no terminal to ask for approval" in text
    assert not (tmp_path / "ws" / "datasets").exists()
    # The two calls that ran in the recording did not run now: that is no pass. The sample
    # call, refused in the recording and again now, has no recorded result and is not counted.
    assert result.exit_code == 1, result.output
    assert "0 of 2 tool results match the recording; 2 not run" in text
    missing = text.split("Recorded calls that did not run in the replay:")[1]
    # The first is refused for want of a terminal, which ends the turn: the second is not
    # even reached.
    assert missing.count("not run: refused") == 1
    assert "generate_priors (Priors002): not run" in missing
    assert "prepare_dataset (" in missing and "generate_priors (" in missing
    assert "sample (" not in missing


def test_a_user_turn_that_ended_early_replays_under_its_own_message(tmp_path, tiny_model,
                                                                    monkeypatch):
    """user 1 -> endpoint error (no answer), user 2 -> a tool call: the call replays under
    user 2, and user 1 ends where the recording ended."""
    from booth.demo import draw_subject_photos

    monkeypatch.chdir(tmp_path)
    draw_subject_photos(tmp_path / "photos", count=3, size=64)
    ctx = ToolContext.from_options(workspace=str(tmp_path / "ws-rec"), base_model=tiny_model)
    script = [
        EndpointError("HTTP 400 from the endpoint: the request was rejected."),
        turn("Preparing.", ("Prepare001", "prepare_dataset",
                            {"images_dir": "photos", "class_noun": "dog", "resolution": 64})),
        turn("Your dataset is ready."),
    ]
    header = make_header(model="scripted", endpoint="none", sampling={},
                         tools=[t.openai_spec() for t in TOOLS.values()], system_prompt="sys",
                         **session_places(ctx))
    path = tmp_path / "session.jsonl"
    writer = TranscriptWriter.create(path, header)
    session = Session(ScriptedModel(script), ctx, AutoApprove(), system_prompt="sys",
                      transcript=writer)
    assert session.send("hello?") is False
    assert session.send("prepare my photos") is True
    writer.close()

    workspace = tmp_path / "ws-replay"
    result = replay(path, "--execute", "--yes", workspace=str(workspace), base_model=tiny_model)
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "1 of 1 tool results match the recording." in text
    assert "no more recorded assistant turns" not in text
    first, second = text.split("you> prepare my photos")
    assert "The recorded session ended this turn here (endpoint error: HTTP 400" in first
    assert "error: The recorded" not in first  # where the recording stopped: a notice
    assert "Preparing." not in first and "Your dataset is ready." in second
    (replayed,) = (workspace / "transcripts").glob("*.jsonl")
    kinds = [e["type"] for e in read_transcript(replayed)[1]]
    assert kinds == ["user", "notice", "user", "assistant", "approval", "tool_result",
                     "assistant"]


def test_a_malformed_transcript_is_named_with_its_line(tmp_path, workspace):
    path = tmp_path / "bad.jsonl"
    header = make_header(model="m", endpoint="e", sampling={}, tools=[], system_prompt="s")
    path.write_text(json.dumps(header) + "\n" + '{"type": "user", "message": \n')
    result = runner.invoke(app, ["--workspace", workspace, "replay", str(path), "--execute"])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in " ".join(result.stderr.split())
    missing = runner.invoke(app, ["replay", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "nope.jsonl" in missing.stderr


def _small_session() -> list[dict]:
    """A valid hand-written session: a call approved, run and answered."""
    sent = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "Sample001", "type": "function",
         "function": {"name": "sample", "arguments": '{"prompts": ["a dog"]}'}}]}
    tool_message = {"role": "tool", "tool_call_id": "Sample001", "content": "{}"}
    return [
        make_header(model="m", endpoint="e", sampling={}, tools=[], system_prompt="s"),
        {"type": "user", "message": {"role": "user", "content": "a dog please"}},
        {"type": "assistant", "content": "", "message": sent,
         "tool_calls": [{"id": "Sample001", "name": "sample",
                         "arguments": '{"prompts": ["a dog"]}'}]},
        {"type": "approval", "call_id": "Sample001", "tool": "sample", "decision": "approved",
         "arguments": {"prompts": ["a dog"]}},
        {"type": "tool_result", "call_id": "Sample001", "tool": "sample", "ok": True,
         "result": {}, "message": tool_message},
        {"type": "assistant", "content": "Done.", "tool_calls": [],
         "message": {"role": "assistant", "content": "Done."}},
    ]


def _drop(line: int, *keys: str):
    def change(events):
        target = events[line - 1]
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return change


def _set(line: int, key: str, value):
    def change(events):
        events[line - 1][key] = value
    return change


BROKEN = {
    "user without content": (_drop(2, "message", "content"),
                             ":2: user event: 'message.content' is missing"),
    "user with a role of assistant": (
        _set(2, "message", {"role": "assistant", "content": "hi"}),
        ":2: user event: 'message.role' must be 'user', not 'assistant'"),
    "call without function": (_drop(3, "message", "tool_calls", 0, "function"),
                              ":3: assistant event: 'message.tool_calls[0].function' is missing"),
    "assistant without raw calls": (_drop(3, "tool_calls"),
                                    ":3: assistant event: 'tool_calls' is missing"),
    "approval with text arguments": (
        _set(4, "arguments", "prompts=a dog"),
        ":4: approval event: 'arguments' must be a JSON object, not \"prompts=a dog\""),
    "result without call id": (_drop(5, "call_id"), ":5: tool_result event: 'call_id' is missing"),
    "result without message": (_drop(5, "message"), ":5: tool_result event: 'message' is missing"),
}


@pytest.mark.parametrize("command", ["replay", "replay --execute", "chat --resume"])
@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_transcript_missing_fields_is_named_with_its_line(tmp_path, workspace, broken,
                                                           command):
    change, expected = BROKEN[broken]
    events = _small_session()
    change(events)
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    args = {"replay": ["replay", str(path)],
            "replay --execute": ["replay", str(path), "--execute", "--yes"],
            "chat --resume": ["chat", "go on", "--resume", str(path),
                              "--base-url", "http://127.0.0.1:9/v1"]}[command]
    result = runner.invoke(app, ["--workspace", workspace, *args])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, said
    assert f"broken.jsonl{expected}" in said
    assert "Traceback" not in said and not isinstance(result.exception, KeyError)


@pytest.mark.slow
def test_demo_runs_offline_and_ends_with_sample_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--folder", str(tmp_path / "demo")])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "tool results match the recording" in text
    assert "≠" not in text  # every result matches the shipped transcript
    samples = sorted((tmp_path / "demo" / "workspace" / "samples").glob("*/*.png"))
    assert len(samples) == 5  # four images and the grid
    for sample in samples:
        assert str(sample) in text
        with Image.open(sample) as image:
            image.load()
    assert (tmp_path / "demo" / "workspace" / "runs" / "rex-demo" / "final").is_dir()


def test_a_huge_message_is_shown_shortened(tmp_path, workspace):
    """A 5 M-character message replays; the replay shows its beginning and says how much
    the transcript holds beyond it (benchmarks/bench_replay.py times it)."""
    from booth.agent.events import make_event
    from booth.agent.replay import SHOW_CHARS

    big = "".join(f"w{i} " for i in range(1_000_000))[:5_000_000]
    path = tmp_path / "big.jsonl"
    writer = TranscriptWriter.create(path, make_header(model="m", endpoint="e", sampling={},
                                                       tools=[], system_prompt="s"))
    writer.write(make_event("user", message={"role": "user", "content": big}))
    writer.write(make_event("assistant", content=big, tool_calls=[],
                            message={"role": "assistant", "content": big}))
    writer.close()
    result = runner.invoke(app, ["--workspace", workspace, "replay", str(path)])
    assert result.exit_code == 0, result.output
    text = "".join(result.output.split())
    more = f"[{len(big) - SHOW_CHARS}morecharactersinthetranscript]"
    assert text.count(more) == 2
    assert "".join(big[:SHOW_CHARS].split()) in text
    assert "".join(big[SHOW_CHARS: SHOW_CHARS + 40].split()) not in text
    assert len(result.output) < 4 * SHOW_CHARS
