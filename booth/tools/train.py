"""The `train` and `resume_checkpoint` tools: adapt a prepared dataset to a TrainConfig, run it.

The engine (booth.dreambooth.trainer) knows nothing of workspaces or tools; this module turns
names into paths, checks everything before anything is written, and turns the engine's
errors into messages the model can act on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

from booth.dreambooth.checkpoints import CHOICE as CHECKPOINT_CHOICE
from booth.dreambooth.config import TrainConfig, load_config
from booth.dreambooth.evaluation import models_from
from booth.dreambooth.progress import expected_pace
from booth.schema import setting
from booth.tools import estimates
from booth.tools.context import ToolContext
from booth.tools.registry import Param, ToolError, tool
from booth.tools.workspace import NAME_PATTERN, check_name

# The settings the model is shown: the plan's and the memory ladder's, and checkpointing_steps
# for "go back to step 400". Every other setting (run_name, seed, LoRA rank, schedule, batch
# size, tracker, the dataset's prompts and resolution...) keeps its default unless the user
# sets it in an approval edit or `booth call`; hiding them keeps the fixed prefix of every
# request small (benchmarks/prompt_tokens.py). The knobs of the field's scripts (snr_gamma,
# noise_offset, center_crop, the schedules' cycles and power, Adam's settings) stay hidden
# too: chat users rarely name them, and the prompt has ~20 tokens to spare.
MODEL_SEES = (
    "dataset", "max_train_steps", "learning_rate", "prior_loss_weight", "train_text_encoder",
    "checkpointing_steps", "mixed_precision", "gradient_checkpointing", "use_8bit_adam",
    "use_lora",
)


@tool(settings=TrainConfig, model_sees=MODEL_SEES)
def train(
    ctx: ToolContext,
    dataset: Annotated[str, Param("A dataset from prepare_dataset",
                                  pattern=NAME_PATTERN)],
    max_train_steps: Annotated[int, setting(TrainConfig, "max_train_steps")],
    learning_rate: Annotated[float, setting(TrainConfig, "learning_rate")],
    run_name: Annotated[str | None, Param("Name of the new run (default: "
                                          "<dataset>-<date>-<time>)", pattern=NAME_PATTERN)] = None,
    base_model: Annotated[str | None, setting(TrainConfig, "base_model",
                                              default_note="the session's base model")] = None,
    resolution: Annotated[int | None, setting(TrainConfig, "resolution",
                                              default_note="the dataset's")] = None,
    class_prompt: Annotated[str | None, setting(TrainConfig, "class_prompt",
                                                default_note="the dataset's")] = None,
    instance_prompt: Annotated[str | None, setting(
        TrainConfig, "instance_prompt", "Prompt binding the photos to the identifier; must "
        "contain the dataset's identifier", default_note="the dataset's")] = None,
    **settings: Any,
) -> dict:
    """DreamBooth fine-tuning on a prepared dataset; needs generate_priors first unless
    prior_loss_weight is 0."""
    from booth.dreambooth import trainer

    manifest, dataset_dir = _manifest(ctx, dataset)
    name = check_name(run_name or _default_run_name(dataset), "run name")
    run_dir = ctx.workspace.run_dir(name)
    if run_dir.exists():
        raise ToolError(f"run {name!r} already exists; continue it with "
                        f"resume_checkpoint(run={name!r}) or choose another run_name")
    base = _check_base_model(base_model or ctx.base_model)
    given = {"resolution": resolution, "class_prompt": class_prompt,  # before the defaults
             "instance_prompt": instance_prompt}
    class_prompt = class_prompt or manifest.get("class_prompt")
    resolution = _resolution(dataset, manifest, resolution)
    class_dir = _class_images(ctx, settings["prior_loss_weight"], class_prompt, base,
                              resolution)
    config = TrainConfig(
        **settings, base_model=base, output_dir=str(run_dir),
        instance_images=[str(dataset_dir / image["file"]) for image in manifest["images"]],
        instance_prompt=_instance_prompt(dataset, manifest, instance_prompt),
        class_prompt=class_prompt, class_data_dir=str(class_dir) if class_dir else None,
        resolution=resolution, max_train_steps=max_train_steps, learning_rate=learning_rate,
    )
    # The call as it ran, the clock's run name and the session's base model pinned: `booth
    # call train @runs/<name>/args.yaml run_name=<new>` repeats it.
    arguments = {"dataset": dataset, "max_train_steps": max_train_steps,
                 "learning_rate": learning_rate, "run_name": name, "base_model": base,
                 **{k: v for k, v in given.items() if v is not None}, **settings}
    with expected_pace(training=_step_pace(ctx, config)), models_from(ctx.eval_models):
        result = trainer.train(config, console=ctx.console,
                               should_stop=ctx.stop_requested.is_set,
                               on_started=lambda folder: _save_args(folder, arguments))
    estimates.record_training(ctx.workspace.root, _setup(config), result)
    return _result(name, result)


ARGS_FILE = "args.yaml"


def _save_args(run_dir: Path, arguments: dict[str, Any]) -> None:
    """args.yaml: the train call's arguments, written atomically beside run.yaml."""
    import os

    import yaml

    tmp = run_dir / f".tmp-{ARGS_FILE}"
    tmp.write_text(yaml.safe_dump(arguments, sort_keys=False, allow_unicode=True),
                   encoding="utf-8")
    os.replace(tmp, run_dir / ARGS_FILE)


