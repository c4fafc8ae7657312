"""Watching a run learn: validation images at checkpoints and at the end, in TensorBoard too,
a loss.png, and none of it changing the training (same losses, exact resume)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.dreambooth.config import ConfigError, TrainConfig

# 5 steps, checkpoints at 2 and 4 (and 5, the end); validation every 4: at 4 and at the end.
SETTINGS = dict(max_train_steps=5, checkpointing_steps=2, validation_steps=4,
                learning_rate=1e-3, resolution=64, seed=3, num_validation_images=2,
                validation_inference_steps=2, class_prompt="a photo of a dog")
PROMPTS = ["a photo of sks dog", "sks dog on the beach"]


def make_images(folder: Path, count: int, seed: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i + 1:04d}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def losses(run_dir: Path) -> list[tuple]:
    return [(row["step"], row["loss"], row["instance_loss"], row["prior_loss"])
            for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def steps_on_disk(run_dir: Path) -> list[str]:
    folder = run_dir / "validation"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def stop_after(step: int):
    """A should_stop that says yes after `step` optimizer steps (it is asked once a step)."""
    asked = iter(range(1, 1_000_000))
    return lambda: next(asked) >= step


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """'watched' trains 5 steps with validation; 'blind' the same without; 'stopped' is
    stopped at checkpoint-2 and resumed to the end."""
    from booth.dreambooth.trainer import resume, train

    root = tmp_path_factory.mktemp("valid")
    config = dict(SETTINGS, base_model=tiny_model,
                  instance_images=make_images(root / "photos", 3, seed=1),
                  class_data_dir=str(Path(make_images(root / "dogs", 2, seed=2)[0]).parent))
    from booth.dreambooth.evaluation import models_from
    from booth.dreambooth.tiny import save_tiny_evaluators

    evaluators = save_tiny_evaluators(root / "evaluators")
    with models_from(str(evaluators)):  # as the train tool does with --eval-models
        watched = train(TrainConfig(**config, output_dir=str(root / "watched")))
    train(TrainConfig(**{**config, "validation_steps": 0}, output_dir=str(root / "blind")))
    stopped = train(TrainConfig(**config, output_dir=str(root / "stopped")),
                    should_stop=stop_after(2))
    at_stop = steps_on_disk(root / "stopped")
    resumed = resume(root / "stopped")
    return {"root": root, "watched": watched, "stopped": stopped, "at_stop": at_stop,
            "resumed": resumed}


@pytest.mark.slow
def test_validation_images_are_written_at_their_steps_and_the_end(runs):
    run_dir = runs["root"] / "watched"
    assert runs["watched"].status == "completed"
    assert steps_on_disk(run_dir) == ["step-4", "step-5"]  # step 2 is not a multiple of 4
    for step in ("step-4", "step-5"):
        folder = run_dir / "validation" / step
        images = sorted(folder.glob("0*.png"))
        assert [p.name for p in images] == ["01-01-a-photo-of-sks-dog.png",
                                            "01-02-a-photo-of-sks-dog.png",
                                            "02-01-sks-dog-on-the-beach.png",
                                            "02-02-sks-dog-on-the-beach.png"]
        for path in images:
            with Image.open(path) as image:
                assert (image.format, image.size) == ("PNG", (64, 64))
        assert json.loads((folder / "samples.json").read_text())["prompts"] == PROMPTS


@pytest.mark.slow
def test_the_grid_carries_the_prompts_and_the_step(runs):
    with Image.open(runs["root"] / "watched/validation/step-5/grid.png") as grid:
        grid = np.asarray(grid.convert("L"))
    label_width, title_height = grid.shape[1] - 2 * 64, grid.shape[0] - 2 * 64
    assert label_width >= 100 and title_height > 10  # a label column and a title strip
    assert (grid[:title_height] < 100).any(), "no title text"
    for row in range(2):  # each prompt's row has dark text in its label cell
        top = title_height + row * 64
        assert (grid[top:top + 64, :label_width] < 100).any(), f"row {row} has no label"


@pytest.mark.slow
def test_tensorboard_holds_the_validation_images(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = next((runs["root"] / "watched/logs").rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(logs), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert {f"validation/{i + 1} {prompt}" for i, prompt in enumerate(PROMPTS)} <= set(tags)
    shown = events.Images(tags[0])
    assert sorted({image.step for image in shown}) == [4, 5]
    # TensorBoard shows a prompt's images side by side in one picture.
    assert {(image.width, image.height) for image in shown} == {(2 * 64, 64)}


@pytest.mark.slow
def test_validation_images_are_scored_beside_them_and_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["root"] / "watched"
    for step in ("step-4", "step-5"):
        scores = json.loads((run_dir / "validation" / step / "scores.json").read_text())
        assert all(-1 <= scores[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
        assert [row["prompt"] for row in scores["per_prompt"]] == PROMPTS
    logs = next((run_dir / "logs").rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    dino = [e.step for e in events.Scalars("validation/dino")]
    assert dino == [4, 5]
    # Without evaluator models the run is watched all the same, unscored.
    assert not list((runs["root"] / "stopped" / "validation").glob("*/scores.json"))


@pytest.mark.slow
def test_loss_png_is_written_and_the_tool_result_points_at_it(runs):
    from booth.tools.train import _result

    run_dir = runs["root"] / "watched"
    with Image.open(run_dir / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size[0] >= 400
    result = _result("watched", runs["watched"])
    assert result["loss_plot"] == str(run_dir / "loss.png")
    assert result["validation_grid"] == str(run_dir / "validation/step-5/grid.png")


@pytest.mark.slow
def test_validation_does_not_change_the_losses(runs):
    root = runs["root"]
    assert losses(root / "watched") == losses(root / "blind")
    assert len(losses(root / "blind")) == 5


@pytest.mark.slow
def test_validation_steps_zero_writes_no_images(runs):
    blind = runs["root"] / "blind"
    assert not (blind / "validation").exists()
    assert (blind / "loss.png").is_file()


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_losses_and_images(runs):
    root = runs["root"]
    assert runs["stopped"].status == "interrupted" and runs["stopped"].steps_done == 2
    assert runs["at_stop"] == []  # step 2 was not due
    assert runs["resumed"].status == "completed"
    assert losses(root / "stopped") == losses(root / "watched")
    assert steps_on_disk(root / "stopped") == ["step-4", "step-5"]
    for step in ("step-4", "step-5"):
        for path in (root / "watched/validation" / step).glob("*.png"):
            assert path.read_bytes() == (root / "stopped/validation" / step / path.name
                                         ).read_bytes(), f"{step}/{path.name} differs"


@pytest.mark.slow
def test_validation_between_checkpoints_is_rendered_and_resumed_exactly(tmp_path, tiny_model):
    """Every 3 steps with checkpoints every 2: step 3 is no checkpoint's. Stopped right after
    it and resumed, the run renders the same images as one that never stopped."""
    from booth.dreambooth.trainer import resume, train

    settings = dict(SETTINGS, max_train_steps=4, validation_steps=3, base_model=tiny_model,
                    prior_loss_weight=0, report_to="none", loss_plot=False,
                    instance_images=make_images(tmp_path / "photos", 2, seed=1))
    train(TrainConfig(**settings, output_dir=str(tmp_path / "straight")))
    train(TrainConfig(**settings, output_dir=str(tmp_path / "cut")), should_stop=stop_after(3))
    assert steps_on_disk(tmp_path / "cut") == ["step-3"]
    resume(tmp_path / "cut")
    def logged(run):
        return [row["loss"] for row in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                           .read_text().splitlines())]

    assert logged("cut") == logged("straight")
    for run in ("straight", "cut"):
        assert steps_on_disk(tmp_path / run) == ["step-3", "step-4"]
    for image in sorted((tmp_path / "straight/validation").rglob("0*.png")):
        twin = tmp_path / "cut" / image.relative_to(tmp_path / "straight")
        assert image.read_bytes() == twin.read_bytes(), twin


@pytest.mark.slow
def test_resuming_discards_later_validation_and_half_written_steps(runs, tmp_path):
    from booth.dreambooth.trainer import resume

    run_dir = tmp_path / "again"
    shutil.copytree(runs["root"] / "stopped", run_dir)
    (run_dir / "validation/step-4/kept.txt").write_text("from before the resume point")
    (run_dir / "validation/step-5/stale.txt").write_text("from after it")
    (run_dir / "validation/.tmp-step-3").mkdir()  # as a kill during validation leaves it
    resume(run_dir, "4", max_train_steps=5)
    assert steps_on_disk(run_dir) == ["step-4", "step-5"]
    assert (run_dir / "validation/step-4/kept.txt").is_file()
    assert not (run_dir / "validation/step-5/stale.txt").exists()
    grid = "validation/step-5/grid.png"
    assert (run_dir / grid).read_bytes() == (runs["root"] / "watched" / grid).read_bytes()


@pytest.mark.slow
def test_a_run_killed_while_rendering_its_last_step_renders_it_on_resume(runs, tmp_path):
    from booth.dreambooth.trainer import resume

    run_dir = tmp_path / "killed"
    shutil.copytree(runs["root"] / "stopped", run_dir)
    # As a kill during the last validation leaves it: checkpoint-5 saved, no final model yet.
    shutil.rmtree(run_dir / "final")
    (run_dir / "validation/step-5").rename(run_dir / "validation/.tmp-step-5")
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert resume(run_dir).status == "completed"
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained again
    assert steps_on_disk(run_dir) == ["step-4", "step-5"]
    grid = "validation/step-5/grid.png"
    assert (run_dir / grid).read_bytes() == (runs["root"] / "watched" / grid).read_bytes()


@pytest.mark.slow
def test_lora_under_autocast_validates_without_changing_the_losses(tmp_path, tiny_model):
    """LoRA over frozen low-precision weights, rendered under bf16 autocast with gradient
    checkpointing on: the fragile path for a pipeline built around live models."""
    from booth.dreambooth.trainer import train

    photos = make_images(tmp_path / "photos", 2, seed=1)
    for name, every in (("seen", None), ("unseen", 0)):
        train(TrainConfig(**{**SETTINGS, "max_train_steps": 3, "checkpointing_steps": 1,
                             "validation_steps": every, "num_validation_images": 1},
                          base_model=tiny_model, prior_loss_weight=0, use_lora=True,
                          mixed_precision="bf16", gradient_checkpointing=True,
                          report_to="none", instance_images=photos,
                          output_dir=str(tmp_path / name)))
    assert steps_on_disk(tmp_path / "seen") == ["step-1", "step-2", "step-3"]
    with Image.open(tmp_path / "seen/validation/step-3/01-01-a-photo-of-sks-dog.png") as image:
        assert image.size == (64, 64) and image.getextrema() != ((0, 0),) * 3  # not black
    rows = [(tmp_path / name / "metrics.jsonl").read_text() for name in ("seen", "unseen")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "elapsed"}
              for line in text.splitlines()] for text in rows]
    assert strip[0] == strip[1] and len(strip[0]) == 3


@pytest.mark.slow
def test_the_plot_is_drawn_once_at_the_end_and_the_extras_can_be_turned_off(
        tmp_path, tiny_model, monkeypatch):
    from booth.dreambooth import validation
    from booth.dreambooth.trainer import train

    drawn = []
    real = validation.write_loss_plot
    monkeypatch.setattr(validation, "write_loss_plot",
                        lambda metrics, dest: drawn.append(1) or real(metrics, dest))
    settings = dict(SETTINGS, max_train_steps=4, validation_steps=0, base_model=tiny_model,
                    prior_loss_weight=0, report_to="none",
                    instance_images=make_images(tmp_path / "photos", 1, seed=1))
    train(TrainConfig(**settings, output_dir=str(tmp_path / "on")))
    assert len(drawn) == 2, "checkpoints 2 and 4; the end, right after 4, draws nothing new"
    assert (tmp_path / "on/loss.png").is_file() and (tmp_path / "on/export").is_dir()
    drawn.clear()
    train(TrainConfig(**settings, loss_plot=False, export_file=False,
                      output_dir=str(tmp_path / "off")))
    assert not drawn and not (tmp_path / "off/loss.png").exists()
    assert not (tmp_path / "off/export").exists() and (tmp_path / "off/final").is_dir()


@pytest.mark.slow
def test_validation_out_of_gpu_memory_is_skipped_and_training_goes_on(tmp_path, tiny_model,
                                                                     monkeypatch):
    import io

    import torch
    from rich.console import Console

    from booth.dreambooth.trainer import train

    def out_of_memory(*args, **kwargs):
        (Path(args[2]) / "01-01-half.png").parent.mkdir(parents=True, exist_ok=True)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("booth.dreambooth.sampling.sample_images", out_of_memory)
    said = io.StringIO()
    config = TrainConfig(**{**SETTINGS, "max_train_steps": 2, "validation_steps": None},
                         base_model=tiny_model, prior_loss_weight=0, report_to="none",
                         instance_images=make_images(tmp_path / "photos", 1, seed=1),
                         output_dir=str(tmp_path / "run"))
    result = train(config, console=Console(file=said, width=200))
    assert result.status == "completed" and (tmp_path / "run/final").is_dir()
    assert "validation at step 2 skipped: out of GPU memory" in said.getvalue()
    assert steps_on_disk(tmp_path / "run") == []  # no half-written step folder either


def test_a_half_written_step_is_never_listed(tmp_path):
    from booth.dreambooth.validation import discard_validation_after, latest_grid

    for name in ("step-2", "step-4", ".tmp-step-6"):
        (tmp_path / "validation" / name).mkdir(parents=True)
        (tmp_path / "validation" / name / "grid.png").write_bytes(b"png")
    assert latest_grid(tmp_path) == tmp_path / "validation/step-4/grid.png"
    discard_validation_after(tmp_path, 2)
    assert steps_on_disk(tmp_path) == ["step-2"]


def test_default_prompts_name_the_subject_of_the_instance_prompt():
    from booth.dreambooth.validation import validation_prompts

    assert validation_prompts(TrainConfig(instance_prompt="a photo of sks dog")) == PROMPTS
    assert validation_prompts(TrainConfig(instance_prompt="zwx person, studio light")) == [
        "zwx person, studio light", "zwx person, studio light on the beach"]
    given = TrainConfig(validation_prompts=["sks dog in snow"])
    assert validation_prompts(given) == ["sks dog in snow"]


@pytest.mark.parametrize("values, message", [
    ({"validation_prompts": ["  "]}, "not blank"),
    ({"validation_prompts": ["two\nlines"]}, "one line"),
    ({"num_validation_images": 0}, "num_validation_images"),
])
def test_unusable_validation_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(instance_images=["x.png"], prior_loss_weight=0, **values).check()


def test_validation_leaves_the_global_random_state_as_it_found_it():
    import torch

    from booth.dreambooth.validation import preserved_rng

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with preserved_rng():  # as a sampler drawing its noise from the global RNG would
        torch.randn(100)
        np.random.rand(5)
        random.random()
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def test_the_loss_plot_skips_cut_lines_and_goes_when_nothing_is_left(tmp_path):
    from booth.dreambooth.plots import write_loss_plot

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1 / s, "instance_loss": 0.5 / s, "prior_loss": 0.5 / s,
             "lr": 1e-4} for s in range(1, 40)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "lo')
    plot = write_loss_plot(metrics, tmp_path / "loss.png")
    with Image.open(plot) as image:
        assert image.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
    metrics.write_text("")
    assert write_loss_plot(metrics, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
