"""Exact resume: a run SIGKILLed after a checkpoint and resumed logs the same losses, bit for
bit, as a run that never stopped, and ends with the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.tools import ToolContext, ToolError, get_tool

ARGS = {"dataset": "rex", "learning_rate": 1e-3, "checkpointing_steps": 10,
        "report_to": "none", "seed": 7}

# The training process the test kills: the real tool, with the prior set found on disk.
CHILD = """
import json, sys
from pathlib import Path
import booth.tools.priors as priors
priors.find_prior_set = lambda ctx, prompt, base=None, **_: Path(sys.argv[1]) / "priors" / "dog"
from booth.tools import ToolContext, get_tool
ctx = ToolContext.from_options(workspace=sys.argv[1], base_model=sys.argv[2])
get_tool("train").run(ctx, json.loads(sys.argv[3]))
"""


def make_workspace(root: Path) -> None:
    """3 subject photos and 4 class images: 4 batches an epoch, so step 10 is mid-epoch."""
    rng = np.random.default_rng(5)
    images = root / "datasets" / "rex" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            images / f"{i + 1:04d}.png")
    manifest = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
                "resolution": 64,
                "images": [{"file": f"images/{i + 1:04d}.png"} for i in range(3)]}
    (root / "datasets" / "rex" / "manifest.json").write_text(json.dumps(manifest))
    priors = root / "priors" / "dog"
    priors.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            priors / f"{i + 1:04d}.png")


def kill_after_checkpoint(workspace: Path, base_model: str, arguments: dict, step: int) -> None:
    """Run training in a child process and SIGKILL it once checkpoint-<step> is complete."""
    done = workspace / "runs" / arguments["run_name"] / "checkpoints" / f"checkpoint-{step}"
    log = workspace / "child.log"  # a file, not a pipe: a full pipe would stall the child
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workspace), base_model, json.dumps(arguments)],
            stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ),
        )
    deadline = time.monotonic() + 300
    try:
        while not done.is_dir() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() is None, f"child ended early: {log.read_text()[-2000:]}"
        assert done.is_dir(), "no checkpoint within 5 minutes"
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL


def rows(run_dir: Path) -> list[dict]:
    keep = ("step", "loss", "instance_loss", "prior_loss", "lr")
    return [{k: row[k] for k in keep} for row in
            map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {str(f.relative_to(folder)): load_file(str(f)) for f in folder.rglob("*.safetensors")}


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(bool((a[f][k] == b[f][k]).all()) for k in a[f])
        for f in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """'straight' trains 24 steps in one go; 'killed' is SIGKILLed after checkpoint-10,
    resumed to its 20 steps, then extended to 24 with resume_checkpoint."""
    root = tmp_path_factory.mktemp("ws")
    make_workspace(root)
    ctx = ToolContext.from_options(workspace=str(root), base_model=tiny_model)
    kill_after_checkpoint(root, tiny_model,
                          {**ARGS, "max_train_steps": 20, "run_name": "killed"}, step=10)
    killed = root / "runs" / "killed"
    at_kill = rows(killed)
    finished_at_kill = (killed / "final").exists()
    # A checkpoint half-written by some other kill: ignored, then swept away.
    (killed / "checkpoints" / ".tmp-checkpoint-11").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("booth.tools.priors.find_prior_set",
                      lambda ctx, prompt, base=None, **_: root / "priors" / "dog")
        straight = get_tool("train").run(ctx, {**ARGS, "max_train_steps": 24,
                                                "run_name": "straight"})
    resumed = get_tool("resume_checkpoint").run(ctx, {"run": "killed"})
    resumed_rows = rows(killed)
    checkpoint_20 = weights(killed / "checkpoints" / "checkpoint-20")
    extended = get_tool("resume_checkpoint").run(ctx, {"run": "killed", "max_train_steps": 24})
    return {"ctx": ctx, "root": root, "at_kill": at_kill, "finished_at_kill": finished_at_kill,
            "straight": straight,
            "resumed": resumed, "resumed_rows": resumed_rows, "checkpoint_20": checkpoint_20,
            "extended": extended}


@pytest.mark.slow
def test_killed_run_resumes_with_bit_identical_losses(runs):
    root = runs["root"]
    assert len(runs["at_kill"]) < 20 and not runs["finished_at_kill"]
    assert runs["resumed"]["status"] == "completed" and runs["resumed"]["steps"] == 20
    straight = rows(root / "runs" / "straight")
    assert [r["step"] for r in runs["resumed_rows"]] == list(range(1, 21))
    # Steps 11..20 ran in another process after the kill; all must match exactly.
    assert runs["resumed_rows"] == straight[:20]
    assert all("prior_loss" in r for r in straight)
    assert not (root / "runs/killed/checkpoints/.tmp-checkpoint-11").exists()


@pytest.mark.slow
def test_resumed_weights_equal_the_uninterrupted_ones(runs):
    root = runs["root"]
    assert identical(runs["checkpoint_20"],
                     weights(root / "runs/straight/checkpoints/checkpoint-20"))
    assert identical(weights(root / "runs/killed/final"), weights(root / "runs/straight/final"))


@pytest.mark.slow
def test_resume_with_a_larger_total_continues_the_same_curve(runs):
    root = runs["root"]
    extended = runs["extended"]
    assert extended["status"] == "completed" and extended["steps"] == 24
    assert extended["checkpoints"] == ["checkpoint-10", "checkpoint-20", "checkpoint-24"]
    assert rows(root / "runs/killed") == rows(root / "runs/straight")


@pytest.mark.slow
@pytest.mark.parametrize("arguments, message", [
    ({"run": "killed"}, "end of this run.*larger max_train_steps"),
    ({"run": "killed", "max_train_steps": 10}, "already at step 24"),
    ({"run": "killed", "checkpoint": "checkpoint-15"}, "available: checkpoint-10, checkpoint-20"),
    ({"run": "nobody"}, "no training run 'nobody'"),
])
def test_resume_refuses_what_it_cannot_do(runs, arguments, message):
    before = rows(runs["root"] / "runs/killed")
    with pytest.raises(ToolError, match=message):
        get_tool("resume_checkpoint").run(runs["ctx"], arguments)
    assert rows(runs["root"] / "runs/killed") == before


@pytest.mark.slow
def test_resume_estimate_counts_the_steps_left(runs):
    tool = get_tool("resume_checkpoint")
    line = tool.estimate(runs["ctx"], tool.validate({"run": "killed", "checkpoint": "20",
                                                     "max_train_steps": 30}))
    assert line.startswith("from checkpoint-20 to step 30: 10 steps")


def test_resuming_from_a_step_drops_what_came_after_it(tmp_path):
    from booth.dreambooth.checkpoints import discard_after, list_checkpoints, truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # cut short by a kill
    truncate_metrics(metrics, 5)
    assert metrics.read_text() == "\n".join(lines[:5]) + "\n"
    for step in (5, 10, 15):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "training_state.json").write_text("{}")
    assert discard_after(tmp_path, 5) == [10, 15]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5]