@tool
def resume_checkpoint(
    ctx: ToolContext,
    run: Annotated[str, Param("An existing run", pattern=NAME_PATTERN)],
    checkpoint: Annotated[str, Param("'latest' or a step, e.g. '400'",
                                     pattern=CHECKPOINT_CHOICE)] = "latest",
    max_train_steps: Annotated[int | None, setting(
        TrainConfig, "max_train_steps", "New total steps, to train further")] = None,
) -> dict:
    """Continue a run from a checkpoint as if it never stopped (later checkpoints are
    replaced); a larger max_train_steps extends it."""
    from booth.dreambooth import trainer

    run_dir = ctx.workspace.existing_run(run)
    config = load_config(run_dir / "run.yaml")
    with expected_pace(training=_step_pace(ctx, config)), models_from(ctx.eval_models):
        result = trainer.resume(run_dir, checkpoint, max_train_steps, console=ctx.console,
                                should_stop=ctx.stop_requested.is_set)
    estimates.record_training(ctx.workspace.root, _setup(config), result)
    return _result(run, result)


def _out_of_memory(ctx: ToolContext, run: str | None) -> str:
    """What to do after running out of GPU memory: the memory ladder (booth.tools.memory),
    and resuming only where a checkpoint was saved (a run that failed before its first one
    has been removed)."""
    from booth.dreambooth.checkpoints import list_checkpoints
    from booth.tools.memory import LADDER

    rungs = "; or ".join(words for words, _ in LADDER[1:])
    advice = f"To fit, start a new run with, in this order: {rungs}."
    if run and list_checkpoints(ctx.workspace.run_dir(run)):
        advice = (f"Its checkpoints are kept: resume_checkpoint run={run!r} continues from the "
                  f"last one with the same settings. {advice}")
    return advice


def _check_base_model(base_model: str) -> str:
    """The base model as runs record it (a local folder as an absolute path)."""
    from booth.dreambooth.loading import resolve_base_model

    return resolve_base_model(base_model)


def _instance_prompt(dataset: str, manifest: dict, asked: str | None) -> str:
    """The dataset's prompt, or one the user wrote, which must still name the identifier."""
    if asked is None:
        return manifest["instance_prompt"]
    from booth.tools.dataset import names_token

    token = manifest.get("instance_token")
    if token and not names_token(asked, token):
        raise ToolError(f"instance_prompt {asked!r} does not contain the identifier {token!r} "
                        f"of dataset {dataset!r}: without it the model cannot learn the subject")
    return asked


def _resolution(dataset: str, manifest: dict, asked: int | None) -> int:
    """The dataset's resolution unless a lower one is asked: its photos are already cropped
    to it, so training above it would only upscale them."""
    if not manifest.get("resolution"):  # an older manifest: its size is unknown
        return asked or 512
    prepared = int(manifest["resolution"])
    if asked and asked > prepared:
        raise ToolError(f"dataset {dataset!r} was prepared at {prepared} px; training at "
                        f"{asked} px would upscale its photos. Run prepare_dataset again with "
                        f"resolution={asked} (or train at {prepared} or less)")
    return asked or prepared


