"""The `generate_priors` tool (class images for prior preservation) and `find_prior_set`,
which the train tool uses to pick up the images made here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from booth.dreambooth.priors import DEFAULT_GUIDANCE, DEFAULT_STEPS
from booth.dreambooth.progress import expected_pace
from booth.schema import NOT_BLANK, PATH
from booth.tools import estimates
from booth.tools.context import ToolContext, absolute_if_local
from booth.tools.registry import Param, tool

_SAMPLE_PATHS = 4


# The model is shown what a plan changes; the sampler's knobs (and the base model, hidden
# from train too) keep their defaults unless the user edits a call or uses `booth call`.
@tool(model_sees=("class_prompt", "num_images", "resolution", "negative_prompt"))
def generate_priors(
    ctx: ToolContext,
    class_prompt: Annotated[str, Param("The dataset's, e.g. 'a photo of a dog'",
                                       min_length=1, max_length=1000, pattern=NOT_BLANK)],
    num_images: Annotated[int, Param("Images in the set", minimum=1, maximum=2000)] = 200,
    seed: Annotated[int, Param("Seed: the same seed gives the same images",
                               minimum=0, maximum=2**32 - 1)] = 0,
    resolution: Annotated[int | None, Param("Pixels (default: the model's)",
                                            minimum=64, maximum=1024,
                                            multiple_of=8)] = None,
    batch_size: Annotated[int, Param("Images per forward pass; does not change the images",
                                     minimum=1, maximum=64)] = 4,
    num_inference_steps: Annotated[int, Param("Denoising steps", minimum=1,
                                              maximum=200)] = DEFAULT_STEPS,
    guidance_scale: Annotated[float, Param("Classifier-free guidance scale", minimum=0,
                                           maximum=30)] = DEFAULT_GUIDANCE,
    negative_prompt: Annotated[str | None, Param("What not to show",
                                                 max_length=1000)] = None,
    base_model: Annotated[str | None, Param("Model that draws them (default: the session's "
                                            "base model)", min_length=1, max_length=1000,
                                            pattern=PATH)] = None,
    precision: Annotated[Literal["fp32", "fp16", "bf16"] | None, Param(
        "Precision of the model drawing them (diffusers' prior_generation_precision; "
        "default: fp16 on CUDA, else fp32)")] = None,
) -> dict:
    """Generate class images for prior preservation; existing ones are reused."""
    from booth.dreambooth.priors import generate_class_images

    key = _key(ctx, class_prompt, seed, resolution, num_inference_steps, guidance_scale,
               negative_prompt, base_model, precision)
    folder = ctx.workspace.priors_dir(key.folder_name())
    # A chosen precision is passed only when given: the default call stays load_pipeline(base).
    load = (lambda: ctx.load_pipeline(key.source, precision)) if precision else (
        lambda: ctx.load_pipeline(key.source))
    pace = estimates.image_pace(ctx.workspace.root, key.source, _setup(key),
                                key.num_inference_steps)
    with expected_pace(images=pace):
        result = generate_class_images(
            key, folder, num_images, load, batch_size=batch_size,
            console=ctx.console, should_stop=ctx.stop_requested.is_set)
    if result.generated:
        estimates.record_generation(ctx.workspace.root, _setup(key), len(result.generated),
                                    key.num_inference_steps, result.seconds, result.load_seconds)
    return _result(key, result, num_images)


def find_prior_set(ctx: ToolContext, class_prompt: str, base_model: str | None = None, *,
                   resolution: int | None = None) -> Path | None:
    """The prior folder holding the most class images for this prompt and base model
    (default: ctx.base_model), optionally at one resolution; None when there is none."""
    from booth.dreambooth.priors import find_prior_sets

    sets = find_prior_sets(ctx.workspace.root / "priors", class_prompt,
                           base_model or ctx.base_model, resolution)
    return sets[0][0] if sets else None


def _key(ctx, prompt, seed, resolution, steps, guidance, negative, base_model,
         precision=None):
    from booth.dreambooth import priors
    from booth.dreambooth.loading import resolve_base_model

    base = absolute_if_local(base_model) if base_model else ctx.base_model
    resolve_base_model(base)  # before anything reads the folder
    resolution = resolution or priors.natural_resolution(base)
    return priors.PriorKey.create(
        base, prompt, negative_prompt=negative or None, seed=seed, resolution=resolution,
        num_inference_steps=steps, guidance_scale=float(guidance), precision=precision)


def _result(key, result, requested: int) -> dict:
    out = {
        "folder": str(result.folder),
        "class_prompt": key.prompt,
        "status": result.status,
        "generated": len(result.generated),
        "reused": result.reused,
        "total": len(result.images),
        "requested": requested,
        "paths_sample": [str(p) for p in result.images[:_SAMPLE_PATHS]],
        "seconds": result.seconds,
        "settings": {"base_model": key.source, "resolution": key.resolution,
                     "num_inference_steps": key.num_inference_steps,
                     "guidance_scale": key.guidance_scale, "scheduler": key.scheduler,
                     "seed": key.seed, "negative_prompt": key.negative_prompt},
    }
    if result.status == "interrupted":
        out["hint"] = (f"stopped after {len(result.images)} of {requested} images; call "
                       "generate_priors again with the same arguments to make only the rest")
    return out


def _describe_cost(ctx, args: dict) -> str:
    from booth.dreambooth.priors import existing_images

    key = _key(ctx, args["class_prompt"], args["seed"], args.get("resolution"),
               args["num_inference_steps"], args["guidance_scale"], args.get("negative_prompt"),
               args.get("base_model"), args.get("precision"))
    wanted = args["num_images"]
    present = [n for n in existing_images(ctx.workspace.priors_dir(key.folder_name()))
               if n <= wanted]
    missing = wanted - len(present)
    if missing == 0:
        return f"{wanted} images at {key.resolution} px: all already made, nothing to generate"
    time_needed = estimates.generation_time(ctx.workspace.root, key.source, _setup(key),
                                            missing, key.num_inference_steps)
    reused = f" ({len(present)} reused)" if present else ""
    return (f"{wanted} images at {key.resolution} px, {key.num_inference_steps} steps: "
            f"{missing} to generate{reused}, {time_needed.words(estimates.device_name())}")


def _setup(key):
    return estimates.generate_setup(key.source, key.resolution, key.guidance_scale)


generate_priors.estimate = _describe_cost
generate_priors.uses_gpu = True
