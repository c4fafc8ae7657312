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