def _result(name: str, result) -> dict:
    checkpoints = [path.name for path in result.checkpoints]
    if result.status == "completed":
        hint = f"sample with run={name!r} (final model)"
        if len(checkpoints) > 1:  # the last one is the final model again
            hint += f", or checkpoint={checkpoints[-2]!r} to compare an earlier step"
    else:
        hint = (f"stopped at step {result.steps_done}; continue with "
                f"resume_checkpoint(run={name!r}), or sample checkpoint='latest'")
    return {
        "run": name,
        "status": result.status,
        "steps": result.steps_done,
        "final_loss": None if result.final_loss is None else round(result.final_loss, 5),
        "checkpoints": checkpoints,
        "final_model": str(result.final_model) if result.final_model else None,
        "metrics": str(result.run_dir / "metrics.jsonl"),
        **_pictures(result.run_dir),
        "seconds": round(result.seconds, 1),
        "hint": hint,
    }


def _pictures(run_dir: Path) -> dict:
    """Where to look: the newest validation grid and the loss plot, when the run has them."""
    from booth.dreambooth.validation import LOSS_PLOT, latest_grid

    grid, plot = latest_grid(run_dir), run_dir / LOSS_PLOT
    return ({"validation_grid": str(grid)} if grid else {}) | (
        {"loss_plot": str(plot)} if plot.is_file() else {})


