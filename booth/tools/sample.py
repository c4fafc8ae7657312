"""The `sample` tool: render prompts with the base model or a trained run, save PNGs + a grid,
score them (booth.tools.scores), or compare checkpoints (booth.tools.compare)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from booth.dreambooth.checkpoints import CHOICE as CHECKPOINT_CHOICE
from booth.dreambooth.sampling import DEFAULT_STEPS
from booth.schema import NOT_BLANK, pattern
from booth.tools import estimates
from booth.tools.context import ToolContext
from booth.tools.registry import Param, ToolArgumentError, ToolError, tool
from booth.tools.workspace import NAME_PATTERN

COMPARE_CHOICE = pattern(r"^(all|final|latest|(checkpoint-)?[0-9]{1,9})$",
                         "'all', 'final', 'latest', 'checkpoint-<step>' or '<step>'")


# Every parameter but `score` (on by default; off at approval or with `booth call`): each
# one shown costs tokens on every request.
_SHOWN = ("prompts", "run", "checkpoint", "checkpoints", "num_images_per_prompt",
          "guidance_scale", "num_inference_steps", "seed", "negative_prompt", "height", "width")


@dataclass(frozen=True)
class Render:
    """How images are rendered: the same for every checkpoint a comparison renders."""

    num_images_per_prompt: int
    guidance_scale: float
    num_inference_steps: int
    seed: int
    negative_prompt: str | None
    height: int | None
    width: int | None


@tool(model_sees=_SHOWN)
def sample(
    ctx: ToolContext,
    # The system prompt gives an example ("a photo of sks dog on the moon"): not repeated here.
    prompts: Annotated[list[str], Param("With the identifier", min_items=1, max_items=16,
                                        min_length=1, max_length=1000, pattern=NOT_BLANK)],
    run: Annotated[str | None, Param("Trained run (default: the base model)",
                                     pattern=NAME_PATTERN)] = None,
    checkpoint: Annotated[str | None, Param("'latest' or a step (default: final model)",
                                            pattern=CHECKPOINT_CHOICE)] = None,
    # No item bounds in the schema (each costs tokens on every request): compare.py checks.
    checkpoints: Annotated[list[str] | None, Param("To compare, or ['all']",
                                                   pattern=COMPARE_CHOICE)] = None,
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
    height: Annotated[int | None, Param("Pixels", minimum=64, maximum=1024,
                                        multiple_of=8)] = None,
    width: Annotated[int | None, Param("Pixels", minimum=64, maximum=1024,
                                       multiple_of=8)] = None,
    score: Annotated[bool, Param("Score the images (DINO, CLIP-I, CLIP-T)")] = True,
) -> dict:
    """Render and score prompts with a run, a checkpoint, or the base model."""
    if checkpoint is not None and run is None:
        raise ToolError("checkpoint needs a run: pass run='<name>' as well")
    render = Render(num_images_per_prompt, guidance_scale, num_inference_steps, seed,
                    negative_prompt or None, height, width)
    if checkpoints is not None:
        if checkpoint is not None:
            raise ToolArgumentError("give checkpoint (one) or checkpoints (to compare), not both")
        if run is None:
            raise ToolError("checkpoints needs a run: pass run='<name>' as well")
        from booth.tools.compare import compare_checkpoints

        return compare_checkpoints(ctx, run, checkpoints, prompts, render, score)
    started = time.monotonic()
    pipeline, model = _pipeline(ctx, run, checkpoint)
    load_seconds = time.monotonic() - started
    folder = output_folder(ctx, run)
    result = render_prompts(ctx, run, pipeline, prompts, folder, render, model, load_seconds)
    out = _result(result, folder, model, render, len(prompts) * num_images_per_prompt)
    if score:
        out["scores"] = _scores(ctx, run, prompts, result, folder)
    return out


def render_prompts(ctx: ToolContext, run: str | None, pipeline, prompts: list[str], folder,
                   render: Render, title: str, load_seconds: float = 0.0):
    """Render `prompts` into `folder` (PNGs, grid.png, samples.json) and record how long it
    took, for the next estimate."""
    from booth.dreambooth.sampling import sample_images

    result = sample_images(
        pipeline, prompts, folder, num_images_per_prompt=render.num_images_per_prompt,
        guidance_scale=render.guidance_scale, num_inference_steps=render.num_inference_steps,
        seed=render.seed, negative_prompt=render.negative_prompt, height=render.height,
        width=render.width, console=ctx.console, should_stop=ctx.stop_requested.is_set,
        grid_title=title)
    if result.images:
        size = render.height or render.width
        estimates.record_generation(
            ctx.workspace.root, _setup(ctx, run, pipeline, size, render.guidance_scale),
            len(result.images), render.num_inference_steps, result.seconds + load_seconds,
            load_seconds)
    return result


def _scores(ctx: ToolContext, run: str | None, prompts: list[str], result, folder) -> dict:
    """The paper's scores of what was rendered, shown and saved as scores.json; or why not."""
    from booth.tools.scores import print_prompt_table, scorer, write_scores

    scoring = scorer(ctx, run, run_base_model(ctx, run))
    if isinstance(scoring, str):
        scores = {"skipped": scoring}
    elif not result.images:
        scores = {"skipped": "not scored: no image was rendered"}
    else:
        scores = scoring.score(result.by_prompt(prompts))
    if "skipped" in scores:
        ctx.console.print(scores["skipped"], style="dim", markup=False, highlight=False)
        return scores
    write_scores(folder, scores)
    print_prompt_table(ctx.console, scores)
    return scores


