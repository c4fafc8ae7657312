"""Exports for the rest of the ecosystem: the original-layout single file, kohya LoRA, LoRA
checkpoints that load_lora_weights reads, and `booth export` -- each read back by diffusers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import generate, losses, make_dataset, tensors
from typer.testing import CliRunner

from booth.cli import app
from booth.tools import ToolContext, get_tool

pytestmark = pytest.mark.slow
runner = CliRunner()


def _train(root: Path, tiny_model: str, name: str, **extra) -> Path:
    ctx = ToolContext.from_options(workspace=str(root), base_model=tiny_model)
    get_tool("train").run(ctx, {
        "dataset": "rex", "max_train_steps": 2, "learning_rate": 5e-3, "prior_loss_weight": 0,
        "checkpointing_steps": 1, "run_name": name, "report_to": "none",
        "validation_steps": 0, **extra})
    return root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """One workspace with a full fine-tune (UNet + text encoder) and a LoRA run, 2 steps each."""
    root = tmp_path_factory.mktemp("ws")
    make_dataset(root)
    return root, _train(root, tiny_model, "full"), _train(root, tiny_model, "lo", use_lora=True)


def booth(root: Path, *args: str):
    return runner.invoke(app, ["-w", str(root), "export", *args])


def from_single_file(path: Path, config: str):
    from diffusers import StableDiffusionPipeline

    # config: the diffusers folder whose sizes the file has (the tiny ones are no standard);
    # local_files_only: nothing is fetched (conftest also sets HF_HUB_OFFLINE).
    return StableDiffusionPipeline.from_single_file(
        str(path), config=config, local_files_only=True, safety_checker=None,
        requires_safety_checker=False, dtype=torch.float32)


def unprefixed(state: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def assert_weights(pipeline, final: Path, cast=None) -> None:
    for name in ("unet", "vae", "text_encoder"):
        expected = {}
        for file in (final / name).glob("*.safetensors"):
            expected.update(tensors(file))
        got = unprefixed(getattr(pipeline, name).state_dict())
        assert set(expected) <= set(got), name
        for key, value in expected.items():
            value = value.to(cast).float() if cast else value
            assert torch.equal(got[key].float(), value), f"{name}: {key}"


def test_a_full_run_writes_a_single_file_in_the_original_layout(runs):
    _, run, _ = runs
    file = run / "export" / "full.safetensors"
    state = tensors(file)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in state)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.") for k in state)
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolution
    assert {v.dtype for v in state.values()} == {torch.float16}  # export_dtype's default
    assert not [p for p in file.parent.iterdir() if p.name.startswith(".tmp-")]


def test_the_single_file_loads_back_with_the_trained_weights(runs, tiny_model):
    root, run, _ = runs
    # fp16 (written by the run itself): equal to the fp16-cast weights.
    assert_weights(from_single_file(run / "export/full.safetensors", tiny_model),
                   run / "final", cast=torch.float16)
    result = booth(root, "full", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.split(" (")[0])
    assert written == run / "export/full.safetensors"
    assert re.search(r"\(\d+\.\d MB\)", result.stdout)
    # fp32: identical, and from the trained weights (they differ from the base model's).
    pipeline = from_single_file(written, str(run / "final"))
    assert_weights(pipeline, run / "final")
    base = tensors(Path(tiny_model) / "unet/diffusion_pytorch_model.safetensors")
    assert not torch.equal(pipeline.unet.state_dict()["conv_in.weight"], base["conv_in.weight"])


def test_a_checkpoint_exports_its_own_weights(runs, tiny_model):
    from booth.dreambooth.trainer import load_run_pipeline

    root, run, _ = runs
    result = booth(root, "full", "--checkpoint", "1", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    file = run / "export/full-step1.safetensors"
    loaded = from_single_file(file, tiny_model)
    early = load_run_pipeline(run, "1", device="cpu")
    for name in ("unet", "text_encoder"):
        expected = getattr(early, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    assert not torch.equal(loaded.unet.state_dict()["conv_in.weight"],
                           load_run_pipeline(run, device="cpu").unet.state_dict()["conv_in.weight"])


def test_the_kohya_lora_loads_and_gives_the_images_of_lora(runs, tiny_model):
    from booth.dreambooth.loading import load_pipeline

    _, _, run = runs
    file = run / "export/lo-lora.safetensors"
    state = tensors(file)
    assert state and all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in state)
    assert any(k.startswith("lora_te_") for k in state), "the text encoder's LoRA is exported"
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert state[f"{name}.alpha"].item() == state[f"{name}.lora_down.weight"].shape[0] == 4
    pipeline = load_pipeline(tiny_model, device="cpu")
    base = generate(pipeline)
    pipeline.load_lora_weights(str(file))
    kohya = generate(pipeline)
    assert np.abs(kohya - base).max() > 1e-3, "the kohya file changes nothing"
    kohya_text = encode(pipeline)
    pipeline = load_pipeline(tiny_model, device="cpu")
    base_text = encode(pipeline)
    pipeline.load_lora_weights(str(run / "lora"))
    np.testing.assert_allclose(kohya, generate(pipeline), atol=2e-3)  # fp16 vs fp32 weights
    assert (kohya_text - base_text).abs().max() > 1e-2, "the text encoder's LoRA is applied"
    torch.testing.assert_close(kohya_text, encode(pipeline), atol=1e-3, rtol=1e-3)


def encode(pipeline):
    ids = pipeline.tokenizer(["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.text_encoder(ids)[0]


def test_a_lora_checkpoint_loads_with_load_lora_weights(runs, tiny_model):
    from booth.dreambooth.loading import load_pipeline
    from booth.dreambooth.trainer import load_run_pipeline

    _, _, run = runs
    checkpoint = run / "checkpoints/checkpoint-1"
    pipeline = load_pipeline(tiny_model, device="cpu")
    base = generate(pipeline)
    pipeline.load_lora_weights(str(checkpoint))
    loaded = generate(pipeline)
    assert np.abs(loaded - base).max() > 1e-3, "the checkpoint loads nothing"
    np.testing.assert_allclose(loaded, generate(load_run_pipeline(run, "1", device="cpu")),
                               atol=1e-5)


def test_a_lora_run_as_one_file_is_the_base_model_with_the_lora_merged(runs, tiny_model):
    from booth.dreambooth.loading import load_pipeline

    root, _, run = runs
    result = booth(root, "lo", "--format", "single-file", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    merged = from_single_file(run / "export/lo.safetensors", tiny_model)
    merged.set_progress_bar_config(disable=True)
    pipeline = load_pipeline(tiny_model, device="cpu")
    base = generate(pipeline)
    pipeline.load_lora_weights(str(run / "lora"))
    assert np.abs(generate(merged) - base).max() > 1e-3
    np.testing.assert_allclose(generate(merged), generate(pipeline), atol=1e-4)


def test_export_refuses_what_does_not_fit_in_one_line(runs, tmp_path):
    root, _, _ = runs
    cases = [(("nope",), "no training run 'nope'"),
             (("full", "--checkpoint", "7"), "available: checkpoint-1, checkpoint-2"),
             (("full", "--format", "kohya-lora"), "is a full fine-tune, not a LoRA run"),
             (("lo", "--checkpoint", "latest", "--format", "kohya-lora", "--dtype", "fp64"),
              "dtype 'fp64'"),
             (("full", "--format", "ckpt"), "unknown format 'ckpt'"),
             (("full", "--dtype", "fp8"), "dtype 'fp8'"),
             ((str(tmp_path),), "is not a run folder"),
             (("../x",), "is not a run folder")]
    for args, message in cases:
        result = booth(root, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, args
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_other_formats_and_a_run_given_as_a_path(runs, tiny_model):
    from booth.dreambooth.loading import load_pipeline

    root, full, lora = runs
    result = booth(root, str(lora), "--checkpoint", "latest", "--format", "diffusers")
    assert result.exit_code == 0, result.output
    pipeline = load_pipeline(tiny_model, device="cpu")
    pipeline.load_lora_weights(str(lora / "export/lo-step2-diffusers"))
    assert booth(root, "lo", "--checkpoint", "2").exit_code == 0
    assert tensors(lora / "export/lo-step2-lora.safetensors").keys() == \
        tensors(lora / "export/lo-lora.safetensors").keys()
    assert booth(root, "full", "--format", "diffusers").exit_code == 0
    assert (full / "export/full-diffusers/model_index.json").is_file()


def test_a_failed_export_leaves_the_old_file_and_no_partial_one(runs, monkeypatch):
    from booth.dreambooth.export import export_run

    _, full, lora = runs
    file = full / "export/full.safetensors"
    before = file.read_bytes()

    def crash(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_run(full, dtype="fp32")
    with pytest.raises(OSError, match="disk full"):
        export_run(lora, checkpoint="1")
    assert file.read_bytes() == before
    assert not (lora / "export/lo-step1-lora.safetensors").exists()
    for folder in (full / "export", lora / "export"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_what_a_killed_export_left_is_swept_on_resume(runs):
    from booth.dreambooth.checkpoints import sweep_temporary

    _, run, _ = runs
    left = run / "export/.tmp-full-step9.safetensors"  # a SIGKILL cannot run `finally`
    left.write_bytes(b"half")
    sweep_temporary(run)
    assert not left.exists() and (run / "export/full.safetensors").is_file()


def test_a_lora_run_with_loadable_checkpoints_still_resumes_exactly(runs):
    import shutil

    from booth.dreambooth.trainer import resume

    _, _, run = runs
    again = run.with_name("lo-again")
    shutil.copytree(run, again)
    result = resume(again, "checkpoint-1")
    assert result.status == "completed"
    assert [r["loss"] for r in losses(again)] == [r["loss"] for r in losses(run)]
    for first, second in [(run / "lora/pytorch_lora_weights.safetensors",
                           again / "lora/pytorch_lora_weights.safetensors"),
                          (run / "export/lo-lora.safetensors",
                           again / "export/lo-again-lora.safetensors")]:
        first, second = tensors(first), tensors(second)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_text_encoder_lora_gets_the_sd1_kohya_names():
    from booth.dreambooth.lora_formats import lora_modules, to_kohya

    # transformers 5 names the modules without text_model.; SD-1.x tools want lora_te_text_model
    state = {"encoder.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(2, 8),
             "encoder.layers.0.self_attn.q_proj.lora_B.default.weight": torch.ones(8, 2)}
    kohya = to_kohya(lora_modules(state, "text_encoder"), "fp32")
    assert sorted(kohya) == [f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{end}"
                             for end in ("alpha", "lora_down.weight", "lora_up.weight")]
    assert kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2


def test_a_model_the_original_layout_cannot_hold_is_refused_by_name(runs):
    from booth.dreambooth.single_file import ExportError, read_component, read_config, to_original

    _, run, _ = runs
    unet = read_component(run / "final/unet") | {"class_embedding.weight": torch.ones(1)}
    with pytest.raises(ExportError, match="'class_embedding.weight'"):
        to_original(unet, read_component(run / "final/vae"), {}, read_config(run / "final/unet"),
                    read_config(run / "final/vae"))


def test_the_sd15_block_layout_maps_to_what_diffusers_reads_back():
    """The tiny model has 2 blocks; SD 1.5 has 4, with attention where the tiny one has none.
    The same layout at narrow widths goes through diffusers' own original->diffusers maps."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from booth.dreambooth.single_file import unet_to_original, vae_to_original

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=8)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    for model, to_original, back in [(unet, unet_to_original, convert_ldm_unet_checkpoint),
                                     (vae, vae_to_original, convert_ldm_vae_checkpoint)]:
        state, config = model.state_dict(), dict(model.config)
        original = to_original(state, config)
        assert "model.diffusion_model.output_blocks.11.1.proj_out.weight" in original or \
            "first_stage_model.decoder.up.3.upsample.conv.weight" in original
        again = back(original, config)
        assert again.keys() == state.keys()
        assert all(torch.equal(again[k].reshape(state[k].shape), state[k]) for k in state)


def test_a_run_whose_model_has_no_original_layout_completes_and_says_so(runs, monkeypatch,
                                                                          capsys):
    from booth.dreambooth.config import load_config
    from booth.dreambooth.export import write_final_export
    from booth.dreambooth.single_file import ExportError

    _, run, _ = runs

    def refuse(*_, **__):
        raise ExportError("the UNet has a weight 'x' that the SD-1.x layout has no place for")

    monkeypatch.setattr("booth.dreambooth.export.pipeline_to_original", refuse)
    assert write_final_export(run, load_config(run / "run.yaml")) is None
    assert "no single-file export: the UNet has a weight 'x'" in capsys.readouterr().err
