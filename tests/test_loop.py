"""The agent loop against a real chat-completions server on loopback (tests/fakellm.py), the
real openai client and the real tools: what runs, what the model is told, what is recorded."""

from __future__ import annotations

import io
import json
import os
import signal
from datetime import date
from pathlib import Path
from typing import Annotated

import pytest
from fakellm import FakeLLM, call, calls, reply
from rich.console import Console

from booth.agent.approval import AskUser, AutoApprove
from booth.agent.endpoint import OpenAIChatModel
from booth.agent.loop import Session, SessionAborted
from booth.agent.model import ReplayModel
from booth.agent.prompt import build_system_prompt
from booth.agent.settings import EndpointSettings
from booth.agent.transcript import (
    TranscriptWriter,
    assistant_turns,
    conversation,
    make_header,
    read_transcript,
)
from booth.agent.ui import ChatUI
from booth.agent.wire import check_request
from booth.tools import TOOLS, ToolContext, ToolError
from booth.tools.registry import Param, tool


@pytest.fixture
def ctx(workspace, tiny_model):
    return ToolContext.from_options(workspace=workspace, base_model=tiny_model,
                                    console=Console(file=io.StringIO()))


@pytest.fixture
def photos(tmp_path) -> str:
    from booth.demo import draw_subject_photos

    folder = tmp_path / "photos" / "rex"
    draw_subject_photos(folder, count=3, size=64)
    return str(folder)


def dataset_args(photos: str, **changes) -> dict:
    return {"images_dir": photos, "class_noun": "dog", "resolution": 64, "name": "rex",
            **changes}


def start(llm: FakeLLM, ctx, path: Path, policy=None, *, stream=True, api_key="EMPTY",
          tools=None, **options) -> Session:
    """A session as `booth chat` builds it, talking to `llm`, writing `path`."""
    settings = EndpointSettings(base_url=llm.base_url, model=llm.model, stream=stream,
                                api_key=api_key, retry_backoff=0.01)
    ui = ChatUI(Console(file=io.StringIO(), width=120, color_system=None))
    specs = [t.openai_spec() for t in (tools or TOOLS).values()]
    header = make_header(model=settings.model, endpoint=settings.describe(), sampling={},
                         tools=specs, system_prompt="You are booth.")
    writer = TranscriptWriter.create(path, header, secrets=[api_key])
    return Session(OpenAIChatModel(settings), ctx, policy or AutoApprove(ui=ui),
                   system_prompt="You are booth.", transcript=writer, ui=ui, tools=tools,
                   context_window=settings.context_window, **options)


def shown(session: Session) -> str:
    return session.ui.console.file.getvalue()


def assert_every_request_obeys_mistral(llm: FakeLLM) -> None:
    for body in llm.requests:
        check_request(body["messages"], body.get("tools"), body["model"])


def tool_messages(body: dict) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


def events_of(path: Path, kind: str) -> list[dict]:
    return [e for e in read_transcript(path)[1] if e["type"] == kind]


