"""Exact resume: a run SIGKILLed after a checkpoint and resumed logs the same losses, bit for
bit, as a run that never stopped, and ends with the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.tools import ToolContext, ToolError, get_tool

# Validation images and loss.png have their tests (test_validation); off here, for speed.
ARGS = {"dataset": "rex", "learning_rate": 1e-3, "checkpointing_steps": 10,
        "report_to": "none", "seed": 7, "validation_steps": 0, "loss_plot": False}

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
    # The child trains 'killed' (its start-up is mostly imports) while this process trains
    # 'straight': two cores, both busy. Separate runs, and one thread each (conftest).
    with ThreadPoolExecutor(max_workers=1) as pool:
        kill = pool.submit(kill_after_checkpoint, root, tiny_model,
                           {**ARGS, "max_train_steps": 20, "run_name": "killed"}, step=10)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("booth.tools.priors.find_prior_set",
                          lambda ctx, prompt, base=None, **_: root / "priors" / "dog")
            straight = get_tool("train").run(ctx, {**ARGS, "max_train_steps": 24,
                                                    "run_name": "straight"})
        kill.result()
    killed = root / "runs" / "killed"
    at_kill = rows(killed)
    finished_at_kill = (killed / "final").exists()
    # A checkpoint half-written by some other kill: ignored, then swept away.
    (killed / "checkpoints" / ".tmp-checkpoint-11").mkdir()
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


# --- a resume that cannot go on leaves the run as it was; a run's inputs are pinned ---------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model):
    """A completed 2-step run with priors (checkpoints 1 and 2, final/), copied by each test."""
    root = tmp_path_factory.mktemp("small")
    make_workspace(root)
    ctx = ToolContext.from_options(workspace=str(root), base_model=tiny_model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("booth.tools.priors.find_prior_set",
                      lambda ctx, prompt, base=None, **_: root / "priors" / "dog")
        get_tool("train").run(ctx, {**ARGS, "max_train_steps": 2, "checkpointing_steps": 1,
                                    "train_text_encoder": False, "run_name": "small"})
    return root


@pytest.fixture
def copied(small_run, tmp_path, tiny_model):
    """A private copy of the small run's workspace (run.yaml and inputs.json point into it)."""
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(small_run, root)
    for name in ("run.yaml", "inputs.json"):
        file = root / "runs" / "small" / name
        if file.is_file():
            file.write_text(file.read_text().replace(str(small_run), str(root)))
    return ToolContext.from_options(workspace=str(root), base_model=tiny_model)


def snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def point_base_model_at_missing_folder(run_dir: Path, monkeypatch) -> None:
    file = run_dir / "run.yaml"
    file.write_text(file.read_text().replace("base_model: ", f"base_model: {run_dir}/gone#", 1))


def fail_loading_parts(run_dir: Path, monkeypatch) -> None:
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("booth.dreambooth.models.load_parts", out_of_memory)


@pytest.mark.slow
@pytest.mark.parametrize("break_it, arguments, message", [
    (point_base_model_at_missing_folder, {"max_train_steps": 4}, "base model"),
    (fail_loading_parts, {"checkpoint": "1"}, "ran out of memory"),
])
def test_a_failed_resume_keeps_the_final_model_checkpoints_and_metrics(
        copied, monkeypatch, break_it, arguments, message):
    run_dir = copied.workspace.run_dir("small")
    break_it(run_dir, monkeypatch)
    before = snapshot(run_dir)
    assert {"final/model_index.json", "checkpoints/checkpoint-2/unet.safetensors"} <= set(before)
    with pytest.raises(ToolError, match=message):
        get_tool("resume_checkpoint").run(copied, {"run": "small", **arguments})
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_run_killed_while_exporting_gets_its_final_model_on_resume(copied):
    from booth.dreambooth.trainer import load_run_pipeline

    run_dir = copied.workspace.run_dir("small")
    (run_dir / "final").rename(run_dir / ".tmp-final")  # as a kill during export leaves it
    metrics = (run_dir / "metrics.jsonl").read_text()
    checkpoint = weights(run_dir / "checkpoints" / "checkpoint-2")
    result = get_tool("resume_checkpoint").run(copied, {"run": "small"})
    assert result["status"] == "completed" and result["steps"] == 2
    assert result["final_loss"] == pytest.approx(json.loads(metrics.splitlines()[-1])["loss"],
                                                 abs=1e-5)
    assert (run_dir / "final" / "model_index.json").is_file()
    assert not (run_dir / ".tmp-final").exists()
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained again
    assert identical(weights(run_dir / "checkpoints" / "checkpoint-2"), checkpoint)
    unet = load_run_pipeline(run_dir, device="cpu").unet.state_dict()
    assert identical({"u": {k: v for k, v in unet.items() if k in checkpoint["unet.safetensors"]}},
                     {"u": checkpoint["unet.safetensors"]})


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    ("instance", r"subject photo\(s\) 0002.png changed.*start a new run"),
    ("class", r"class images changed \(4 -> 5 images.*start a new run"),
])
def test_resume_refuses_when_the_training_images_changed(copied, change, message):
    root = copied.workspace.root
    if change == "instance":  # prepare_dataset run again under the same name
        Image.new("RGB", (64, 64), "red").save(root / "datasets/rex/images/0002.png")
    else:  # generate_priors with a larger count
        Image.new("RGB", (64, 64), "red").save(root / "priors/dog/0005.png")
    run_dir = copied.workspace.run_dir("small")
    before = snapshot(run_dir)
    with pytest.raises(ToolError, match=message):
        get_tool("resume_checkpoint").run(copied, {"run": "small", "max_train_steps": 4})
    assert snapshot(run_dir) == before


def make_checkpoints(run_dir: Path, steps) -> None:
    for step in steps:
        folder = run_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "unet.safetensors").write_bytes(b"weights")
        (folder / "training_state.json").write_text("{}")


@pytest.mark.parametrize("delete", ["prune", "discard"])
def test_a_kill_while_deleting_a_checkpoint_never_leaves_a_broken_one(tmp_path, monkeypatch,
                                                                      delete):
    import shutil

    from booth.dreambooth import checkpoints

    make_checkpoints(tmp_path, (5, 10))
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if not Path(path).exists():
            return
        (Path(path) / "unet.safetensors").unlink()  # the weights went, the state file did not
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        if delete == "prune":
            checkpoints.prune_checkpoints(tmp_path, keep=1)
        else:
            checkpoints.discard_after(tmp_path, 5)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    for _, folder in checkpoints.list_checkpoints(tmp_path):
        assert (folder / "unet.safetensors").is_file(), f"{folder.name} is listed but broken"
    checkpoints.sweep_temporary(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == (
        ["checkpoint-10"] if delete == "prune" else ["checkpoint-5"])


def test_a_kill_while_truncating_metrics_keeps_the_old_file(tmp_path, monkeypatch):
    from booth.dreambooth.checkpoints import truncate_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 6)))
    before = metrics.read_text()
    real_write = Path.write_text

    def killed_midway(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        truncate_metrics(metrics, 3)
    monkeypatch.undo()
    assert metrics.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
