"""Watching a run learn: the validation prompts rendered with the model being trained.

    <run>/validation/step-<N>/    01-01-<prompt>.png ..., grid.png (prompts at the left, the
                                  step on top), samples.json: written by sampling.sample_images
    <run>/loss.png                the loss curve (booth.dreambooth.plots)

Rendered every validation_steps (by default at each checkpoint) and at the end, on the main
process only, and logged as images to
the run's trackers (TensorBoard, W&B). Validation must never change training: its noise comes
from its own CPU generators (`sampling.image_seed`, the same for every step, so two steps'
images differ only by what training changed), its sampler is a deterministic one, the global
RNG is saved and restored around it, and the models go back to training mode. A step folder
is written under `.tmp-step-<N>` and renamed when complete, so a kill never leaves a half one.
"""

from __future__ import annotations

import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from booth.dreambooth.checkpoints import TMP_PREFIX, remove_dir, replace_dir
from booth.dreambooth.config import TrainConfig
from booth.dreambooth.plots import write_loss_plot
from booth.dreambooth.setup import same_on_every_process

VALIDATION_DIR = "validation"
LOSS_PLOT = "loss.png"
# Deterministic (no noise drawn while stepping) and good at 10-20 steps.
SCHEDULER = "DPMSolverMultistepScheduler"
_STEP_RE = re.compile(r"step-(\d{1,9})")
_PHOTO_OF = re.compile(r"^(an? )?(photo|picture|image|portrait) of ", re.IGNORECASE)


def validation_prompts(config: TrainConfig) -> list[str]:
    """The prompts given, or the instance prompt and its subject on the beach."""
    if config.validation_prompts:
        return list(config.validation_prompts)
    subject = _PHOTO_OF.sub("", config.instance_prompt.strip()).rstrip(".,; ")
    return [config.instance_prompt, f"{subject} on the beach"]


def validation_due(config: TrainConfig, step: int) -> bool:
    """Whether step `step` is rendered: every validation_steps (by default at every
    checkpoint) and at the end; never with validation_steps 0."""
    if config.validation_steps == 0:
        return False
    every = config.validation_steps or config.checkpointing_steps
    return step >= config.max_train_steps or step % every == 0


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / VALIDATION_DIR / f"step-{step}"


def validated_steps(run_dir: Path) -> list[int]:
    """The steps with a complete validation folder, oldest first."""
    folder = Path(run_dir) / VALIDATION_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir()
                  if (m := _STEP_RE.fullmatch(p.name)) and (p / "grid.png").is_file())


def latest_grid(run_dir: Path) -> Path | None:
    steps = validated_steps(run_dir)
    return step_dir(run_dir, steps[-1]) / "grid.png" if steps else None


def discard_validation_after(run_dir: Path, step: int) -> None:
    """Resuming from `step` renders the later steps anew: their folders go, and whatever a
    killed validation left half-written."""
    folder = Path(run_dir) / VALIDATION_DIR
    if not folder.is_dir():
        return
    for path in folder.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    for later in (s for s in validated_steps(run_dir) if s > step):
        remove_dir(step_dir(run_dir, later))


def watch(t, config: TrainConfig, run_dir: Path, step: int, console=None) -> None:
    """What a person looks at after checkpoint `step` (and at the end): the validation
    images when they are due and not yet there, and loss.png."""
    # Every process must agree, or some would wait at validate's barrier for ever: the main
    # process looks (before anyone writes) and says.
    if validation_due(config, step) and same_on_every_process(
            step not in validated_steps(run_dir)):
        validate(t, config, run_dir, step, console)
    if t.accelerator.is_main_process and config.loss_plot:
        _plot_if_stale(run_dir)


def _plot_if_stale(run_dir: Path) -> None:
    """loss.png, unless it is newer than metrics.jsonl (the end of a run comes right after
    its last checkpoint: one plot, not two)."""
    metrics, plot = run_dir / "metrics.jsonl", run_dir / LOSS_PLOT
    try:
        if plot.stat().st_mtime_ns >= metrics.stat().st_mtime_ns:
            return
    except OSError:  # no plot yet (or no metrics: write_loss_plot sees to that)
        pass
    write_loss_plot(metrics, plot)


