"""Training for real on tiny Stable Diffusion models at 64 px: what a user finds on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from booth.tools import ToolArgumentError, ToolContext, ToolError, get_tool


def make_dataset(root: Path, name: str = "rex", count: int = 3, size: int = 64) -> Path:
    """A prepared dataset as prepare_dataset leaves it: images/ + manifest.json."""
    folder = root / "datasets" / name
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = []
    for i in range(count):
        file = f"images/{i + 1:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / file)
        images.append({"file": file})
    manifest = {"instance_token": "sks", "instance_prompt": "a photo of sks dog",
                "class_prompt": "a photo of a dog",
                "resolution": size, "images": images}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_priors(root: Path, count: int = 4, size: int = 96) -> Path:
    """Class images at another resolution than training, as a prior set may be."""
    folder = root / "priors" / "dog"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i + 1:04d}.png")
    (folder / "priors.json").write_text("{}")
    return folder


@pytest.fixture
def priors_found(monkeypatch):
    """find_prior_set answers with the workspace's priors/dog folder (or None if absent)."""
    def find(ctx, class_prompt, base_model=None, **_):
        folder = ctx.workspace.root / "priors" / "dog"
        return folder if folder.is_dir() else None

    monkeypatch.setattr("booth.tools.priors.find_prior_set", find)


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensors(file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(file))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def generate(pipeline, seed: int = 0):
    import torch

    return pipeline("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model):
    """One run with prior preservation and the text encoder trained: 4 steps, checkpoints at 2."""
    root = tmp_path_factory.mktemp("ws")
    make_dataset(root)
    make_priors(root)
    ctx = ToolContext.from_options(workspace=str(root), base_model=tiny_model)
    result = train_with_priors(ctx, root, max_train_steps=4, checkpointing_steps=2,
                               run_name="full", report_to="tensorboard")
    return ctx, result, root / "runs" / "full"


def train_with_priors(ctx, root: Path, **arguments) -> dict:
    """The train tool on dataset 'rex' with the class images of make_priors(root)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("booth.tools.priors.find_prior_set",
                      lambda ctx, prompt, base=None, **_: root / "priors" / "dog")
        return get_tool("train").run(ctx, {"dataset": "rex", "learning_rate": 1e-3,
                                           **arguments})


@pytest.mark.slow
def test_full_run_leaves_metrics_checkpoints_and_a_loadable_pipeline(full_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    _, result, run_dir = full_run
    assert result["status"] == "completed" and result["steps"] == 4
    assert result["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert "run='full'" in result["hint"]
    rows = losses(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("loss", "instance_loss", "prior_loss", "lr"))
        assert row["loss"] == pytest.approx(row["instance_loss"] + row["prior_loss"])
    assert result["final_loss"] == pytest.approx(rows[-1]["loss"], abs=1e-5)
    assert list((run_dir / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"

    pipeline = StableDiffusionPipeline.from_pretrained(result["final_model"])
    pipeline.set_progress_bar_config(disable=True)
    assert generate(pipeline).shape == (1, 64, 64, 3)
    base = Path(tiny_model)
    final = Path(result["final_model"])
    assert not same(tensors(final / "unet/diffusion_pytorch_model.safetensors"),
                    tensors(base / "unet/diffusion_pytorch_model.safetensors"))
    assert not same(tensors(final / "text_encoder/model.safetensors"),
                    tensors(base / "text_encoder/model.safetensors"))
    assert same(tensors(final / "vae/diffusion_pytorch_model.safetensors"),
                tensors(base / "vae/diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_run_yaml_is_the_resolved_config_and_round_trips(full_run, tmp_path):
    from booth.dreambooth.config import TrainConfig, load_config

    _, _, run_dir = full_run
    config = load_config(run_dir / "run.yaml")
    assert config.resolution == 64 and config.max_train_steps == 4
    assert config.class_prompt == "a photo of a dog" and config.prior_loss_weight == 1.0
    assert Path(config.class_data_dir).is_dir() and all(Path(p).is_file()
                                                         for p in config.instance_images)
    config.save_yaml(tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == (run_dir / "run.yaml").read_text()
    # Layering: defaults -> file -> overrides.
    layered = load_config(run_dir / "run.yaml", learning_rate=2e-6)
    assert layered.learning_rate == 2e-6 and layered.resolution == 64
    assert TrainConfig().learning_rate == 5e-6


@pytest.mark.slow
def test_load_run_pipeline_from_checkpoints_and_final(full_run):
    from booth.dreambooth.trainer import CheckpointError, load_run_pipeline

    _, _, run_dir = full_run
    final = load_run_pipeline(run_dir, device="cpu")
    latest = load_run_pipeline(run_dir, "latest", device="cpu")  # checkpoint-4 = the end
    early = load_run_pipeline(run_dir, "2", device="cpu")
    assert same(final.unet.state_dict(), latest.unet.state_dict())
    assert same(final.text_encoder.state_dict(), latest.text_encoder.state_dict())
    assert not same(final.unet.state_dict(), early.unet.state_dict())
    assert same(tensors(run_dir / "checkpoints/checkpoint-2/unet.safetensors"),
                early.unet.state_dict())
    with pytest.raises(CheckpointError, match="checkpoint-2, checkpoint-4"):
        load_run_pipeline(run_dir, "checkpoint-3", device="cpu")


def test_latest_ignores_half_written_checkpoints(tmp_path):
    from booth.dreambooth.checkpoints import list_checkpoints, resolve_checkpoint, sweep_temporary

    folder = tmp_path / "checkpoints"
    for name, complete in [("checkpoint-10", True), ("checkpoint-5", True),
                           (".tmp-checkpoint-20", True), ("checkpoint-15", False)]:
        (folder / name).mkdir(parents=True)
        if complete:
            (folder / name / "training_state.json").write_text('{"step": 0}')
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert resolve_checkpoint(tmp_path, "latest")[0] == 10
    assert resolve_checkpoint(tmp_path, "checkpoint-5")[0] == 5
    sweep_temporary(tmp_path)
    assert not (folder / ".tmp-checkpoint-20").exists()


@pytest.mark.slow
def test_frozen_text_encoder_without_priors(tool_context, tiny_model):
    make_dataset(tool_context.workspace.root)
    result = get_tool("train").run(tool_context, {
        "dataset": "rex", "max_train_steps": 2, "learning_rate": 1e-3, "prior_loss_weight": 0,
        "train_text_encoder": False, "run_name": "frozen", "report_to": "none"})
    run_dir = tool_context.workspace.run_dir("frozen")
    assert "prior_loss" not in losses(run_dir)[0]
    final, base = Path(result["final_model"]), Path(tiny_model)
    assert same(tensors(final / "text_encoder/model.safetensors"),
                tensors(base / "text_encoder/model.safetensors"))
    assert not same(tensors(final / "unet/diffusion_pytorch_model.safetensors"),
                    tensors(base / "unet/diffusion_pytorch_model.safetensors"))
    checkpoint = run_dir / "checkpoints/checkpoint-2"
    assert (checkpoint / "unet.safetensors").is_file()
    assert not (checkpoint / "text_encoder.safetensors").exists()


@pytest.mark.slow
def test_lora_weights_load_with_load_lora_weights_and_change_images(tool_context, tiny_model):
    from booth.dreambooth.loading import load_pipeline
    from booth.dreambooth.trainer import load_run_pipeline

    make_dataset(tool_context.workspace.root)
    result = get_tool("train").run(tool_context, {
        "dataset": "rex", "max_train_steps": 3, "learning_rate": 5e-3, "prior_loss_weight": 0,
        "use_lora": True, "lora_rank": 4, "run_name": "lora", "report_to": "none"})
    lora_dir = Path(result["final_model"])
    assert lora_dir.name == "lora" and (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipeline = load_pipeline(tiny_model, device="cpu")
    before = generate(pipeline)
    pipeline.load_lora_weights(str(lora_dir))
    after = generate(pipeline)
    assert np.abs(after - before).max() > 1e-4, "LoRA weights do not change the images"
    # The checkpoint holds only the adapters, and gives the same model as the export.
    run_dir = tool_context.workspace.run_dir("lora")
    saved = tensors(run_dir / "checkpoints/checkpoint-3/unet.safetensors")
    assert saved and all("lora" in key for key in saved)
    from_checkpoint = generate(load_run_pipeline(run_dir, "latest", device="cpu"))
    np.testing.assert_allclose(from_checkpoint, after, atol=1e-4)
    np.testing.assert_allclose(generate(load_run_pipeline(run_dir, device="cpu")), after, atol=1e-4)


def write_char_tokenizer(folder: Path) -> None:
    """A CLIP-layout tokenizer with no merges at all (one token per character)."""
    from booth.dreambooth.tiny import _bytes_to_unicode  # the byte table is CLIP's, not ours

    folder.mkdir(parents=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_other_sd(folder: Path) -> Path:
    """An SD-1.x folder made here with other sizes, v-prediction and a PNDM sampler."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_char_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok", model_max_length=77)
    assert len(tokenizer) > 500
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=30, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", steps_offset=1,
                              skip_prk_steps=True)
    assert DDPMScheduler.from_config(scheduler.config).config.prediction_type == "v_prediction"
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder / "model")
    return folder / "model"


