"""`accelerate launch` with two processes (gloo on the CPU): one JSON result, one metrics line
per step, checkpoints and a loadable final model, and a resume that continues the losses of an
uninterrupted two-process run bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.tools import ToolContext, get_tool

pytestmark = pytest.mark.slow

TRAIN = ["dataset=rex", "learning_rate=1e-4", "prior_loss_weight=0", "checkpointing_steps=3",
         "report_to=none", "seed=3"]


def launch(workspace: Path, base_model: str, *words: str) -> subprocess.CompletedProcess:
    """`accelerate launch` two processes of `booth call ...`, as a user would on two GPUs."""
    with socket.socket() as free:  # tests running side by side must not share a port
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "--main_process_port", str(port), "-m", "booth.cli", "call", *words]
    env = os.environ | {"BOOTH_WORKSPACE": str(workspace), "BOOTH_BASE_MODEL": base_model}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def the_result(process: subprocess.CompletedProcess) -> dict:
    assert process.returncode == 0, process.stderr[-3000:]
    # Exactly one JSON document on stdout: json.loads refuses a second one after the first.
    return json.loads(process.stdout)


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """'split': 6 steps, then resumed to 9; 'whole': 9 steps in one go. Both in 2 processes."""
    workspace = tmp_path_factory.mktemp("mp-ws")
    photos = tmp_path_factory.mktemp("mp-photos")
    rng = np.random.default_rng(2)
    for i in range(4):  # 4 photos, 2 processes, batch 1: an epoch is 2 steps
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(
            photos / f"{i}.png")
    context = ToolContext.from_options(workspace=str(workspace), base_model=tiny_model)
    get_tool("prepare_dataset").run(context, {"images_dir": str(photos), "class_noun": "dog",
                                              "resolution": 64, "name": "rex"})
    # Validation (tested in test_validation) only in 'whole': two processes render with one,
    # and its losses must still be those of 'split'.
    first = launch(workspace, tiny_model, "train", *TRAIN, "max_train_steps=6",
                   "run_name=split", "validation_steps=0", "loss_plot=false")
    metrics_after_first = metric_lines(workspace / "runs" / "split")
    resumed = launch(workspace, tiny_model, "resume_checkpoint", "run=split",
                     "max_train_steps=9")
    whole = launch(workspace, tiny_model, "train", *TRAIN, "max_train_steps=9",
                   "run_name=whole", "validation_steps=9")
    return {"workspace": workspace, "first": first, "metrics_after_first": metrics_after_first,
            "resumed": resumed, "whole": whole}


def test_two_processes_log_each_step_once_and_export_one_model(runs):
    result = the_result(runs["first"])
    run = runs["workspace"] / "runs" / "split"
    assert result["status"] == "completed" and result["steps"] == 6
    assert [row["step"] for row in runs["metrics_after_first"]] == [1, 2, 3, 4, 5, 6]
    assert runs["metrics_after_first"][-1]["epoch"] == 2  # the data was split in two halves
    assert result["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    for step in (3, 6):
        folder = run / "checkpoints" / f"checkpoint-{step}"
        assert (folder / "random_states_0.pkl").is_file()
        assert (folder / "random_states_1.pkl").is_file()
    assert not list((run / "checkpoints").glob(".tmp-*"))

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(run / "final"))
    assert pipeline.unet is not None


def test_each_process_draws_its_own_noise_and_gets_it_back(runs):
    import torch

    the_result(runs["first"])
    saved = torch.load(runs["workspace"] / "runs/split/checkpoints/checkpoint-6"
                       / "custom_checkpoint_0.pkl", weights_only=False)
    assert len(saved["per_process"]) == 2
    assert not torch.equal(saved["per_process"][0], saved["per_process"][1])


def test_two_process_resume_continues_exactly(runs):
    result = the_result(runs["resumed"])
    assert result["steps"] == 9
    assert result["checkpoints"] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    resumed = metric_lines(runs["workspace"] / "runs" / "split")
    assert [row["step"] for row in resumed] == list(range(1, 10))
    assert resumed[:6] == runs["metrics_after_first"]  # the first six lines left untouched
    the_result(runs["whole"])
    whole = metric_lines(runs["workspace"] / "runs" / "whole")
    assert [row["loss"] for row in resumed] == [row["loss"] for row in whole]