def validate(t, config: TrainConfig, run_dir: Path, step: int, console=None) -> Path | None:
    """Render the validation prompts with the live models of `t` (a setup.Training) into
    validation/step-<step>/ and log them to the trackers; return the grid (main process).
    The other processes wait meanwhile."""
    import torch

    accelerator = t.accelerator
    grid = None
    if accelerator.is_main_process:
        prompts = validation_prompts(config)
        try:
            with preserved_rng(), evaluating(t.models):
                result = _render(t, config, run_dir, step, prompts)
        except torch.OutOfMemoryError:
            # The pictures are worth less than the run: a card that only just fits the
            # training goes on training without them.
            torch.cuda.empty_cache()
            _say(console, f"[yellow]validation at step {step} skipped: out of GPU memory "
                          "(validation_steps=0 turns it off)[/]")
        else:
            grid = result.grid
            _log_images(accelerator, prompts, result.images, config.num_validation_images,
                        step)
            with preserved_rng():
                _score(accelerator, config, prompts, result.images, step)
            _say(console, f"validation images: {grid}")
    accelerator.wait_for_everyone()
    return grid


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def _render(t, config: TrainConfig, run_dir: Path, step: int, prompts: list[str]):
    from booth.dreambooth.sampling import sample_images

    final = step_dir(run_dir, step)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipeline = _pipeline(t, config)
        with t.accelerator.autocast():
            result = sample_images(
                pipeline, prompts, tmp, num_images_per_prompt=config.num_validation_images,
                num_inference_steps=config.validation_inference_steps, seed=config.seed,
                height=config.resolution, width=config.resolution,
                batch_size=config.num_validation_images, grid_title=f"step {step}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if t.validation_parts is not None:
            t.validation_parts.to("cpu")  # the GPU memory is training's again
    replace_dir(tmp, final)
    result.images = [final / p.name for p in result.images]
    result.grid = final / "grid.png"
    return result


def _pipeline(t, config: TrainConfig):
    """A StableDiffusionPipeline around the live UNet (and text encoder, if trained); the
    frozen parts come from the base model."""
    import diffusers

    frozen = _frozen_parts(t, config).to(t.accelerator.device)
    unwrap = t.accelerator.unwrap_model
    text_encoder = unwrap(t.models[1]) if len(t.models) > 1 else frozen.text_encoder
    pipeline = diffusers.StableDiffusionPipeline(
        vae=frozen.vae, text_encoder=text_encoder, tokenizer=frozen.tokenizer,
        unet=unwrap(t.models[0]),
        scheduler=getattr(diffusers, SCHEDULER).from_config(t.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class _Frozen:
    def __init__(self, vae, text_encoder, tokenizer):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer

    def to(self, device) -> _Frozen:
        self.vae.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self


def _frozen_parts(t, config: TrainConfig) -> _Frozen:
    """The base model's VAE, tokenizer and (when it is not trained) text encoder, loaded once
    per Training: training let its own copies go after caching the latents."""
    if t.validation_parts is None:
        t.validation_parts = _load_frozen(config, t.accelerator.mixed_precision,
                                          with_text_encoder=len(t.models) == 1)
    return t.validation_parts


def _load_frozen(config: TrainConfig, mixed_precision: str, with_text_encoder: bool) -> _Frozen:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from booth.dreambooth.loading import load_failure, quiet_progress, resolve_base_model
    from booth.dreambooth.setup import weight_dtype

    source = resolve_base_model(config.base_model)
    dtype = weight_dtype(mixed_precision)  # as training holds its frozen weights
    try:
        with quiet_progress(source):
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            text_encoder = (CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                          dtype=dtype)
                            if with_text_encoder else None)
    except (OSError, ValueError) as error:
        raise load_failure(config.base_model, error, "the VAE and text encoder") from None
    for model in (vae, text_encoder):
        if model is not None:
            model.requires_grad_(False).eval()
    return _Frozen(vae, text_encoder, tokenizer)


@contextmanager
def preserved_rng():
    """Whatever runs inside leaves the global RNGs (torch CPU and CUDA, numpy, random) as it
    found them: some samplers draw from them, and training must not see the difference."""
    import numpy as np
    import torch

    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def evaluating(models):
    """The models in eval mode inside, back in the mode each had after."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def _score(accelerator, config: TrainConfig, prompts: list[str], images: list[Path],
           step: int) -> None:
    """The paper's scores of the validation images (booth.dreambooth.evaluation), beside them
    as scores.json and in the trackers as validation/dino, clip_i, clip_t, when evaluator
    models are at hand (BOOTH_EVAL_MODELS, evaluators/ in the base model, the hub cache)."""
    from booth.dreambooth.evaluation import (
        SCORES_FILE,
        EvaluatorsUnavailable,
        load_evaluators,
        score_subject,
        subject_of,
    )
    from booth.dreambooth.sampling import write_json

    try:
        evaluators = load_evaluators(None, config.base_model)
    except EvaluatorsUnavailable:
        return  # a run is watched without scores; sample says why when asked for them
    per = config.num_validation_images
    scores = score_subject(evaluators, {p: images[i * per:(i + 1) * per]
                                        for i, p in enumerate(prompts)}, subject_of(config))
    write_json(images[0].parent / SCORES_FILE, scores)
    figures = {f"validation/{k}": v for k, v in scores.items() if k in ("dino", "clip_i", "clip_t")}
    if figures and accelerator.trackers:
        accelerator.log(figures, step=step)


def _log_images(accelerator, prompts: list[str], images: list[Path], per_prompt: int,
                step: int) -> None:
    """Each prompt's images under its own tag, to every tracker that shows images."""
    import numpy as np
    from PIL import Image

    if not accelerator.trackers:
        return
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in images]
    rows = {f"validation/{i + 1} {prompt}": arrays[i * per_prompt:(i + 1) * per_prompt]
            for i, prompt in enumerate(prompts)}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.stack(row) for tag, row in rows.items()}, step,
                               dataformats="NHWC")
            tracker.writer.flush()  # visible now, not at the next periodic flush
        elif tracker.name == "wandb":  # accelerate wraps each array in a wandb.Image
            tracker.log_images(rows, step)
