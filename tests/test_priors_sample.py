"""Class images and samples with the tiny model (64 px, 2-3 steps): reproducible, reused,
resumable, found by the train tool; samples are real PNGs, a grid, one batched CFG pass."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from booth.tools import ToolError, get_tool
from booth.tools.priors import find_prior_set

pytestmark = pytest.mark.slow
PROMPT = "a photo of a dog"
FAST = {"num_inference_steps": 2}


@pytest.fixture
def ctx(tool_context):
    tool_context.console = Console(file=io.StringIO(), width=100)
    return tool_context


@pytest.fixture
def loads(ctx):
    """Counts how many times the priors tool loads the model."""
    calls = []
    real = ctx.load_pipeline

    def counting(base_model):
        calls.append(base_model)
        return real(base_model)

    ctx.load_pipeline = counting
    return calls


def _priors(ctx, **args) -> dict:
    result = get_tool("generate_priors").run(ctx, {"class_prompt": PROMPT, **FAST, **args})
    json.dumps(result)
    return result


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        return np.asarray(image, dtype=np.int16)


def _fresh(ctx):
    """Forget the prior sets made so far (same workspace, same model)."""
    import shutil

    shutil.rmtree(ctx.workspace.root / "priors")


def test_priors_reproducible_reused_and_batch_size_independent(ctx, loads):
    first = _priors(ctx, num_images=3, batch_size=3)
    assert (first["generated"], first["reused"], first["total"]) == (3, 0, 3)
    assert first["settings"]["resolution"] == 64  # the tiny model's own size, not 512
    folder = Path(first["folder"])
    assert folder.name.startswith("a-photo-of-a-dog-") and len(folder.name) == 17 + 8
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == ["0001.png", "0002.png", "0003.png"]
    bytes_before = [f.read_bytes() for f in files]
    mtimes = [f.stat().st_mtime_ns for f in files]
    meta = json.loads((folder / "priors.json").read_text())
    assert meta["key"]["prompt"] == PROMPT and meta["images"] == [f.name for f in files]

    again = _priors(ctx, num_images=3, batch_size=3)
    assert (again["generated"], again["reused"], again["folder"]) == (0, 3, first["folder"])
    assert len(loads) == 1, "a fully reused set must not even load the model"
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    _fresh(ctx)
    rerun = _priors(ctx, num_images=3, batch_size=3)
    assert [Path(p).read_bytes() for p in sorted(Path(rerun["folder"]).glob("*.png"))] == \
        bytes_before, "same seed and batch size must give the same bytes"

    _fresh(ctx)
    single = _priors(ctx, num_images=3, batch_size=1)
    for path, before in zip(sorted(Path(single["folder"]).glob("*.png")), files, strict=True):
        # Same noise per image whatever the batch; batched float maths may move a pixel by 1.
        difference = np.abs(_pixels(path) - _pixels(before))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01

    other_seed = _priors(ctx, num_images=1, seed=1)
    assert other_seed["folder"] != first["folder"]
    assert np.abs(_pixels(other_seed["paths_sample"][0]) - _pixels(files[0])).mean() > 1


class _StopAfter:
    """Stands in for ctx.stop_requested: reports a stop from the (n+1)-th check on."""

    def __init__(self, checks: int):
        self.checks = checks

    def is_set(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_interrupted_run_continues_with_only_the_missing_images(ctx, loads):
    ctx.stop_requested = _StopAfter(1)
    partial = _priors(ctx, num_images=3, batch_size=1)
    assert (partial["status"], partial["generated"], partial["total"]) == ("interrupted", 1, 1)
    assert "again" in partial["hint"]
    folder = Path(partial["folder"])
    kept = (folder / "0001.png").stat().st_mtime_ns
    assert not list(folder.glob(".*.tmp")), "no half-written file may stay behind"

    ctx.stop_requested = threading.Event()
    rest = _priors(ctx, num_images=3, batch_size=1)
    assert (rest["status"], rest["generated"], rest["reused"], rest["total"]) == \
        ("complete", 2, 1, 3)
    assert (folder / "0001.png").stat().st_mtime_ns == kept
    continued = [p.read_bytes() for p in sorted(folder.glob("*.png"))]

    _fresh(ctx)
    straight = _priors(ctx, num_images=3, batch_size=1)
    assert [p.read_bytes() for p in sorted(Path(straight["folder"]).glob("*.png"))] == continued

    more = _priors(ctx, num_images=4)
    assert (more["generated"], more["reused"], more["total"]) == (1, 3, 4)
    fewer = _priors(ctx, num_images=2)
    assert (fewer["generated"], fewer["total"]) == (0, 2)


def test_find_prior_set_and_estimate(ctx, tiny_model):
    assert find_prior_set(ctx, PROMPT) is None
    small = _priors(ctx, num_images=1, seed=5)
    big = _priors(ctx, num_images=2)
    assert find_prior_set(ctx, PROMPT) == Path(big["folder"])
    assert find_prior_set(ctx, "  a photo of  a dog ", base_model=tiny_model) == \
        Path(big["folder"])
    assert find_prior_set(ctx, PROMPT, resolution=64) == Path(big["folder"])
    assert find_prior_set(ctx, PROMPT, resolution=512) is None
    assert find_prior_set(ctx, "a photo of a cat") is None
    assert find_prior_set(ctx, PROMPT, base_model="someone/other-model") is None
    assert small["folder"] != big["folder"]

    tool = get_tool("generate_priors")
    estimate = tool.estimate(ctx, tool.validate({"class_prompt": "a photo of a cat"}))
    assert estimate.startswith("200 images at 64 px, 25 steps: 200 to generate, ~")
    assert "cpu" in estimate or "cuda" in estimate
    done = tool.estimate(ctx, tool.validate({"class_prompt": PROMPT, "num_images": 2, **FAST}))
    assert "nothing to generate" in done


def test_priors_user_errors(ctx):
    with pytest.raises(ToolError, match="multiple of 8"):
        _priors(ctx, resolution=100)
    with pytest.raises(ToolError, match="neither an existing folder nor a hub id"):
        _priors(ctx, base_model="/no/such/model")


def _sample(ctx, **args) -> dict:
    base = {"prompts": ["a photo of sks dog", "a dog on the moon"], "num_images_per_prompt": 2,
            "num_inference_steps": 2}
    result = get_tool("sample").run(ctx, {**base, **args})
    json.dumps(result)
    return result


def test_sample_writes_pngs_and_grid_reproducibly(ctx):
    first = _sample(ctx, seed=3)
    assert first["status"] == "complete" and len(first["images"]) == 4
    assert Path(first["folder"]).parent == ctx.workspace.root / "samples"
    assert Path(first["folder"]).name.startswith("base-")
    pixels = [_pixels(p) for p in first["images"]]
    with Image.open(first["grid"]) as grid:
        # columns = images per prompt, rows = prompts; labels at the left, the model on top
        label, title = grid.width - 2 * 64, grid.height - 2 * 64
        assert label > 0 and title > 0
        top_right = np.asarray(grid.convert("RGB"), dtype=np.int16)[title:title + 64,
                                                                     label + 64:]
    assert np.array_equal(top_right, pixels[1])
    again = _sample(ctx, seed=3)
    assert again["folder"] != first["folder"]
    assert all(np.array_equal(_pixels(p), q) for p, q in zip(again["images"], pixels,
                                                             strict=True))
    other = _sample(ctx, seed=4, prompts=["a photo of sks dog"], num_images_per_prompt=1)
    assert np.abs(_pixels(other["images"][0]) - pixels[0]).mean() > 1
    meta = json.loads((Path(first["folder"]) / "samples.json").read_text())
    assert meta["seed"] == 3 and meta["prompts"][1] == "a dog on the moon"


def test_guidance_is_one_batched_unet_pass_per_step(ctx):
    from booth.dreambooth.loading import load_pipeline

    pipeline = load_pipeline(ctx.base_model)
    batches = []
    pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(args[0].shape[0]), with_kwargs=True)
    ctx.load_pipeline = lambda base_model: pipeline
    _sample(ctx, prompts=["a photo of sks dog"], num_images_per_prompt=2, guidance_scale=7.5)
    assert batches == [4, 4], "cond + uncond for 2 images: one pass of 4 per step, 2 steps"
    batches.clear()
    _sample(ctx, prompts=["a photo of sks dog"], num_images_per_prompt=2, guidance_scale=1.0)
    assert batches == [2, 2], "no guidance: no unconditional half"


def test_sample_from_a_run_and_its_errors(ctx, monkeypatch, tiny_model):
    import booth.dreambooth.trainer as trainer
    from booth.dreambooth.config import TrainConfig
    from booth.dreambooth.loading import load_pipeline

    with pytest.raises(ToolError, match=r"no training run 'rex' \(runs in the workspace: none"):
        _sample(ctx, run="rex")
    run_dir = ctx.workspace.run_dir("rex")
    run_dir.mkdir(parents=True)
    TrainConfig(base_model=tiny_model, output_dir=str(run_dir)).save_yaml(run_dir / "run.yaml")
    with pytest.raises(ToolError, match=r"no training run 'rox' \(runs in the workspace: rex\)"):
        _sample(ctx, run="rox")
    with pytest.raises(ToolError, match="no final model"):
        _sample(ctx, run="rex")
    with pytest.raises(ToolError, match="no complete checkpoint"):
        _sample(ctx, run="rex", checkpoint="latest")
    step = run_dir / "checkpoints" / "checkpoint-10"
    step.mkdir(parents=True)
    (step / "training_state.json").write_text("{}")
    with pytest.raises(ToolError, match="available: checkpoint-10"):
        _sample(ctx, run="rex", checkpoint="5")
    with pytest.raises(ToolError, match="needs a run"):
        _sample(ctx, checkpoint="5")

    calls = []

    def fake_load(run_dir, checkpoint=None, device=None):
        calls.append((Path(run_dir).name, checkpoint))
        return load_pipeline(tiny_model)

    monkeypatch.setattr(trainer, "load_run_pipeline", fake_load)
    result = _sample(ctx, run="rex", checkpoint="10", num_images_per_prompt=1)
    assert calls == [("rex", "checkpoint-10")]
    assert result["model"] == "run rex (checkpoint-10, step 10)"
    # 'latest' says which step it is: the person must know what they are looking at.
    assert _sample(ctx, run="rex", checkpoint="latest", num_images_per_prompt=1)["model"] == \
        "run rex (checkpoint-10, step 10)"
    assert Path(result["folder"]).name.startswith("rex-") and len(result["images"]) == 2


def test_a_moved_model_keeps_its_class_images_and_another_model_does_not(tmp_path, tiny_model):
    import shutil

    from booth.dreambooth.priors import model_id
    from booth.dreambooth.tiny import save_tiny_model

    moved = tmp_path / "moved"
    shutil.copytree(tiny_model, moved)
    assert model_id(str(moved)) == model_id(tiny_model)
    other = save_tiny_model(tmp_path / "other", seed=1)
    assert model_id(str(other)) != model_id(tiny_model)
    assert model_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_a_folder_that_is_no_model_is_refused_before_anything_reads_it(ctx, tmp_path):
    import time

    tool = get_tool("generate_priors")
    started = time.monotonic()
    with pytest.raises(ToolError, match="not a diffusers pipeline folder"):
        tool.run(ctx, {"class_prompt": "a photo of a dog", "base_model": "/usr"})
    assert time.monotonic() - started < 5
