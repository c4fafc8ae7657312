"""`booth replay --execute` reproduces what the recording did: where it ran, where the user
stopped a training, what the user edited, where the file ends; `chat --resume` recaps it."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from fakellm import FakeLLM, reply
from typer.testing import CliRunner

from booth.agent.approval import AutoApprove, Decision
from booth.agent.loop import Session
from booth.agent.model import AssistantTurn, ScriptedModel, ToolCall
from booth.agent.replay import session_places
from booth.agent.transcript import TranscriptWriter, make_header, read_transcript
from booth.cli import app
from booth.tools import TOOLS, ToolContext

runner = CliRunner()
PREPARE = {"images_dir": "photos", "class_noun": "dog", "resolution": 64, "name": "rex"}
TRAIN = {"dataset": "rex", "max_train_steps": 6, "checkpointing_steps": 2,
         "learning_rate": 1e-4, "prior_loss_weight": 0, "report_to": "none",
         "train_text_encoder": False, "run_name": "rex-run", "validation_steps": 0}


def turn(text, *calls):
    tool_calls = [ToolCall(cid, name, json.dumps(args)) for cid, name, args in calls]
    return AssistantTurn(text, tool_calls, "tool_calls" if tool_calls else "stop")


def said(result) -> str:
    return " ".join(result.output.split())


def record(folder: Path, model: str, user_turns: list[tuple[str, list]], policy=None,
           ctx: ToolContext | None = None) -> Path:
    """A real session run in `folder` (photos/ beside its workspace ws/), saved as
    folder/session.jsonl. `user_turns`: (message, scripted assistant turns) each."""
    from booth.demo import draw_subject_photos

    draw_subject_photos(folder / "photos", count=2, size=64)
    ctx = ctx or ToolContext.from_options(workspace=str(folder / "ws"), base_model=model)
    header = make_header(model="scripted", endpoint="none", sampling={},
                         tools=[t.openai_spec() for t in TOOLS.values()], system_prompt="sys",
                         **session_places(ctx))
    path = folder / "session.jsonl"
    writer = TranscriptWriter.create(path, header)
    script = [t for _, turns in user_turns for t in turns]
    session = Session(ScriptedModel(script), ctx, policy or AutoApprove(), system_prompt="sys",
                      transcript=writer)
    for message, _ in user_turns:
        session.send(message)
    writer.close()
    return path


def replay(path, *args, before=()):
    return runner.invoke(app, [*before, "replay", str(path), "--execute", "--yes", *args])


@pytest.fixture
def prepared(tmp_path, tiny_model, monkeypatch) -> Path:
    """A session recorded in tmp_path/rec: one prepare_dataset call naming photos/ relative
    to the recorded working folder, and a final answer."""
    folder = tmp_path / "rec"
    folder.mkdir()
    monkeypatch.chdir(folder)
    path = record(folder, tiny_model, [("prepare my photos", [
        turn("Preparing.", ("Prepare001", "prepare_dataset", PREPARE)), turn("Done.")])])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the replay is started from another folder
    return path


# -- A: the recorded workspace, base model and working folder ----------------------------------
def test_execute_uses_the_recorded_workspace_model_and_folder(prepared, tmp_path):
    recorded_ws = tmp_path / "rec" / "ws"
    shutil.rmtree(recorded_ws)  # a user clears the workspace to replay it cleanly
    result = replay(prepared)
    text = said(result)
    assert result.exit_code == 0, result.output
    assert f"workspace: {recorded_ws} (recorded" in text
    assert "base model: " in text and "(recorded; --base-model to use another)" in text
    assert f"working folder: {tmp_path / 'rec'} (recorded" in text
    assert "1 of 1 tool results match the recording." in text
    assert len(list((recorded_ws / "datasets" / "rex" / "images").glob("*.png"))) == 2
    assert not (tmp_path / "elsewhere" / "booth-workspace").exists()
    assert Path.cwd() == tmp_path / "elsewhere"  # the replay came back


@pytest.mark.parametrize("where", ["before", "after", "environment"])
def test_workspace_flag_before_or_after_the_command_overrides(prepared, tmp_path, where,
                                                              monkeypatch):
    new = tmp_path / "ws-new"
    flag = ["--workspace", str(new)]
    if where == "environment":  # the user's standing choice counts as given, too
        monkeypatch.setenv("BOOTH_WORKSPACE", str(new))
    result = replay(prepared, *(flag if where == "after" else []),
                    before=flag if where == "before" else [])
    text = said(result)
    assert result.exit_code == 0, result.output
    assert f"workspace: {new} (given)" in text
    assert (new / "datasets" / "rex" / "manifest.json").is_file()


def test_a_recorded_base_model_that_is_gone_is_refused_unless_one_is_given(prepared, tmp_path,
                                                                         tiny_model):
    lines = prepared.read_text().splitlines()
    header = json.loads(lines[0])
    header["base_model"] = str(tmp_path / "deleted-model")
    prepared.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    result = replay(prepared)
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert f"the recorded base model {tmp_path / 'deleted-model'} no longer exists" in message
    assert "--base-model" in message and "Traceback" not in message
    assert not (tmp_path / "elsewhere" / "booth-workspace").exists()
    given = replay(prepared, "--base-model", tiny_model, "--workspace", str(tmp_path / "w2"))
    assert given.exit_code == 0, given.output
    assert f"base model: {tiny_model} (given)" in said(given)


def test_a_recorded_workspace_whose_parent_is_gone_is_refused(prepared, tmp_path):
    lines = prepared.read_text().splitlines()
    header = json.loads(lines[0])
    header["workspace"] = "/nonexistent-booth-machine/ws"
    prepared.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    result = replay(prepared)
    assert result.exit_code == 2
    assert "--workspace" in result.stderr and "/nonexistent-booth-machine/ws" in result.stderr
    assert not Path("/nonexistent-booth-machine").exists()


def test_a_recorded_working_folder_that_is_gone_is_said(prepared, tmp_path):
    shutil.move(tmp_path / "rec" / "photos", tmp_path / "elsewhere" / "photos")
    lines = prepared.read_text().splitlines()
    header = json.loads(lines[0])
    header["cwd"] = str(tmp_path / "gone")
    prepared.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    result = replay(prepared, "--workspace", str(tmp_path / "w3"))
    text = said(result)
    assert f"the recorded working folder {tmp_path / 'gone'} is gone" in text
    assert f"taken from the current folder {tmp_path / 'elsewhere'}" in text
    manifest = json.loads((tmp_path / "w3" / "datasets" / "rex" / "manifest.json").read_text())
    assert manifest["source"] == str(tmp_path / "elsewhere" / "photos")


# -- B: a training stopped with Ctrl-C at step 3, resumed in the next user turn ------------------
class StopAtStep(threading.Event):
    """What a person pressing Ctrl-C during step 3 does to the recording: the stop is asked
    once the run's third step is logged."""

    def __init__(self, metrics: Path, step: int):
        super().__init__()
        self.metrics, self.step, self.fired = metrics, step, False

    def is_set(self) -> bool:
        if not self.fired and self.metrics.is_file() and \
                len(self.metrics.read_text().splitlines()) >= self.step:
            self.fired = True
            self.set()
        return super().is_set()


