"""The speed work keeps what a user sees: losses read from the device every few steps (as on
a GPU) log what reads every step log (the same lines, bit for bit; a NaN stopped before any
checkpoint holds it; a stop keeps every finished step), and GPU-only speed-ups asked for on
a CPU say so and change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.dreambooth.config import TrainConfig
from booth.dreambooth.errors import ConfigError, TrainingError


def images(folder: Path, count: int, seed: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png")
    return [str(p) for p in sorted(folder.iterdir())]


@pytest.fixture
def config(tmp_path, tiny_model):
    def make(run: str, **changes) -> TrainConfig:
        if not (tmp_path / "subject").is_dir():
            images(tmp_path / "subject", 3, 0)
            images(tmp_path / "class", 4, 1)
        return TrainConfig(**{
            "base_model": tiny_model, "output_dir": str(tmp_path / run),
            "instance_images": sorted(str(p) for p in (tmp_path / "subject").iterdir()),
            "class_data_dir": str(tmp_path / "class"), "class_prompt": "a photo of a dog",
            "resolution": 64, "learning_rate": 1e-3, "report_to": "none", "seed": 3,
            "max_train_steps": 7, "checkpointing_steps": 3, "validation_steps": 0,
            "loss_plot": False, **changes})
    return make


def lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed"} for row in rows]


@pytest.mark.slow
def test_reading_every_four_steps_logs_the_same_lines_as_every_step(config):
    from booth.dreambooth.trainer import train

    every_step = train(config("one", log_every=1, gradient_accumulation_steps=2))
    batched = train(config("four", log_every=4, gradient_accumulation_steps=2))
    assert [row["step"] for row in lines(batched.run_dir)] == list(range(1, 8))
    assert lines(batched.run_dir) == lines(every_step.run_dir)
    assert batched.final_loss == every_step.final_loss == lines(batched.run_dir)[-1]["loss"]
    checkpoints = sorted(p.name for p in (batched.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]


@pytest.mark.slow
def test_a_nan_read_late_still_names_its_step_and_no_checkpoint_holds_it(config, monkeypatch):
    import torch

    import booth.dreambooth.trainer as trainer

    real, calls = trainer._losses, []

    def nan_from_step_two(*args):
        calls.append(1)
        losses = real(*args)
        poison = torch.tensor(float("nan") if len(calls) >= 2 else 1.0)
        return {k: v * poison for k, v in losses.items()}

    monkeypatch.setattr(trainer, "_losses", nan_from_step_two)
    run = config("nan", log_every=5)
    with pytest.raises(TrainingError, match=r"NaN/inf at step 2: .*lower learning_rate"):
        trainer.train(run)
    run_dir = Path(run.output_dir)
    assert not list((run_dir / "checkpoints").glob("checkpoint-*"))  # step 3 never saved
    assert [row["step"] for row in lines(run_dir)] == [1]  # the finished step is kept


@pytest.mark.slow
def test_a_stop_between_reads_keeps_every_finished_step(config):
    from booth.dreambooth.trainer import train

    asked = iter([False, True])
    result = train(config("stop", log_every=5), should_stop=lambda: next(asked, True))
    assert result.status == "interrupted" and result.steps_done == 2
    assert [row["step"] for row in lines(result.run_dir)] == [1, 2]
    assert [p.name for p in (result.run_dir / "checkpoints").iterdir()] == ["checkpoint-2"]


@pytest.mark.parametrize("value", [0, -1, 2.5, 10**6])
def test_log_every_out_of_range_is_refused(config, value):
    with pytest.raises(ConfigError, match="log_every"):
        config("bad", log_every=value).check()


@pytest.mark.slow
def test_gpu_speedups_asked_on_a_cpu_say_so_and_change_no_loss(config):
    from rich.console import Console

    from booth.dreambooth.trainer import train

    plain = train(config("plain", max_train_steps=3))
    console = Console(record=True, width=200)
    asked = train(config("asked", max_train_steps=3, compile_unet=True, allow_tf32=True),
                  console=console)
    said = console.export_text()
    assert "compile_unet pays only on a GPU" in said and "allow_tf32 needs an Ampere" in said
    assert lines(asked.run_dir) == lines(plain.run_dir)