@pytest.mark.slow
def test_any_sd1_diffusers_folder_trains(tmp_path):
    from diffusers import StableDiffusionPipeline

    from booth.dreambooth.config import TrainConfig
    from booth.dreambooth.trainer import train

    model = build_other_sd(tmp_path / "other")
    dataset = make_dataset(tmp_path, count=2)
    config = TrainConfig(base_model=str(model), output_dir=str(tmp_path / "run"),
                         instance_images=[str(p) for p in sorted(dataset.glob("images/*"))],
                         prior_loss_weight=0, resolution=64, max_train_steps=2,
                         learning_rate=1e-3, checkpointing_steps=1, report_to="none")
    result = train(config)
    assert result.status == "completed" and result.steps_done == 2
    assert all(math.isfinite(row["loss"]) for row in losses(result.run_dir))
    pipeline = StableDiffusionPipeline.from_pretrained(result.final_model)
    pipeline.set_progress_bar_config(disable=True)
    assert generate(pipeline).shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_stop_request_saves_a_checkpoint_and_reports_interrupted(tool_context):
    make_dataset(tool_context.workspace.root)
    tool_context.stop_requested.set()  # as the first Ctrl-C does
    result = get_tool("train").run(tool_context, {
        "dataset": "rex", "max_train_steps": 50, "learning_rate": 1e-4, "prior_loss_weight": 0,
        "checkpointing_steps": 20, "run_name": "stopped", "report_to": "none"})
    assert result["status"] == "interrupted" and result["steps"] == 1
    assert result["checkpoints"] == ["checkpoint-1"] and result["final_model"] is None
    assert "resume_checkpoint(run='stopped')" in result["hint"]


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_a_lower_learning_rate(tool_context, monkeypatch):
    import torch

    import booth.dreambooth.trainer as trainer

    make_dataset(tool_context.workspace.root)
    real = trainer._losses  # the real loss made NaN: it has a graph, as a diverged one does
    monkeypatch.setattr(trainer, "_losses",
                        lambda *a: {k: v * torch.tensor(float("nan")) for k, v in real(*a).items()})
    with pytest.raises(ToolError, match=r"NaN.*step 1.*lower learning_rate"):
        get_tool("train").run(tool_context, {
            "dataset": "rex", "max_train_steps": 5, "learning_rate": 1e-4,
            "prior_loss_weight": 0, "run_name": "nan", "report_to": "none"})
    assert not tool_context.workspace.run_dir("nan").exists()  # nothing worth keeping