def _setup(ctx: ToolContext, run: str | None, pipeline, size: int | None, guidance: float):
    """Sampling costs what generating with the run's base model costs."""
    size = size or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return estimates.generate_setup(run_base_model(ctx, run), size, guidance)


def run_base_model(ctx: ToolContext, run: str | None) -> str:
    if run is None:
        return ctx.base_model
    from booth.dreambooth.config import load_config

    return load_config(ctx.workspace.existing_run(run) / "run.yaml").base_model


def _estimate(ctx: ToolContext, args: dict) -> str:
    from booth.dreambooth.priors import natural_resolution

    base = run_base_model(ctx, args.get("run"))
    size = args.get("height") or args.get("width") or natural_resolution(base)
    images = len(args["prompts"]) * args["num_images_per_prompt"] * _models(ctx, args)
    setup = estimates.generate_setup(base, size, args["guidance_scale"])
    time_needed = estimates.generation_time(ctx.workspace.root, base, setup, images,
                                            args["num_inference_steps"])
    return (f"{images} images at {size} px, {args['num_inference_steps']} steps, "
            f"{time_needed.words(estimates.device_name())}")


def _models(ctx: ToolContext, args: dict) -> int:
    """How many models the call renders with: the checkpoints compared, or one."""
    if not args.get("checkpoints") or not args.get("run"):
        return 1
    from booth.tools.compare import resolve_candidates

    try:
        return len(resolve_candidates(ctx, args["run"], args["checkpoints"])[0])
    except ToolError:
        return 1  # the call itself will say what is wrong


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


def output_folder(ctx: ToolContext, run: str | None, suffix: str = ""):
    """A new folder under samples/ named after the run and the time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{(run or 'base')[:40]}{suffix}-{stamp}"
    folder, n = ctx.workspace.samples_dir(base), 1
    while folder.exists():  # two calls in the same second
        n += 1
        folder = ctx.workspace.samples_dir(f"{base}-{n}")
    return folder


def _result(result, folder, model: str, render: Render, wanted: int) -> dict:
    out = {
        "folder": str(folder),
        "model": model,
        "images": [str(p) for p in result.images],
        "grid": str(result.grid) if result.grid else None,
        "status": result.status,
        **settings_of(result, render),
        "hint": ("grid.png has one row per prompt; each column starts from the same noise. "
                 "Same seed reproduces these images, another seed gives new ones. If the "
                 "subject looks the same whatever the prompt, the run is overfitted: compare "
                 "its checkpoints with checkpoints=['all']."),
    }
    if result.status == "interrupted":
        out["hint"] = f"stopped after {len(result.images)} of {wanted} images. " + out["hint"]
    return out


def settings_of(result, render: Render) -> dict:
    """The settings a result reports, so the same call can be made again."""
    return {"seed": render.seed, "num_inference_steps": render.num_inference_steps,
            "guidance_scale": render.guidance_scale,
            "scheduler": result.settings.get("scheduler") if result else None,
            "seconds": result.seconds if result else 0.0}


sample.estimate = _estimate
sample.uses_gpu = True