MALFORMED = {
    "unparseable JSON": ("prepare_dataset", '{"images_dir": "x", "class_noun": ',
                         "arguments are not valid JSON"),
    "unknown tool": ("prepare_data", {"images_dir": "x", "class_noun": "dog"},
                     "unknown tool 'prepare_data'; available: prepare_dataset"),
    "unusable tool name": ("prepare dataset!", {"images_dir": "x", "class_noun": "dog"},
                           "unknown tool 'prepare dataset!'"),
    "wrong type": ("prepare_dataset", {"images_dir": "x", "class_noun": "dog",
                                       "resolution": "64", "name": "bad"},
                   "resolution: '64' is not of type 'integer'"),
    "missing field": ("prepare_dataset", {"images_dir": "x", "name": "bad"},
                      "'class_noun' is required"),
    "extra field": ("prepare_dataset", {"images_dir": "x", "class_noun": "dog", "name": "bad",
                                        "colour": "red"}, "unknown field(s) 'colour'"),
    "out of bounds": ("prepare_dataset", {"images_dir": "x", "class_noun": "dog", "name": "bad",
                                          "resolution": 8}, "8 is less than the minimum of 64"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_call_runs_nothing_and_the_corrected_call_runs(kind, ctx, photos, tmp_path):
    name, args, problem = MALFORMED[kind]
    path = tmp_path / "t.jsonl"
    script = [call(name, args), call("prepare_dataset", dataset_args(photos)), reply("Ready.")]
    with FakeLLM(script) as llm:
        session = start(llm, ctx, path, stream=kind != "wrong type")
        assert session.send("prepare my photos")
    told = tool_messages(llm.requests[1])[-1]
    assert told.startswith("Error: ") and problem in told and "Nothing was run" in told
    assert os.listdir(Path(ctx.workspace.root) / "datasets") == ["rex"]  # only the good call
    (invalid,) = events_of(path, "validation_error")
    assert problem in invalid["error"] and invalid["tool"] == name
    (result,) = events_of(path, "tool_result")
    assert result["ok"] and result["result"]["dataset"] == "rex"
    assert json.loads(tool_messages(llm.requests[2])[-1])["dataset"] == "rex"
    assert_every_request_obeys_mistral(llm)


def test_three_invalid_calls_in_a_row_hand_control_back(ctx, tmp_path):
    bad = call("prepare_dataset", {"oops": 1})
    script = [bad, bad, calls([bad, bad]), reply("Sorry, which folder?")]
    with FakeLLM(script) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl")
        assert session.send("go") is False
        assert len(llm.requests) == 3  # stopped: the model was not asked a fourth time
        assert "3 invalid tool calls in a row" in shown(session)
        # The fourth call, in the same turn as the third, is answered but not run.
        assert "not run" in session.messages[-1]["content"]
        assert session.send("the photos are in ./rex")  # the user takes over; chat goes on
    assert_every_request_obeys_mistral(llm)


def test_a_refusal_and_its_reason_reach_the_model(ctx, photos, tmp_path):
    answers = iter(["n", "use 128 px instead"])
    policy = AskUser(Console(file=io.StringIO()), input=lambda prompt: next(answers))
    script = [call("prepare_dataset", dataset_args(photos)), reply("OK, 128 px then?")]
    with FakeLLM(script) as llm:
        assert start(llm, ctx, tmp_path / "t.jsonl", policy).send("prepare")
    assert tool_messages(llm.requests[1]) == ["Cancelled by the user: use 128 px instead"]
    assert not (Path(ctx.workspace.root) / "datasets").exists()
    (approval,) = events_of(tmp_path / "t.jsonl", "approval")
    assert approval["decision"] == "refused" and approval["reason"] == "use 128 px instead"
    assert_every_request_obeys_mistral(llm)


def test_an_edit_is_revalidated_run_and_recorded(ctx, photos, tmp_path):
    answers = iter(["e", "resolution=60", "resolution=64 name=rexy", "y"])
    console = Console(file=io.StringIO(), width=120)
    policy = AskUser(console, input=lambda prompt: next(answers))
    script = [call("prepare_dataset", dataset_args(photos, resolution=128)), reply("Done.")]
    with FakeLLM(script) as llm:
        assert start(llm, ctx, tmp_path / "t.jsonl", policy).send("prepare")
    assert "60 is less than the minimum of 64" in console.file.getvalue()  # asked again
    (approval,) = events_of(tmp_path / "t.jsonl", "approval")
    assert approval["decision"] == "edited" and approval["edited"]
    assert approval["arguments"]["resolution"] == 64 and approval["arguments"]["name"] == "rexy"
    # The history keeps the model's own arguments, so the model is told what really ran.
    answer = tool_messages(llm.requests[1])[-1]
    assert answer.startswith("The user edited the arguments before running; it ran with {")
    assert '"name": "rexy"' in answer
    (result,) = events_of(tmp_path / "t.jsonl", "tool_result")
    assert result["arguments"]["name"] == "rexy" and result["result"]["resolution"] == 64
    assert (Path(ctx.workspace.root) / "datasets" / "rexy" / "manifest.json").is_file()


# Tools for the failure paths the real ones cannot be made to take on purpose.
@tool
def explode(ctx, kind: Annotated[str, Param("which failure")]) -> dict:
    """Fail in the way asked."""
    if kind == "tool":
        raise ToolError("the dataset 'rex' does not exist")
    raise RuntimeError("boom")


@tool
def long_job(ctx, presses: Annotated[int, Param("Ctrl-C presses to simulate")]) -> dict:
    """Run until asked to stop, like training."""
    for _ in range(presses):
        os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs between bytecodes
        if ctx.stop_requested.is_set() and presses == 1:
            return {"status": "interrupted", "checkpoint": "checkpoint-3"}
    return {"status": "finished"}


def test_tool_errors_and_crashes_become_error_results_and_the_session_goes_on(ctx, tmp_path):
    script = [calls([call("explode", {"kind": "tool"}), call("explode", {"kind": "bug"})]),
              reply("Something went wrong.")]
    with FakeLLM(script) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl", tools={"explode": explode})
        assert session.send("go")
    assert tool_messages(llm.requests[1]) == ["Error: the dataset 'rex' does not exist",
                                              "Error: RuntimeError: boom"]
    crash = events_of(tmp_path / "t.jsonl", "tool_result")[1]
    assert not crash["ok"] and "RuntimeError: boom" in crash["traceback"]
    assert_every_request_obeys_mistral(llm)


def test_first_ctrl_c_stops_the_tool_ends_the_turn_and_the_model_is_told_next(ctx, tmp_path):
    script = [call("long_job", {"presses": 1}), reply("Stopped at checkpoint-3.")]
    with FakeLLM(script) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl", tools={"long_job": long_job})
        assert not session.send("train")  # the turn ends: the person types next
        assert len(llm.requests) == 1, "the model must not be asked again at once"
        assert session.send("what now?")
    (told,) = tool_messages(llm.requests[1])
    assert told.startswith("The user pressed Ctrl-C while the tool ran") and '"interrupted"' in told
    assert not ctx.stop_requested.is_set()  # cleared for the next tool
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert events_of(tmp_path / "t.jsonl", "interrupted")


def test_second_ctrl_c_aborts_and_leaves_a_resumable_transcript(ctx, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([call("long_job", {"presses": 2})]) as llm:
        session = start(llm, ctx, path, tools={"long_job": long_job})
        with pytest.raises(SessionAborted):
            session.send("train")
    _, events = read_transcript(path)
    assert events[-1]["type"] == "interrupted"
    messages = conversation(events) + [{"role": "user", "content": "go on"}]
    check_request([{"role": "system", "content": "s"}, *messages], None, "m")


def test_model_turns_per_user_message_are_bounded(ctx, tmp_path):
    script = [call("explode", {"kind": "tool"})] * 3
    with FakeLLM(script) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl", tools={"explode": explode},
                        max_model_turns=3)
        assert session.send("go") is False
    assert "Stopped after 3 model turns" in shown(session)


def test_endpoint_down_is_one_clear_message_and_the_session_survives(ctx, tmp_path):
    with FakeLLM([]) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl")
    # The server is gone: nothing listens on its port any more.
    assert session.send("hello") is False
    assert "Could not reach the model endpoint at http://127.0.0.1" in shown(session)
    assert "Traceback" not in shown(session)
    (event,) = events_of(tmp_path / "t.jsonl", "endpoint_error")
    assert "vllm serve" in event["error"]


def test_the_api_key_is_used_but_never_written(ctx, photos, tmp_path):
    key = "sk-test-9f8e7d6c5b4a"
    script = [call("prepare_dataset", dataset_args(photos)), reply("Done.")]
    with FakeLLM(script) as llm:
        start(llm, ctx, tmp_path / "t.jsonl", api_key=key).send(f"prepare; my key is {key}")
    headers = {k.lower(): v for k, v in llm.headers[0].items()}
    assert headers["authorization"] == f"Bearer {key}"
    assert key not in (tmp_path / "t.jsonl").read_text()


def test_a_recorded_session_replays_through_the_same_loop(ctx, photos, tmp_path, workspace):
    script = [call("prepare_dataset", dataset_args(photos)), reply("Done.")]
    with FakeLLM(script) as llm:
        start(llm, ctx, tmp_path / "t.jsonl").send("prepare")
    _, events = read_transcript(tmp_path / "t.jsonl")
    replay_ctx = ToolContext.from_options(workspace=str(tmp_path / "again"),
                                          base_model=ctx.base_model,
                                          console=Console(file=io.StringIO()))
    results: list[dict] = []
    ui = ChatUI(Console(file=io.StringIO()))
    session = Session(ReplayModel(assistant_turns(events)), replay_ctx, AutoApprove(ui=ui),
                      system_prompt="You are booth.", ui=ui, on_result=results.append)
    assert session.send(events[0]["message"]["content"])
    recorded = events_of(tmp_path / "t.jsonl", "tool_result")
    assert [(r["ok"], r["result"]["kept"]) for r in results] == \
        [(r["ok"], r["result"]["kept"]) for r in recorded] == [(True, 3)]


@pytest.mark.slow
def test_a_full_session_reaches_sample_images_on_disk(ctx, photos, tmp_path):
    path = tmp_path / "t.jsonl"
    script = [
        calls([call("prepare_dataset", dataset_args(photos))],
              text="First I prepare your photos."),
        call("generate_priors", {"class_prompt": "a photo of a dog", "num_images": 2,
                                 "resolution": 64, "num_inference_steps": 2}),
        call("train", {"dataset": "rex", "max_train_steps": 2, "learning_rate": 5e-6,
                       "class_prompt": "a photo of a dog", "resolution": 64,
                       "checkpointing_steps": 1, "report_to": "none", "run_name": "rex-1"}),
        call("sample", {"prompts": ["a photo of sks dog on the moon"], "run": "rex-1",
                        "num_images_per_prompt": 1, "num_inference_steps": 2,
                        "height": 64, "width": 64}),
        reply("Here is Rex on the moon."),
    ]
    with FakeLLM(script) as llm:
        session = start(llm, ctx, path)
        assert session.send("teach the model my dog and show him on the moon")
    results = events_of(path, "tool_result")
    assert [(r["tool"], r["ok"]) for r in results] == [
        ("prepare_dataset", True), ("generate_priors", True), ("train", True), ("sample", True)]
    images = results[-1]["result"]["images"]
    assert images and all(Path(p).is_file() for p in images)
    # Each result reached the model before its next turn; every request obeyed Mistral.
    assert len(llm.requests) == 5
    assert json.loads(tool_messages(llm.requests[4])[-1])["images"] == images
    assert_every_request_obeys_mistral(llm)
    assert "First I prepare your photos." in shown(session)
    # The next session's system prompt plans from what is now on disk.
    prompt = build_system_prompt(ctx, device="CPU only")
    assert "- rex: 3 images kept, instance_prompt 'a photo of sks dog'" in prompt
    assert "2 images of 'a photo of a dog' at 64 px" in prompt
    assert "- rex-1: " in prompt and "checkpoints at steps 1, 2; last loss" in prompt
    assert "finished: final/" in prompt


def test_the_system_prompt_survives_a_broken_workspace(ctx):
    root = Path(ctx.workspace.root)
    (root / "datasets" / "rex").mkdir(parents=True)
    (root / "datasets" / "rex" / "manifest.json").write_text("{broken")
    (root / "priors" / "dogs").mkdir(parents=True)
    checkpoint = root / "runs" / "r1" / "checkpoints" / "checkpoint-400"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text('{"step": 400}')  # written last: complete
    (root / "runs" / "r1" / "checkpoints" / "checkpoint-500").mkdir()  # incomplete: not listed
    (root / "runs" / "r1" / "run.yaml").write_text("max_train_steps: [unclosed")
    (root / "runs" / "r1" / "metrics.jsonl").write_text(
        '{"step": 400, "loss": 0.25}\n{"st')  # a crash mid-way through a line
    (root / "runs" / "r2").mkdir()
    (root / "runs" / "r2" / "run.yaml").write_bytes(b"class_prompt: caf\xe9")  # not UTF-8
    (root / "runs" / "r2" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n\xe2\x82')
    prompt = build_system_prompt(ctx, today=date(2026, 5, 4), device="CPU only")
    assert "- rex: manifest.json missing or unreadable" in prompt
    assert "- dogs: priors.json missing or unreadable" in prompt
    assert "run.yaml missing or unreadable; checkpoints at steps 400; last loss 0.25" in prompt
    assert "- r2: run.yaml missing or unreadable; no checkpoints; no final weights yet" in prompt
    assert "Today is 2026-05-04" in prompt and f"base model: {ctx.base_model}" in prompt
    assert "{" + "state}" not in prompt  # every placeholder filled


def test_the_system_prompt_of_an_empty_workspace_says_so(ctx):
    prompt = build_system_prompt(ctx, device="CPU only")
    assert prompt.count("- none yet") == 3
    assert "user's language" in prompt and "minors" in prompt


def test_a_server_error_is_retried_and_the_turn_completes(ctx, tmp_path):
    from fakellm import error

    with FakeLLM([error(500, "CUDA out of memory"), error(429, "slow down"),
                  reply("Hello.")]) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl")
        assert session.send("hi")
    assert len(llm.requests) == 3 and "Hello." in shown(session)
    assert not events_of(tmp_path / "t.jsonl", "endpoint_error")


class _CtrlCAtApproval:
    def decide(self, tool, call_id, arguments, ctx):
        raise KeyboardInterrupt


def test_ctrl_c_outside_a_tool_ends_the_turn_and_keeps_the_history_valid(ctx, tmp_path):
    script = [calls([call("explode", {"kind": "tool"}), call("explode", {"kind": "tool"})]),
              reply("Okay.")]
    with FakeLLM(script) as llm:
        session = start(llm, ctx, tmp_path / "t.jsonl", _CtrlCAtApproval(),
                        tools={"explode": explode})
        assert session.send("go") is False
        assert "Interrupted" in shown(session)
        assert session.send("never mind")
    assert tool_messages(llm.requests[1]) == ["Error: not run: the user interrupted."] * 2
    assert_every_request_obeys_mistral(llm)


def test_the_model_reads_the_workspace_as_it_is_now(ctx, photos, workspace):
    """Without a fixed prompt, each request's system prompt lists what the tools just made."""
    ui = ChatUI(Console(file=io.StringIO()))
    with FakeLLM([call("prepare_dataset", dataset_args(photos)), reply("Ready.")]) as llm:
        settings = EndpointSettings(base_url=llm.base_url, model=llm.model)
        session = Session(OpenAIChatModel(settings), ctx, AutoApprove(ui=ui), ui=ui)
        assert session.send("prepare my photos")
    before, after = (body["messages"][0]["content"] for body in llm.requests)
    assert "- rex:" not in before
    assert "- rex: 3 images kept" in after
