"""The model side of a run: loading the parts, LoRA adapters, and the exported result.

Every run leaves one of two things other tools load: a full diffusers pipeline folder
(`final/`, `StableDiffusionPipeline.from_pretrained`) or LoRA weights (`lora/`,
`pipe.load_lora_weights`). `load_run_pipeline` returns either, or the weights of any
checkpoint on top of the base model, ready to sample.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booth.dreambooth.checkpoints import (
    TMP_PREFIX,
    CheckpointError,
    discard_after,
    load_weights,
    read_training_state,
    remove_dir,
    replace_dir,
    resolve_checkpoint,
    truncate_metrics,
)
from booth.dreambooth.config import load_config
from booth.dreambooth.loading import (
    ensure_downloadable,
    load_failure,
    load_pipeline,
    quiet_progress,
    resolve_base_model,
)
from booth.dreambooth.plots import write_loss_plot
from booth.dreambooth.validation import LOSS_PLOT, discard_validation_after

FINAL_DIR = "final"
LORA_DIR = "lora"
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Parts:
    """The pieces of an SD-1.x pipeline that training touches."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any


def load_parts(base_model: str) -> Parts:
    """Load UNet, VAE, text encoder, tokenizer and a DDPM training scheduler from `base_model`."""
    source = resolve_base_model(base_model)
    ensure_downloadable(source)
    with quiet_progress(source):
        return _load_parts(source, base_model)


def _load_parts(source: str, base_model: str) -> Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return Parts(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            # Training always adds noise the DDPM way, whatever sampler the base model ships.
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        )
    except (OSError, ValueError) as error:
        raise load_failure(base_model, error, "its SD-1.x parts (unet/, vae/, text_encoder/, "
                           "tokenizer/, scheduler/)") from None


def lora_config(rank: int, targets: list[str]):
    from peft import LoraConfig

    # alpha = rank: scale 1, which is also what load_lora_weights assumes without metadata.
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                      target_modules=targets)


def add_lora(unet, text_encoder, rank: int) -> None:
    """Freeze the base weights and add trainable low-rank adapters (text encoder optional).

    The text encoder's go in with peft's own `inject_adapter_in_model`, not transformers'
    `add_adapter`: transformers 5 refuses peft < 0.22 there, while the injection (the one
    diffusers' `load_lora_weights` uses to load them back) works with the peft booth declares.
    """
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, UNET_LORA_TARGETS))
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
        inject_adapter_in_model(lora_config(rank, TEXT_LORA_TARGETS), text_encoder)


def export_pipeline(base_model: str, unet, text_encoder, dest: Path) -> Path:
    """Save base model + trained UNet (and text encoder) as a diffusers pipeline folder."""
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(base_model)
    trained = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress(source):
        pipeline = StableDiffusionPipeline.from_pretrained(
            source, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            **trained,
        )
        pipeline.save_pretrained(tmp, safe_serialization=True)
    _copy_missing_tokenizer_files(Path(source) / "tokenizer", tmp / "tokenizer")
    replace_dir(tmp, dest)
    return dest


def _copy_missing_tokenizer_files(source: Path, dest: Path) -> None:
    # transformers 5 writes only tokenizer.json; keep vocab/merges for readers that want them.
    if source.is_dir():
        for file in source.iterdir():
            if file.is_file() and not (dest / file.name).exists():
                shutil.copy2(file, dest / file.name)


def export_lora(unet, text_encoder, dest: Path) -> Path:
    """Save the adapters in diffusers' format, loadable with `pipe.load_lora_weights(dest)`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=layers(unet),
        text_encoder_lora_layers=layers(text_encoder) if text_encoder is not None else None,
        safe_serialization=True,
    )
    replace_dir(tmp, dest)
    return dest


def final_model_path(run_dir: Path) -> Path | None:
    """`final/` or `lora/` of a run that completed, else None."""
    for name in (FINAL_DIR, LORA_DIR):
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


def discard_outputs_after(run_dir: Path, step: int) -> None:
    """Resuming from `step` writes anew what came after it: later checkpoints, metric lines,
    the final model and its exports, validation images go (loss.png is drawn again without
    them)."""
    from booth.dreambooth.export import final_exports  # it imports this module

    discard_after(run_dir, step)
    for name in (FINAL_DIR, LORA_DIR):
        remove_dir(run_dir / name)
    for file in final_exports(run_dir):
        file.unlink(missing_ok=True)
    truncate_metrics(run_dir / "metrics.jsonl", step)
    discard_validation_after(run_dir, step)
    if (run_dir / LOSS_PLOT).is_file():  # a resume from step 0 has nothing to draw
        write_loss_plot(run_dir / "metrics.jsonl", run_dir / LOSS_PLOT)


def load_run_pipeline(run_dir: str | Path, checkpoint: str | None = None, device=None):
    """A StableDiffusionPipeline carrying a run's trained weights, ready to sample.

    checkpoint None: the run's final model (its pipeline folder, or base model + LoRA).
    Otherwise "latest", "checkpoint-<step>" or "<step>": the base model with the weights that
    checkpoint stored. Raises ModelLoadError or CheckpointError with a message to show.
    """
    from booth.dreambooth.loading import default_device

    run_dir = Path(run_dir)
    config = load_config(run_dir / "run.yaml")
    device = device or default_device()
    if checkpoint is None:
        final = final_model_path(run_dir)
        if final is None:
            raise CheckpointError(
                f"run {run_dir.name!r} has no final model (it did not complete); sample from "
                "a checkpoint instead, e.g. checkpoint='latest', or finish it with "
                f"resume_checkpoint(run={run_dir.name!r})"
            )
        if final.name == FINAL_DIR:
            return load_pipeline(str(final), device=device)
        pipeline = load_pipeline(config.base_model, device=device)
        pipeline.load_lora_weights(str(final))
        return pipeline
    _, folder = resolve_checkpoint(run_dir, checkpoint)
    pipeline = load_pipeline(config.base_model, device="cpu")
    trained = read_training_state(folder)["models"]
    if config.use_lora:
        add_lora(pipeline.unet, pipeline.text_encoder if "text_encoder" in trained else None,
                 config.lora_rank)
    for name in trained:
        load_weights(getattr(pipeline, name), folder / f"{name}.safetensors")
    return pipeline.to(device)