@pytest.fixture
def interrupted(tmp_path, tiny_model, monkeypatch) -> Path:
    folder = tmp_path / "rec"
    folder.mkdir()
    monkeypatch.chdir(folder)
    ctx = ToolContext.from_options(workspace=str(folder / "ws"), base_model=tiny_model)
    ctx.stop_requested = StopAtStep(folder / "ws" / "runs" / "rex-run" / "metrics.jsonl", 3)
    path = record(folder, tiny_model, [
        ("teach it my dog", [turn("Preparing.", ("Prepare001", "prepare_dataset", PREPARE)),
                             turn("Training.", ("TrainRex1", "train", TRAIN))]),
        ("go on with the training", [
            turn("Resuming.", ("Resume001", "resume_checkpoint", {"run": "rex-run"})),
            turn("The run is complete.")]),
    ], ctx=ctx)
    events = read_transcript(path)[1]
    results = {e["call_id"]: e for e in events if e["type"] == "tool_result"}
    assert results["TrainRex1"]["result"]["status"] == "interrupted"
    assert results["TrainRex1"]["result"]["steps"] == 3
    assert results["Resume001"]["result"]["status"] == "completed"
    monkeypatch.chdir(tmp_path)
    return path


def test_a_training_stopped_in_the_recording_stops_at_the_same_step(interrupted, tmp_path):
    new = tmp_path / "ws-replay"
    result = replay(interrupted, "--workspace", str(new))
    text = said(result)
    assert result.exit_code == 0, result.output
    assert "3 of 3 tool results match the recording." in text
    metrics = (new / "runs" / "rex-run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4, 5, 6]
    (replayed,) = (new / "transcripts").glob("*.jsonl")
    events = read_transcript(replayed)[1]
    stops = [e for e in events if e["type"] == "interrupted"]
    assert [e.get("call_id") for e in stops] == ["TrainRex1"]
    train = next(e for e in events if e["type"] == "tool_result" and e["tool"] == "train")
    assert train["result"]["steps"] == 3 and train["result"]["status"] == "interrupted"


def test_replaying_into_the_recorded_workspace_explains_the_refusals(interrupted, tmp_path):
    result = replay(interrupted)  # the recorded workspace: its run rex-run already exists
    text = said(result)
    assert result.exit_code == 1
    assert "run 'rex-run' already exists" in text
    assert f"This replay ran in the recorded workspace {tmp_path / 'rec' / 'ws'}" in text
    assert f"booth replay {interrupted} --execute --workspace NEW" in text


# -- C: a transcript that ends in the middle of a turn ------------------------------------------
def test_a_transcript_cut_mid_turn_ends_with_a_notice_and_exit_0(prepared, tmp_path):
    lines = prepared.read_text().splitlines()
    assert json.loads(lines[-1])["content"] == "Done."
    prepared.write_text("\n".join(lines[:-1]) + "\n")  # the final answer never came
    result = replay(prepared, "--workspace", str(tmp_path / "w"))
    text = said(result)
    assert result.exit_code == 0, result.output
    assert "1 of 1 tool results match the recording." in text
    assert "error:" not in text and "went differently" not in text
    assert ("The recorded session ended this turn here (the transcript ends before the "
            "model's next answer)") in text


def test_a_turn_cut_by_a_crash_then_resumed_replays_clean(prepared, tmp_path, tiny_model):
    lines = prepared.read_text().splitlines()
    prepared.write_text("\n".join(lines[:-1]) + "\n")  # the crash: no final answer
    ctx = ToolContext.from_options(workspace=str(tmp_path / "rec" / "ws"), base_model=tiny_model)
    header = make_header(model="scripted", endpoint="none", sampling={}, tools=[],
                         system_prompt="sys", **session_places(ctx))
    session = Session.from_transcript(prepared, ScriptedModel([turn("I am here.")]), ctx,
                                      AutoApprove(), header=header)
    assert session.send("are you there?") is True
    session.transcript.close()
    result = replay(prepared, "--workspace", str(tmp_path / "w"))
    text = said(result)
    assert result.exit_code == 0, result.output
    assert "1 of 1 tool results match the recording." in text
    assert "error:" not in text and "went differently" not in text
    first, second = text.split("you> are you there?")
    assert ("The recorded session ended this turn here (the session stopped here and was "
            "resumed later)") in first
    assert "I am here." in second


# -- D: edits the recording made, a damaged last line ------------------------------------------
class EditName(AutoApprove):
    """The recorded user changed the dataset's name before running (and chose 'always')."""

    def decide(self, tool, call_id, arguments, ctx):
        edited = {**arguments, "name": "rex-edited"}
        return Decision("run", edited, edited=True, always=True)


@pytest.mark.parametrize("version", [1, 2])
def test_the_recorded_edit_is_what_runs_again(tmp_path, tiny_model, monkeypatch, version):
    folder = tmp_path / "rec"
    folder.mkdir()
    monkeypatch.chdir(folder)
    path = record(folder, tiny_model, [("prepare", [
        turn("Preparing.", ("Prepare001", "prepare_dataset", PREPARE)), turn("Done.")])],
        policy=EditName())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if version == 1 and line["type"] == "header":
            line["version"] = 1
        if version == 1 and line["type"] == "approval":
            line["decision"], line["edited"] = "edited", None  # as booth 0.1 wrote an edit
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    new = tmp_path / "ws-new"
    result = replay(path, "--workspace", str(new))
    assert result.exit_code == 0, result.output
    assert "1 of 1 tool results match the recording." in said(result)
    assert (new / "datasets" / "rex-edited").is_dir() and not (new / "datasets" / "rex").exists()


@pytest.mark.parametrize("execute", [False, True])
def test_a_damaged_last_line_is_said(prepared, tmp_path, execute):
    torn = len(prepared.read_text().splitlines()) + 1
    with prepared.open("a") as file:
        file.write('{"type": "assistant", "content": "Let me')
    args = ["--workspace", str(tmp_path / "w"), "replay", str(prepared)]
    result = runner.invoke(app, [*args, "--execute", "--yes"] if execute else args)
    text = said(result)
    assert result.exit_code == 0, result.output
    assert f"its last line ({torn}) was cut off while it was written" in text


# -- E: chat --resume recaps the conversation it continues ------------------------------------
def test_resume_recaps_the_last_turns_before_going_on(interrupted, tmp_path):
    with FakeLLM([reply("Sure, here is what we did.")]) as llm:
        result = runner.invoke(app, ["--workspace", str(tmp_path / "rec" / "ws"), "chat",
                                     "what did we do?", "--resume", str(interrupted),
                                     "--base-url", llm.base_url])
    text = said(result)
    assert result.exit_code == 0, result.output
    recap, rest = text.split("Sure, here is what we did.")
    assert "(the conversation so far: 2 turns)" in recap
    assert recap.index("you> teach it my dog") < recap.index(
        "tools: prepare_dataset ok · train stopped at step 3") < recap.index(
        "(the turn ended early: Stopped at a safe point") < recap.index(
        "you> go on with the training") < recap.index(
        "tools: resume_checkpoint ok") < recap.index("The run is complete.")
    assert "Training." not in recap  # said before a call: no answer of the turn


def test_resume_recaps_only_the_last_three_turns(tmp_path, workspace):
    path = tmp_path / "t.jsonl"
    for n in range(1, 6):
        args = ["--transcript", str(path)] if n == 1 else ["--resume", str(path)]
        with FakeLLM([reply(f"answer {n}")]) as llm:
            result = runner.invoke(app, ["--workspace", workspace, "chat", f"question {n}",
                                         *args, "--base-url", llm.base_url])
            assert result.exit_code == 0, result.output
    text = said(result)
    recap = text.split("answer 5")[0]
    assert "(the conversation so far: the last 3 of 4 turns)" in recap
    assert "question 1" not in recap and "answer 1" not in recap
    assert recap.index("you> question 2") < recap.index("answer 2") < recap.index(
        "you> question 4") < recap.index("answer 4")


def test_ctrl_d_at_a_replayed_approval_ends_the_replay_without_a_traceback(tmp_path,
                                                                          monkeypatch):
    from typer.testing import CliRunner

    from booth.cli import app
    from booth.commands import session
    from booth.demo import shipped_transcript

    monkeypatch.setattr(session, "stdin_is_tty", lambda: True)  # so approvals are asked
    result = CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "--base-model", str(tmp_path),
                                      "replay", str(shipped_transcript()), "--execute"],
                                input="")
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
