"""Finding and loading the base model: a local diffusers folder, or a hub id already cached."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """The base model cannot be found or loaded; the message says what to do."""


def resolve_base_model(base_model: str) -> str:
    """Return what `from_pretrained` should be given, or explain why it cannot work.

    A local folder must be a diffusers pipeline (it has `model_index.json`). Anything else is
    treated as a hub id, which diffusers resolves from its cache or downloads.
    """
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); "
                "give a folder saved with save_pretrained, or a hub id"
            )
        return str(path.resolve())
    if base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise ModelLoadError(
            f"base model {base_model!r} is neither an existing folder nor a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    return base_model


def _load_failure(base_model: str, error: Exception) -> ModelLoadError:
    hint = (
        "check the hub id and your network, or pass a local folder with --base-model "
        "(`booth tiny-model DIR` writes a small offline one for trying booth out)"
    )
    return ModelLoadError(f"could not load base model {base_model!r}: {error}. {hint}")


def quiet_loading(source: str) -> None:
    """No "Loading weights" bars: booth shows its own progress. A model still to be fetched
    from the hub keeps its download bars (transformers' switch turns those off too)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if Path(source).exists():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def load_pipeline(base_model: str, device=None, dtype=None):
    """A `StableDiffusionPipeline` for inference, without safety checker or progress bars."""
    import torch
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(base_model)
    quiet_loading(source)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype or torch.float32, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise _load_failure(base_model, error) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or default_device())


def load_inference_pipeline(base_model: str):
    """The pipeline for generating images: fp16 on CUDA (half the memory, faster), fp32
    elsewhere (CPU fp16 is slow or unsupported)."""
    import torch

    return load_pipeline(base_model, dtype=torch.float16 if torch.cuda.is_available() else None)


def default_device():
    """cuda when present, else mps, else cpu: the same choice accelerate makes."""
    from accelerate import PartialState

    return PartialState().device