def _manifest(ctx: ToolContext, dataset: str) -> tuple[dict, Path]:
    folder = ctx.workspace.dataset_dir(check_name(dataset, "dataset name"))
    path = folder / "manifest.json"
    if not path.is_file():
        known = ", ".join(ctx.workspace.names("datasets")) or "none yet"
        raise ToolError(f"no dataset {dataset!r} (prepared datasets: {known}); "
                        "run prepare_dataset first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not manifest["images"] or not manifest["instance_prompt"]:
            raise ValueError("it lists no images or no instance prompt")
    except (ValueError, KeyError, TypeError) as error:
        raise ToolError(f"dataset {dataset!r} has an unusable manifest.json ({error}); "
                        "prepare it again") from None
    return manifest, folder


def _class_images(ctx: ToolContext, weight: float, class_prompt: str | None, base: str,
                  resolution: int) -> Path | None:
    if weight == 0:
        return None
    if not class_prompt:
        raise ToolError("prior preservation needs a class_prompt (e.g. 'a photo of a dog'), "
                        "or set prior_loss_weight to 0")
    from booth.tools.priors import find_prior_set

    # A set made at the training resolution is best; any other is resized when loaded.
    folder = (find_prior_set(ctx, class_prompt, base, resolution=resolution)
              or find_prior_set(ctx, class_prompt, base))
    if folder is None:
        raise ToolError(f"no class images for {class_prompt!r} with this base model: run "
                        f"generate_priors(class_prompt={class_prompt!r}) first, or set "
                        "prior_loss_weight to 0 to train without prior preservation")
    return folder


def _default_run_name(dataset: str) -> str:
    from booth.dreambooth.setup import same_on_every_process

    # Launched processes may read the clock on either side of a second: the main one names.
    return same_on_every_process(f"{dataset[:47]}-{time.strftime('%Y%m%d-%H%M%S')}")


# --- estimates shown when the user approves a call -------------------------------------------


def _setup(config: TrainConfig):
    examples = config.train_batch_size * config.gradient_accumulation_steps
    examples *= 2 if config.with_prior_preservation else 1
    return estimates.train_setup(config.base_model, config.resolution, examples,
                                 config.mixed_precision, config.train_text_encoder,
                                 config.use_lora)


def _step_pace(ctx: ToolContext, config: TrainConfig) -> float | None:
    """Seconds a step of this setup took here, for the progress bar's first time left."""
    steps = 100
    when = estimates.training_time(ctx.workspace.root, config.base_model, _setup(config),
                                   steps, fixed=False)
    return estimates.measured_pace(when, steps)


def _planned_config(ctx: ToolContext, args: dict[str, Any]) -> TrainConfig:
    """The config a train call would run with, as far as the plan needs it."""
    try:
        manifest = json.loads((ctx.workspace.dataset_dir(args["dataset"]) / "manifest.json")
                              .read_text(encoding="utf-8"))
    except (OSError, ValueError, ToolError):
        manifest = {}
    settings = {k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{**settings, "base_model": args.get("base_model") or ctx.base_model,
                          "resolution": args.get("resolution")
                          or int(manifest.get("resolution") or 512)})


def _memory_plan(ctx: ToolContext, config: TrainConfig):
    """Will it fit on the card? None without a GPU (see booth.tools.memory)."""
    free = ctx.free_gpu_memory()
    if free is None:
        return None
    from booth.tools import memory
    from booth.tools.calibration import measured_peak

    knobs = memory.Knobs(
        resolution=config.resolution,
        examples=config.train_batch_size * (2 if config.with_prior_preservation else 1),
        mixed_precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
        use_8bit_adam=config.use_8bit_adam, train_text_encoder=config.train_text_encoder,
        use_lora=config.use_lora, lora_rank=config.lora_rank,
        priors=config.with_prior_preservation)
    return memory.plan(memory.parameter_counts(config.base_model), knobs, free,
                       measured_peak(ctx.workspace.root, _setup(config)),
                       ctx.server_gives_back() or 0.0)


def _estimate_train(ctx: ToolContext, args: dict[str, Any]) -> str:
    config = _planned_config(ctx, args)
    time_needed = estimates.training_time(ctx.workspace.root, config.base_model,
                                          _setup(config), config.max_train_steps)
    what = "with prior preservation" if config.with_prior_preservation else \
        "no prior preservation"
    lora = ", LoRA" if config.use_lora else ""
    return (f"{config.max_train_steps} steps at {config.resolution} px ({what}{lora}), "
            f"{time_needed.words(estimates.device_name())}")


def _estimate_resume(ctx: ToolContext, args: dict[str, Any]) -> str | None:
    from booth.dreambooth.checkpoints import list_checkpoints, resolve_checkpoint

    run_dir = ctx.workspace.existing_run(args["run"])
    config = load_config(run_dir / "run.yaml")
    if list_checkpoints(run_dir) or args.get("checkpoint", "latest") != "latest":
        step, folder = resolve_checkpoint(run_dir, args.get("checkpoint", "latest"))
        start = folder.name
    else:
        step, start = 0, "step 0 (no checkpoint was saved)"
    total = args.get("max_train_steps") or config.max_train_steps
    left = max(total - step, 0)
    time_needed = estimates.training_time(ctx.workspace.root, config.base_model, _setup(config),
                                          left)
    cost = (f"from {start} to step {total}: {left} steps, "
            f"{time_needed.words(estimates.device_name())}")
    return cost + _discarded(run_dir, step)


def _discarded(run_dir: Path, step: int) -> str:
    """What resuming from `step` replaces: the user should know before approving."""
    from booth.dreambooth.checkpoints import list_checkpoints
    from booth.dreambooth.models import FINAL_DIR, LORA_DIR

    later = [path.name for n, path in list_checkpoints(run_dir) if n > step]
    lost = []
    if later:
        lost.append(f"{len(later)} later checkpoint(s) ({later[0]}..{later[-1]})"
                    if len(later) > 1 else later[0])
    if (run_dir / FINAL_DIR).is_dir() or (run_dir / LORA_DIR).is_dir():
        lost.append("the final model")
    return f"; replaces {' and '.join(lost)}" if lost else ""


train.estimate = _estimate_train
resume_checkpoint.estimate = _estimate_resume
train.memory_plan = lambda ctx, args: _memory_plan(ctx, _planned_config(ctx, args))
resume_checkpoint.memory_plan = lambda ctx, args: _memory_plan(
    ctx, load_config(ctx.workspace.existing_run(args["run"]) / "run.yaml"))
train.out_of_memory = lambda ctx, args: _out_of_memory(ctx, args.get("run_name"))
resume_checkpoint.out_of_memory = lambda ctx, args: _out_of_memory(ctx, args["run"])
train.uses_gpu = True
resume_checkpoint.uses_gpu = True
