"""A run's weights as files other tools load, in `runs/<name>/export/`:

    <name>.safetensors          original SD-1.x layout (A1111, ComfyUI, Forge); of a LoRA run,
                                the base model with the adapters merged in
    <name>-lora.safetensors     LoRA run, kohya's format (the same UIs, kohya's scripts)
    <name>-diffusers/           a diffusers pipeline folder, or a LoRA folder
    <name>-step<N>...           the same for checkpoint N

A completed run writes the first (or the second) itself; `booth export` writes any of them
from the final model or a checkpoint. Every file goes through a temporary name and a rename.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from booth.dreambooth.checkpoints import EXPORT_DIR, TMP_PREFIX, replace_dir, resolve_checkpoint
from booth.dreambooth.config import TrainConfig, load_config
from booth.dreambooth.loading import load_pipeline
from booth.dreambooth.lora_formats import LORA_FILE, fuse, lora_modules, to_diffusers, to_kohya
from booth.dreambooth.models import export_pipeline, final_model_path, load_run_pipeline
from booth.dreambooth.single_file import (
    DTYPES,
    ExportError,
    pipeline_to_original,
    read_component,
    to_original,
    write_safetensors,
)

FORMATS = ("single-file", "kohya-lora", "diffusers")
_SUFFIX = {"single-file": ".safetensors", "kohya-lora": "-lora.safetensors",
           "diffusers": "-diffusers"}

__all__ = ["DTYPES", "EXPORT_DIR", "FORMATS", "ExportError", "export_path", "export_run",
           "final_exports", "write_final_export"]


def export_path(run_dir: Path, fmt: str, step: int | None = None) -> Path:
    tag = run_dir.name if step is None else f"{run_dir.name}-step{step}"
    return run_dir / EXPORT_DIR / f"{tag}{_SUFFIX[fmt]}"


def final_exports(run_dir: Path) -> list[Path]:
    """What a completed run wrote to export/ by itself (a resume rewrites them)."""
    return [export_path(run_dir, "single-file"), export_path(run_dir, "kohya-lora")]


def default_format(config: TrainConfig) -> str:
    return "kohya-lora" if config.use_lora else "single-file"


def write_final_export(run_dir: Path, config: TrainConfig) -> Path | None:
    """The export every completed run leaves: the single file, or the kohya LoRA.

    A model these layouts have no place for (not SD-1.x shaped) still completes its run: the
    diffusers output is whole; the reason is said instead of the file being written.
    """
    try:
        return export_run(run_dir, None, default_format(config), config.export_dtype)
    except ExportError as error:
        from rich.markup import escape

        from booth.dreambooth.setup import process_console

        process_console(None).print(f"[yellow]no {default_format(config)} export: "
                                    f"{escape(str(error))}[/]")
        return None


def export_run(run_dir: str | Path, checkpoint: str | None = None, fmt: str | None = None,
               dtype: str | None = None) -> Path:
    """Write the final model (checkpoint None) or a checkpoint of a run in `fmt`.

    Raises ExportError / CheckpointError with a message to show when the run, checkpoint or
    format does not fit. An existing target is replaced in one rename.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / "run.yaml")
    fmt, dtype = fmt or default_format(config), dtype or config.export_dtype
    if fmt not in FORMATS or dtype not in DTYPES:
        raise ExportError(f"unknown format {fmt!r} or dtype {dtype!r}: formats are "
                          f"{', '.join(FORMATS)}; dtypes {', '.join(DTYPES)}")
    if fmt == "kohya-lora" and not config.use_lora:
        raise ExportError(f"run {run_dir.name!r} is a full fine-tune, not a LoRA run: export "
                          "it as single-file or diffusers")
    step, folder = (None, None) if checkpoint is None else resolve_checkpoint(run_dir,
                                                                             checkpoint)
    if folder is None and final_model_path(run_dir) is None:
        raise ExportError(f"run {run_dir.name!r} has no final model (it did not complete); "
                          "export a checkpoint instead, e.g. --checkpoint latest")
    dest = export_path(run_dir, fmt, step)
    if fmt == "diffusers":
        return _diffusers(run_dir, config, folder, dest)
    if fmt == "kohya-lora":
        return write_safetensors(to_kohya(_lora(run_dir, folder), dtype), dest,
                                 {"ss_network_module": "networks.lora"})
    if config.use_lora:
        return write_safetensors(_fused(run_dir, config, folder, dtype), dest)
    return write_safetensors(_original(run_dir, checkpoint, folder, dtype), dest)


def _lora(run_dir: Path, folder: Path | None) -> dict:
    """The run's LoRA modules, from lora/ or from a checkpoint's PEFT-named weights."""
    from safetensors.torch import load_file

    if folder is None:
        return lora_modules(read_component(run_dir / "lora"))
    modules = {}
    for component in ("unet", "text_encoder"):
        file = folder / f"{component}.safetensors"
        if file.is_file():
            modules.update(lora_modules(load_file(str(file), device="cpu"), component))
    return modules


def _original(run_dir: Path, checkpoint: str | None, folder: Path | None, dtype: str) -> dict:
    if folder is None:
        return pipeline_to_original(run_dir / "final", dtype)
    pipeline = load_run_pipeline(run_dir, checkpoint=checkpoint, device="cpu")
    return to_original(pipeline.unet.state_dict(), pipeline.vae.state_dict(),
                       pipeline.text_encoder.state_dict(), dict(pipeline.unet.config),
                       dict(pipeline.vae.config), dtype)


def _fused(run_dir: Path, config: TrainConfig, folder: Path | None, dtype: str) -> dict:
    """A LoRA run as one checkpoint: the base model with the adapters merged into it."""
    base = load_pipeline(config.base_model, device="cpu")
    modules = _lora(run_dir, folder)
    unet, text_encoder = (fuse(getattr(base, name).state_dict(), modules, name)
                          for name in ("unet", "text_encoder"))
    return to_original(unet, base.vae.state_dict(), text_encoder, dict(base.unet.config),
                       dict(base.vae.config), dtype)


def _diffusers(run_dir: Path, config: TrainConfig, folder: Path | None, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if folder is None:  # the final model already is in this format: a copy
        shutil.copytree(final_model_path(run_dir), tmp)
    elif config.use_lora:
        tmp.mkdir()
        write_safetensors(to_diffusers(_lora(run_dir, folder)), tmp / LORA_FILE)
    else:
        pipeline = load_run_pipeline(run_dir, checkpoint=folder.name, device="cpu")
        return export_pipeline(config.base_model, pipeline.unet, pipeline.text_encoder, dest)
    replace_dir(tmp, dest)
    return dest
