"""The training knobs of the field on the tiny model (64 px, a few steps): each changes the
losses when on and leaves them exactly as they were when off; schedules give the lr curve the
formulas say; captions beside the photos are kept and used; text-encoder LoRA trains the text
encoder and resumes bit-identically; W&B missing is said with the command that installs it."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from rich.console import Console
from test_train import losses, make_dataset, tensors

from booth.tools import ToolContext, ToolError, get_tool

# Validation images and loss.png have their tests (test_validation); off here, for speed.
BASE = {"dataset": "rex", "max_train_steps": 3, "learning_rate": 1e-3, "prior_loss_weight": 0,
        "report_to": "none", "checkpointing_steps": 100, "seed": 3, "validation_steps": 0,
        "loss_plot": False}


def make_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            folder / f"{i + 1:04d}.png")
    return folder


def make_wide_dataset(root: Path, name: str) -> None:
    """A dataset of photos that are not square (as TrainConfig may be given them directly)."""
    folder = root / "datasets" / name
    make_photos(folder / "images", [(96, 64), (64, 80), (64, 64)])
    manifest = {"instance_token": "sks", "instance_prompt": "a photo of sks dog",
                "class_prompt": "a photo of a dog", "resolution": 64,
                "images": [{"file": f"images/{i + 1:04d}.png"} for i in range(3)]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def train(ctx, **arguments) -> list[dict]:
    result = get_tool("train").run(ctx, {**BASE, **arguments})
    assert result["status"] == "completed"
    return losses(ctx.workspace.run_dir(arguments["run_name"]))


def loss_values(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ws")
    make_dataset(root)
    make_wide_dataset(root, "wide")
    context = ToolContext.from_options(workspace=str(root), base_model=tiny_model)
    context.console = Console(file=io.StringIO())
    return context


@pytest.fixture(scope="module")
def runs(ctx):
    """The default run, and one with every knob given its 'off' value."""
    return {
        "default": train(ctx, run_name="default"),
        "off": train(ctx, run_name="off", snr_gamma=0, noise_offset=0, center_crop=True,
                     lr_num_cycles=3, lr_power=2.0),
    }


@pytest.mark.slow
def test_knobs_off_leave_the_default_losses_bit_identical(runs):
    assert len(runs["default"]) == 3
    assert loss_values(runs["off"]) == loss_values(runs["default"])


@pytest.mark.slow
@pytest.mark.parametrize("knob", [{"snr_gamma": 1.0}, {"noise_offset": 0.5}])
def test_min_snr_and_offset_noise_change_the_losses(ctx, runs, knob):
    name = "knob-" + next(iter(knob))
    changed = loss_values(train(ctx, run_name=name.replace("_", "-"), **knob))
    # (min-SNR leaves a step alone where the SNR is below gamma: the very noisy timesteps)
    assert changed != loss_values(runs["default"])


def test_min_snr_weights_follow_the_paper_for_epsilon_and_v():
    import torch
    from diffusers import DDPMScheduler

    from booth.dreambooth.trainer import _min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    steps = torch.tensor([0, 10, 300, 999])
    cumulative = scheduler.alphas_cumprod[steps]
    snr = cumulative / (1 - cumulative)
    expected = torch.minimum(snr, torch.tensor(5.0))
    epsilon = _min_snr_weights(scheduler, steps, 5.0, v_prediction=False)
    torch.testing.assert_close(epsilon, expected / snr)
    torch.testing.assert_close(_min_snr_weights(scheduler, steps, 5.0, v_prediction=True),
                               expected / (snr + 1))
    assert epsilon[0] < 0.01 and epsilon[-1] == 1  # nearly clean steps count for little


@pytest.mark.slow
def test_a_random_crop_changes_the_losses_and_resumes_exactly(ctx):
    centre = loss_values(train(ctx, dataset="wide", run_name="centre"))
    random = loss_values(train(ctx, dataset="wide", run_name="random", center_crop=False,
                               max_train_steps=4, checkpointing_steps=2))
    assert random[0] != centre[0]
    # Stopped at step 2 (epoch 0) and resumed into epoch 1: the same crops (they follow the
    # seed and the epoch), the same losses.
    train(ctx, dataset="wide", run_name="random-cut", center_crop=False, max_train_steps=2,
          checkpointing_steps=2)
    get_tool("resume_checkpoint").run(ctx, {"run": "random-cut", "max_train_steps": 4})
    assert loss_values(losses(ctx.workspace.run_dir("random-cut"))) == random


@pytest.mark.slow
@pytest.mark.parametrize("schedule, extra, expected", [
    ("cosine_with_restarts", {"lr_num_cycles": 2},
     lambda s, n: 0.5 * (1 + math.cos(math.pi * ((2 * s / n) % 1)))),
    ("polynomial", {"lr_power": 2.0}, lambda s, n: (1 - s / n) ** 2),
])
def test_schedules_give_the_lr_curve_of_their_formula(ctx, schedule, extra, expected):
    rows = train(ctx, run_name=schedule.replace("_", "-"), lr_scheduler=schedule,
                 max_train_steps=4, **extra)
    lr, end = BASE["learning_rate"], 1e-7  # polynomial decays to diffusers' lr_end
    assert len(rows) == 4
    for row in rows:  # the rate a step used: the schedule at the steps before it
        want = expected(row["step"] - 1, 4)
        want = (lr - end) * want + end if schedule == "polynomial" else lr * want
        assert row["lr"] == pytest.approx(want, rel=1e-6), row


# --- captions ---------------------------------------------------------------------------------


def test_prepare_dataset_keeps_captions_and_rejects_bad_ones(tool_context, tmp_path):
    photos = make_photos(tmp_path / "photos", [(80, 80)] * 4)
    (photos / "0001.txt").write_text("a photo of sks dog\non the grass\n", encoding="utf-8")
    (photos / "0002.txt").write_bytes(b"a photo of \xff dog")
    (photos / "0003.txt").write_text("x" * 2001)
    (photos / "0004.txt").write_text("a photo of a dog in the snow")
    (photos / "notes.txt").write_text("not a caption of anything")
    result = get_tool("prepare_dataset").run(tool_context, {
        "images_dir": str(photos), "class_noun": "dog", "resolution": 64, "name": "cap"})
    assert result["kept"] == 4
    folder = Path(result["folder"])
    assert (folder / "images/0001.txt").read_text() == "a photo of sks dog on the grass\n"
    assert not (folder / "images/0002.txt").exists() and not (folder / "images/0003.txt").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["images"][0]["caption"] == "a photo of sks dog on the grass"
    rejected = {r["file"]: (r["code"], r["reason"]) for r in result["rejected"]}
    assert rejected["0002.txt"] == ("bad_caption", "caption is not UTF-8 text")
    code, reason = rejected["0003.txt"]
    assert code == "bad_caption" and "above the 2,000-byte limit" in reason
    assert rejected["notes.txt"][0] != "bad_caption"  # judged as a photo: not one
    warnings = " ".join(result["warnings"])
    assert "0002.png: its caption 0002.txt was rejected" in warnings
    assert "0004.png: its caption does not name the identifier 'sks'" in warnings


def write_captions(ctx, dataset: str, name: str, captions: dict[int, str]) -> None:
    """A copy of a dataset whose photos carry captions."""
    import shutil

    source, target = ctx.workspace.dataset_dir(dataset), ctx.workspace.dataset_dir(name)
    shutil.copytree(source, target)
    for number, caption in captions.items():
        (target / "images" / f"{number:04d}.txt").write_text(caption)


@pytest.mark.slow
def test_captions_are_trained_with_and_the_instance_prompt_as_caption_changes_nothing(
        ctx, runs):
    write_captions(ctx, "rex", "same", {1: "a photo of sks dog", 2: "a photo of sks dog"})
    write_captions(ctx, "rex", "captioned", {1: "sks dog asleep on a red sofa",
                                             2: "sks dog on the beach", 3: "sks dog, a hat"})
    same = train(ctx, dataset="same", run_name="same-captions")
    assert loss_values(same) == loss_values(runs["default"])
    # Frozen text encoder (cached embeddings) and trained one (encoded per step) both use it.
    one_step = {"dataset": "captioned", "max_train_steps": 1}
    assert train(ctx, run_name="captioned", **one_step)[0]["loss"] != runs["default"][0]["loss"]
    # A resume trains on the captions the run started with, or refuses.
    (ctx.workspace.dataset_dir("captioned") / "images/0002.txt").write_text("sks dog, wet")
    with pytest.raises(ToolError, match=r"captions \(<image>\.txt\) changed"):
        get_tool("resume_checkpoint").run(ctx, {"run": "captioned", "max_train_steps": 2})
    frozen = {"train_text_encoder": False, "max_train_steps": 1}
    assert (loss_values(train(ctx, run_name="captioned-frozen", **one_step,
                              train_text_encoder=False))
            != loss_values(train(ctx, run_name="frozen", **frozen)))


@pytest.mark.slow
def test_a_bad_caption_at_training_time_is_refused_before_the_run_exists(ctx):
    write_captions(ctx, "rex", "broken", {})
    (ctx.workspace.dataset_dir("broken") / "images/0002.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ToolError, match=r"0002\.txt: caption is not UTF-8 text"):
        get_tool("train").run(ctx, {**BASE, "dataset": "broken", "run_name": "broken"})
    assert not ctx.workspace.run_dir("broken").exists()


def test_the_identifier_must_be_a_word_of_the_instance_prompt():
    from booth.tools.dataset import names_token

    assert names_token("a photo of sks, my dog", "sks")
    assert names_token("A photo of SKS dog", "sks")  # CLIP lowercases
    assert not names_token("a photo of sksdog", "sks")
    assert not names_token("a photo of my dog", "sks")


# --- text-encoder LoRA ------------------------------------------------------------------------


@pytest.mark.slow
def test_text_encoder_lora_trains_the_text_encoder_and_resumes_exactly(ctx, tiny_model):
    import torch

    from booth.dreambooth.loading import load_pipeline
    from booth.dreambooth.trainer import load_run_pipeline

    lora = {"use_lora": True, "train_text_encoder": True, "learning_rate": 5e-3,
            "max_train_steps": 4, "checkpointing_steps": 2}
    straight = train(ctx, run_name="te-lora", **lora)
    run_dir = ctx.workspace.run_dir("te-lora")
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["train_text_encoder"] is True
    exported = tensors(run_dir / "lora/pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in exported)
    assert tensors(run_dir / "checkpoints/checkpoint-2/text_encoder.safetensors")

    pipeline = load_pipeline(tiny_model, device="cpu")
    ids = pipeline.tokenizer(["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipeline.text_encoder(ids)[0]
        pipeline.load_lora_weights(str(run_dir / "lora"))
        after = pipeline.text_encoder(ids)[0]
        from_checkpoint = load_run_pipeline(run_dir, "latest", device="cpu").text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-4, "the LoRA does not change the text encoder"
    torch.testing.assert_close(from_checkpoint, after)

    train(ctx, run_name="te-lora-cut", **{**lora, "max_train_steps": 2})
    get_tool("resume_checkpoint").run(ctx, {"run": "te-lora-cut", "max_train_steps": 4})
    cut = ctx.workspace.run_dir("te-lora-cut")
    assert loss_values(losses(cut)) == loss_values(straight)
    assert tensors(cut / "lora/pytorch_lora_weights.safetensors").keys() == exported.keys()
    assert all(bool((tensors(cut / "lora/pytorch_lora_weights.safetensors")[k] == v).all())
               for k, v in exported.items())


# --- W&B and prior precision ------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_names_the_extra_before_any_run_folder(ctx):
    with pytest.raises(ToolError, match=r"pip install 'booth\[wandb\]'"):
        get_tool("train").run(ctx, {**BASE, "run_name": "wandb", "report_to": "wandb"})
    assert not ctx.workspace.run_dir("wandb").exists()


@pytest.mark.slow
def test_prior_precision_is_part_of_the_set_and_reaches_the_model(tool_context):
    from booth.dreambooth.priors import PriorKey

    asked = []
    real = tool_context.load_pipeline

    def loading(base_model, *precision):
        asked.append(precision)
        pipeline = real(base_model, *precision)
        asked.append(pipeline.unet.dtype)
        return pipeline

    tool_context.load_pipeline = loading
    tool_context.console = Console(file=io.StringIO())
    call = {"class_prompt": "a photo of a dog", "num_images": 1, "num_inference_steps": 2,
            "resolution": 64}
    default = get_tool("generate_priors").run(tool_context, call)
    chosen = get_tool("generate_priors").run(tool_context, {**call, "precision": "bf16"})
    assert default["folder"] != chosen["folder"]
    import torch

    assert asked == [(), torch.float32, ("bf16",), torch.bfloat16]
    recorded = json.loads((Path(chosen["folder"]) / "priors.json").read_text())["key"]
    assert recorded["precision"] == "bf16"
    # Sets made before the field existed keep their key (and folder name).
    assert "precision" not in PriorKey("m", "a photo of a dog").identity()
