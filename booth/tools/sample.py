"""The `sample` tool: render prompts with the base model or a trained run, save PNGs + a grid."""

from __future__ import annotations

import time
from typing import Annotated

from booth.dreambooth.checkpoints import CHOICE as CHECKPOINT_CHOICE
from booth.dreambooth.sampling import DEFAULT_STEPS
from booth.schema import NOT_BLANK
from booth.tools import estimates
from booth.tools.context import ToolContext
from booth.tools.registry import Param, ToolError, tool
from booth.tools.workspace import NAME_PATTERN


@tool
def sample(
    ctx: ToolContext,
    prompts: Annotated[list[str], Param("With the identifier, e.g. 'a photo of sks dog on "
                                        "the moon'",
                                        min_items=1, max_items=16, min_length=1,
                                        max_length=1000, pattern=NOT_BLANK)],
    run: Annotated[str | None, Param("Trained run (default: the base model)",
                                     pattern=NAME_PATTERN)] = None,
    checkpoint: Annotated[str | None, Param("'latest' or a step, e.g. '400' (default: "
                                            "final model)",
                                            pattern=CHECKPOINT_CHOICE)] = None,
    num_images_per_prompt: Annotated[int, Param("Images per prompt", minimum=1,
                                                maximum=16)] = 4,
    guidance_scale: Annotated[float, Param("Higher follows the prompt more",
                                           minimum=0, maximum=30)] = 7.5,
    num_inference_steps: Annotated[int, Param("Denoising steps", minimum=1,
                                              maximum=200)] = DEFAULT_STEPS,
    seed: Annotated[int, Param("Random seed", minimum=0,
                               maximum=2**32 - 1)] = 0,
    negative_prompt: Annotated[str | None, Param("What not to show",
                                                 max_length=1000)] = None,
    height: Annotated[int | None, Param("Pixels (default: the model's)", minimum=64, maximum=1024,
                                        multiple_of=8)] = None,
    width: Annotated[int | None, Param("Pixels (default: the model's)", minimum=64, maximum=1024,
                                       multiple_of=8)] = None,
) -> dict:
    """Render prompts with a trained run, one of its checkpoints, or the base model."""
    from booth.dreambooth.sampling import sample_images

    if checkpoint is not None and run is None:
        raise ToolError("checkpoint needs a run: pass run='<name>' as well")
    started = time.monotonic()
    pipeline, model = _pipeline(ctx, run, checkpoint)
    load_seconds = time.monotonic() - started
    folder = _output_folder(ctx, run)
    result = sample_images(
        pipeline, prompts, folder, num_images_per_prompt=num_images_per_prompt,
        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed,
        negative_prompt=negative_prompt or None, height=height, width=width,
        console=ctx.console, should_stop=ctx.stop_requested.is_set, grid_title=model)
    if result.images:
        estimates.record_generation(
            ctx.workspace.root, _setup(ctx, run, pipeline, height or width, guidance_scale),
            len(result.images),
            num_inference_steps, result.seconds + load_seconds, load_seconds)
    return _result(result, folder, model, seed, num_inference_steps, guidance_scale,
                   len(prompts) * num_images_per_prompt)


def _setup(ctx: ToolContext, run: str | None, pipeline, size: int | None, guidance: float):
    """Sampling costs what generating with the run's base model costs."""
    size = size or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return estimates.generate_setup(_base_model(ctx, run), size, guidance)


def _base_model(ctx: ToolContext, run: str | None) -> str:
    if run is None:
        return ctx.base_model
    from booth.dreambooth.config import load_config

    return load_config(ctx.workspace.existing_run(run) / "run.yaml").base_model


def _estimate(ctx: ToolContext, args: dict) -> str:
    from booth.dreambooth.priors import natural_resolution

    base = _base_model(ctx, args.get("run"))
    size = args.get("height") or args.get("width") or natural_resolution(base)
    images = len(args["prompts"]) * args["num_images_per_prompt"]
    setup = estimates.generate_setup(base, size, args["guidance_scale"])
    time_needed = estimates.generation_time(ctx.workspace.root, base, setup, images,
                                            args["num_inference_steps"])
    return (f"{images} images at {size} px, {args['num_inference_steps']} steps, "
            f"{time_needed.words(estimates.device_name())}")


def _pipeline(ctx: ToolContext, run: str | None, checkpoint: str | None):
    """The pipeline to sample from, and a description of it for the result."""
    if run is None:
        return ctx.load_pipeline(ctx.base_model), f"base model {ctx.base_model}"
    run_dir = ctx.workspace.existing_run(run)
    from booth.dreambooth import trainer
    from booth.dreambooth.checkpoints import resolve_checkpoint

    if checkpoint is None:
        return trainer.load_run_pipeline(run_dir), f"run {run} (final model)"
    # 'latest' and '400' are named as what they are: the user must know which step this is.
    step, folder = resolve_checkpoint(run_dir, checkpoint)
    pipeline = trainer.load_run_pipeline(run_dir, folder.name)
    return pipeline, f"run {run} ({folder.name}, step {step})"


def _output_folder(ctx: ToolContext, run: str | None):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{(run or 'base')[:40]}-{stamp}"
    folder, n = ctx.workspace.samples_dir(base), 1
    while folder.exists():  # two calls in the same second
        n += 1
        folder = ctx.workspace.samples_dir(f"{base}-{n}")
    return folder


def _result(result, folder, model: str, seed: int, steps: int, guidance: float,
            wanted: int) -> dict:
    out = {
        "folder": str(folder),
        "model": model,
        "images": [str(p) for p in result.images],
        "grid": str(result.grid) if result.grid else None,
        "status": result.status,
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "scheduler": result.settings.get("scheduler"),
        "seconds": result.seconds,
        "hint": ("grid.png has one row per prompt; each column starts from the same noise. "
                 "Same seed reproduces these images, another seed gives new ones. If the "
                 "subject looks the same whatever the prompt, the run is overfitted: sample an "
                 "earlier checkpoint."),
    }
    if result.status == "interrupted":
        out["hint"] = f"stopped after {len(result.images)} of {wanted} images. " + out["hint"]
    return out


sample.estimate = _estimate
sample.uses_gpu = True
