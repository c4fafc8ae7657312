"""Runs killed at the worst moments: before their first checkpoint, and by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import ARGS, CHILD, make_workspace, rows

from booth.tools import ToolContext, ToolError, get_tool


def start_training(workspace: Path, base_model: str, arguments: dict) -> subprocess.Popen:
    log = (workspace / "child.log").open("wb")  # a file: a full pipe would stall the child
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(workspace), base_model, json.dumps(arguments)],
        stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ))


def wait_for(child: subprocess.Popen, condition, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not condition():
        child.kill()
        raise AssertionError(f"{what} did not happen (child exit {child.poll()})")


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.fixture(scope="module")
def killed_early(tmp_path_factory, tiny_model):
    """'early' is SIGKILLed after 3+ steps, long before its first checkpoint (step 10);
    'whole' is the same run never stopped."""
    root = tmp_path_factory.mktemp("ws")
    make_workspace(root)
    arguments = {**ARGS, "max_train_steps": 12, "checkpointing_steps": 10}
    child = start_training(root, tiny_model, {**arguments, "run_name": "early"})
    early = root / "runs" / "early"
    wait_for(child, lambda: metric_lines(early) >= 3, "three logged steps")
    child.send_signal(signal.SIGKILL)
    child.wait()
    at_kill = {"lines": metric_lines(early), "checkpoints": early / "checkpoints"}
    assert not list((early / "checkpoints").glob("checkpoint-*")), "killed too late"
    ctx = ToolContext.from_options(workspace=str(root), base_model=tiny_model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("booth.tools.priors.find_prior_set",
                      lambda ctx, prompt, base=None, **_: root / "priors" / "dog")
        whole = get_tool("train").run(ctx, {**arguments, "run_name": "whole"})
    return {"ctx": ctx, "root": root, "at_kill": at_kill, "whole": whole}


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(killed_early):
    ctx, root = killed_early["ctx"], killed_early["root"]
    assert killed_early["at_kill"]["lines"] >= 3
    # Starting it again under the same name points at resume_checkpoint...
    with pytest.raises(ToolError, match="already exists.*resume_checkpoint"):
        get_tool("train").run(ctx, {**ARGS, "max_train_steps": 12, "run_name": "early"})
    # ...and resume_checkpoint really continues it: from step 0, with its saved config.
    resumed = get_tool("resume_checkpoint").run(ctx, {"run": "early"})
    assert resumed["status"] == "completed" and resumed["steps"] == 12
    assert resumed["checkpoints"] == ["checkpoint-10", "checkpoint-12"]
    assert rows(root / "runs" / "early") == rows(root / "runs" / "whole")


@pytest.mark.slow
def test_naming_a_checkpoint_of_a_run_that_has_none_says_so(killed_early, tmp_path):
    ctx = killed_early["ctx"]
    early = killed_early["root"] / "runs" / "early"
    (early / "checkpoints").rename(tmp_path / "saved")  # as it was before any checkpoint
    try:
        with pytest.raises(ToolError, match="no complete checkpoint yet.*'latest'.*from step 0"):
            get_tool("resume_checkpoint").run(ctx, {"run": "early", "checkpoint": "5"})
    finally:
        (tmp_path / "saved").rename(early / "checkpoints")


def booth(workspace: Path, base_model: str, *args: str, **popen) -> subprocess.Popen:
    """A real `booth` process (its own signal handlers, its own exit code)."""
    command = [sys.executable, "-m", "booth.cli", "-w", str(workspace), "--base-model",
               base_model, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ), **popen)


TRAIN_LONG = ["dataset=rex", "max_train_steps=400", "learning_rate=1e-4", "prior_loss_weight=0",
              "checkpointing_steps=1000", "report_to=none", "run_name=long", "validation_steps=0"]


@pytest.mark.slow
@pytest.mark.parametrize("sent, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["kill", "closed terminal"])
def test_a_signal_stops_booth_call_train_at_a_fresh_checkpoint_and_says_how_to_resume(
        tmp_path, tiny_model, sent, code):
    make_workspace(tmp_path)
    run_dir = tmp_path / "runs" / "long"
    child = booth(tmp_path, tiny_model, "call", "train", *TRAIN_LONG)
    wait_for(child, lambda: metric_lines(run_dir) >= 3, "three logged steps")
    child.send_signal(sent)
    out, err = child.communicate(timeout=120)
    assert child.returncode == code, err[-2000:]
    result = json.loads(out)
    assert result["status"] == "interrupted" and result["steps"] < 400
    # The checkpoint is the step it stopped at: nothing trained is lost.
    assert result["checkpoints"] == [f"checkpoint-{result['steps']}"]
    assert metric_lines(run_dir) == result["steps"]
    text = " ".join(err.split())
    assert f"terminated ({signal.Signals(sent).name})" in text
    assert "resume_checkpoint(run='long')" in text


@pytest.mark.slow
def test_sigterm_during_a_chat_tool_saves_the_run_records_it_and_says_how_to_resume(
        tmp_path, tiny_model):
    from fakellm import FakeLLM, call

    from booth.agent.transcript import read_transcript

    make_workspace(tmp_path)
    arguments = dict(word.split("=", 1) for word in TRAIN_LONG)
    arguments = {k: json.loads(v) if v[0].isdigit() or v in ("true", "false") or "e-" in v
                 else v for k, v in arguments.items()}
    transcript = tmp_path / "session.jsonl"
    with FakeLLM([call("train", arguments)]) as llm:
        child = booth(tmp_path, tiny_model, "chat", "-y", "--base-url", llm.base_url,
                      "--transcript", str(transcript), "train it", stdin=subprocess.DEVNULL)
        wait_for(child, lambda: metric_lines(tmp_path / "runs" / "long") >= 3, "training")
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    assert f"booth chat --resume {transcript}" in " ".join(err.split())
    _, events = read_transcript(transcript)
    (result,) = [e for e in events if e["type"] == "tool_result"]
    assert result["ok"] and result["result"]["status"] == "interrupted"
    assert result["message"]["content"].startswith("booth was terminated (SIGTERM)")
    assert [e["text"] for e in events if e["type"] == "interrupted"] == [
        "SIGTERM: tool asked to stop", "terminated (SIGTERM): the session ends"]


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_model_exits_143_with_the_transcript(
        tmp_path, tiny_model):
    from fakellm import FakeLLM, hang

    transcript = tmp_path / "session.jsonl"
    with FakeLLM([hang(10)]) as llm:
        child = booth(tmp_path, tiny_model, "chat", "-y", "--base-url", llm.base_url,
                      "--transcript", str(transcript), "hello", stdin=subprocess.DEVNULL)
        wait_for(child, lambda: llm.requests, "a request to the model")
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    assert child.returncode == 143, err[-2000:]
    assert f"--resume {transcript}" in " ".join(err.split())
    assert "Traceback" not in err


@pytest.mark.slow
def test_resuming_with_another_cpu_thread_count_says_it_will_not_be_exact(killed_early):
    import io
    import shutil

    import torch
    from rich.console import Console

    root = killed_early["root"]
    shutil.copytree(root / "runs" / "whole", root / "runs" / "threads")
    inputs = root / "runs" / "threads" / "inputs.json"
    recorded = json.loads(inputs.read_text())
    assert recorded["cpu_threads"] == torch.get_num_threads()  # recorded when it started
    inputs.write_text(json.dumps({**recorded, "cpu_threads": recorded["cpu_threads"] + 3}))
    out = io.StringIO()
    ctx = ToolContext.from_options(workspace=str(root), base_model=killed_early["ctx"].base_model,
                                   console=Console(file=out, width=300))
    result = get_tool("resume_checkpoint").run(ctx, {"run": "threads", "max_train_steps": 13})
    assert result["status"] == "completed"
    said = out.getvalue()
    assert f"trained with {recorded['cpu_threads'] + 3} CPU threads" in said
    assert "not bit-identical" in said and f"BOOTH_THREADS={recorded['cpu_threads'] + 3}" in said
