"""Finding and loading the base model: a local diffusers folder, or a hub id already cached."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from booth.dreambooth.errors import ModelLoadError

__all__ = ["ModelLoadError", "load_inference_pipeline", "load_pipeline", "resolve_base_model"]


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
    if not _in_hub_cache(base_model) and _hub_offline():
        raise _not_here(base_model, "and the hub is switched off here (HF_HUB_OFFLINE)")
    return base_model


_WHAT_TO_DO = ("download it first where there is a network (`hf download {id}`), or pass a "
               "local diffusers folder with --base-model (`booth tiny-model DIR` writes a small "
               "one for trying booth out)")


def ensure_downloadable(base_model: str) -> None:
    """Before loading a hub model that is not in the cache: a hub that cannot be reached is
    said at once, rather than after the libraries' retries and timeouts."""
    import urllib.request

    if Path(base_model).expanduser().exists() or _in_hub_cache(base_model):
        return
    if urllib.request.getproxies():  # the hub library goes through the proxy; a socket cannot
        return
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=3).close()
    except OSError:
        raise _not_here(base_model, f"and {host.hostname} cannot be reached from here") \
            from None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_here(base_model: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"base model {base_model!r} is neither a local folder nor in the "
                          f"local Hugging Face cache, {why}: " + _WHAT_TO_DO.format(id=base_model))


def load_failure(base_model: str, error: Exception, what: str = "it") -> ModelLoadError:
    """One line for a model that did not load. The libraries' own words point at "the
    stacktrace above", which booth does not show: only their first sentence is kept."""
    reason = str(error).split(". ")[0].split("\n")[0].strip()
    if Path(base_model).expanduser().exists():
        return ModelLoadError(f"could not load {what} of base model {base_model!r}: {reason}")
    return ModelLoadError(f"could not download base model {base_model!r} ({reason}): check "
                          "the id, or " + _WHAT_TO_DO.format(id=base_model))


@contextmanager
def quiet_progress(source: str | None = None):
    """Hide the libraries' tqdm bars ("Loading weights") while reading or writing a local
    folder: they would interleave with booth's own. A model still to be fetched from the hub
    (`source` not a local folder) keeps its download bars. The bars' state is restored."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    if source is not None and not Path(source).is_dir():
        yield
        return
    libraries = [lib for lib in (diffusers_logging, transformers_logging)
                 if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def load_pipeline(base_model: str, device=None, dtype=None, half_on_cuda: bool = False):
    """A `StableDiffusionPipeline` for inference, without safety checker or progress bars;
    `half_on_cuda`: fp16 when the device is CUDA (half the memory, faster)."""
    source = resolve_base_model(base_model)  # before the seconds of importing torch
    ensure_downloadable(source)
    import torch
    from diffusers import StableDiffusionPipeline

    if dtype is None and half_on_cuda and torch.cuda.is_available():
        dtype = torch.float16
    try:
        with quiet_progress(source):
            pipeline = StableDiffusionPipeline.from_pretrained(
                source, dtype=dtype or torch.float32, safety_checker=None,
                requires_safety_checker=False)
    except (OSError, ValueError) as error:
        raise load_failure(base_model, error) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or default_device())


PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_inference_pipeline(base_model: str, precision: str | None = None):
    """The pipeline for generating images: by default fp16 on CUDA (half the memory, faster),
    fp32 elsewhere (CPU fp16 is slow or unsupported); `precision` ("fp32", "fp16", "bf16")
    chooses."""
    import torch

    dtype = getattr(torch, PRECISIONS[precision]) if precision else None
    return load_pipeline(base_model, dtype=dtype, half_on_cuda=True)


def default_device():
    """cuda when present, else mps, else cpu: the same choice accelerate makes."""
    from accelerate import PartialState

    return PartialState().device