@pytest.mark.parametrize("arguments, error, message", [
    ({"max_train_steps": 0}, ToolArgumentError, "max_train_steps"),
    ({"learning_rate": 1.5}, ToolArgumentError, "learning_rate"),
    ({"run_name": "../x"}, ToolArgumentError, "run_name"),
    ({"dataset": "nope"}, ToolError, "no dataset 'nope'.*prepare_dataset"),
    ({"mixed_precision": "fp8"}, ToolArgumentError, "mixed_precision"),
    ({"prior_loss_weight": 1.0}, ToolError, "generate_priors"),
    ({"base_model": "/no/such/model"}, ToolError, "base model"),
])
def test_invalid_train_calls_fail_clearly_and_create_nothing(
        tool_context, priors_found, arguments, error, message):
    make_dataset(tool_context.workspace.root)
    call = {"dataset": "rex", "max_train_steps": 2, "learning_rate": 1e-4,
            "prior_loss_weight": 0, **arguments}
    with pytest.raises(error, match=message):
        get_tool("train").run(tool_context, call)
    assert not (tool_context.workspace.root / "runs").exists() or not any(
        (tool_context.workspace.root / "runs").iterdir())


def test_an_existing_run_name_is_refused(tool_context):
    make_dataset(tool_context.workspace.root)
    tool_context.workspace.run_dir("taken").mkdir(parents=True)
    with pytest.raises(ToolError, match="already exists.*resume_checkpoint"):
        get_tool("train").run(tool_context, {"dataset": "rex", "max_train_steps": 2,
                                             "learning_rate": 1e-4, "run_name": "taken"})


def test_estimate_names_steps_resolution_and_device(tool_context):
    make_dataset(tool_context.workspace.root)
    tool = get_tool("train")
    line = tool.estimate(tool_context, tool.validate(
        {"dataset": "rex", "max_train_steps": 400, "learning_rate": 5e-6}))
    assert line.startswith("400 steps at 64 px (with prior preservation)")
    # Nothing measured yet in this workspace: the table's figure, and it says so.
    assert "~" in line and " on cpu (" in line and line.endswith("(rough guess)")


@pytest.mark.slow  # full_run trains
def test_resume_estimate_says_what_an_earlier_checkpoint_replaces(full_run):
    ctx, _, _ = full_run
    tool = get_tool("resume_checkpoint")
    line = tool.estimate(ctx, tool.validate({"run": "full", "checkpoint": "2",
                                             "max_train_steps": 6}))
    assert line.startswith("from checkpoint-2 to step 6: 4 steps")
    assert line.endswith("; replaces checkpoint-4 and the final model")


def test_out_of_gpu_memory_names_the_memory_ladder(tool_context, monkeypatch):
    import torch

    import booth.dreambooth.trainer as trainer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    make_dataset(tool_context.workspace.root)
    call = {"dataset": "rex", "max_train_steps": 5, "learning_rate": 5e-6,
            "prior_loss_weight": 0, "run_name": "big"}
    monkeypatch.setattr(trainer, "train", out_of_memory)
    with pytest.raises(ToolError) as error:
        get_tool("train").run(tool_context, call)
    message = str(error.value)
    assert message.startswith("the GPU ran out of memory")
    for advice in ("mixed_precision='fp16'", "gradient_checkpointing=true",
                   "use_8bit_adam=true", "train_text_encoder=false", "use_lora=true"):
        assert advice in message
    # Out of memory before the first checkpoint: the run is gone, there is nothing to resume.
    assert "resume_checkpoint" not in message

    def out_of_memory_later(config, **kwargs):  # after a checkpoint was saved
        checkpoint = Path(config.output_dir) / "checkpoints" / "checkpoint-2"
        checkpoint.mkdir(parents=True)
        (checkpoint / "training_state.json").write_text("{}")
        out_of_memory()

    monkeypatch.setattr(trainer, "train", out_of_memory_later)
    with pytest.raises(ToolError, match="resume_checkpoint run='later' continues"):
        get_tool("train").run(tool_context, {**call, "run_name": "later"})


def test_a_local_base_model_is_kept_as_an_absolute_path(tiny_model, workspace, monkeypatch):
    model = Path(tiny_model)
    monkeypatch.chdir(model.parent)
    ctx = ToolContext.from_options(workspace=workspace, base_model=f"./{model.name}")
    assert ctx.base_model == str(model.resolve())
    hub = ToolContext.from_options(workspace=workspace, base_model="someone/some-model")
    assert hub.base_model == "someone/some-model"


@pytest.mark.slow
def test_a_run_trained_from_a_relative_model_path_samples_from_anywhere(
        tool_context, tiny_model, monkeypatch, tmp_path):
    from booth.dreambooth.config import load_config
    from booth.dreambooth.trainer import load_run_pipeline

    make_dataset(tool_context.workspace.root)
    model = Path(tiny_model)
    monkeypatch.chdir(model.parent)
    get_tool("train").run(tool_context, {
        "dataset": "rex", "max_train_steps": 1, "learning_rate": 1e-3, "prior_loss_weight": 0,
        "train_text_encoder": False, "use_lora": True, "run_name": "rel",
        "base_model": f"./{model.name}", "report_to": "none"})
    run_dir = tool_context.workspace.run_dir("rel")
    assert load_config(run_dir / "run.yaml").base_model == str(model.resolve())
    monkeypatch.chdir(tmp_path)
    assert generate(load_run_pipeline(run_dir, device="cpu")).shape == (1, 64, 64, 3)
    assert generate(load_run_pipeline(run_dir, "latest", device="cpu")).shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_the_text_encoder_too(tool_context, monkeypatch):
    import transformers.modeling_utils

    calls = []
    real = transformers.modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(type(function.args[0]).__name__)  # partial(forward, layer)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    make_dataset(tool_context.workspace.root)
    get_tool("train").run(tool_context, {
        "dataset": "rex", "max_train_steps": 1, "learning_rate": 1e-3, "prior_loss_weight": 0,
        "gradient_checkpointing": True, "train_text_encoder": True, "run_name": "gc",
        "report_to": "none"})
    assert calls and set(calls) == {"CLIPEncoderLayer"}


def test_training_above_the_prepared_resolution_is_refused(tool_context):
    make_dataset(tool_context.workspace.root, size=64)
    with pytest.raises(ToolError, match=r"prepared at 64 px.*prepare_dataset again with "
                                        r"resolution=128"):
        get_tool("train").run(tool_context, {
            "dataset": "rex", "max_train_steps": 1, "learning_rate": 1e-4,
            "prior_loss_weight": 0, "resolution": 128, "run_name": "big"})
    assert not tool_context.workspace.run_dir("big").exists()
