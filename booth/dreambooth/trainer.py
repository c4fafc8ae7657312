"""DreamBooth fine-tuning of Stable Diffusion 1.x with class-prior preservation, on accelerate.

Read `_run` top to bottom: load the parts, freeze what is not trained, encode every image
through the frozen VAE once, then the loop: sample noise and timesteps, predict the noise
(or v), loss = instance MSE + prior_loss_weight * class MSE, step, log, checkpoint.

A run stopped at any checkpoint and resumed produces the same losses, bit for bit, as one that
never stopped: the data order comes from accelerate's seedable sampler (set back to the saved
epoch and position), all noise from one generator saved in the checkpoint, and the step count
from a file we write ourselves (see checkpoints.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from booth.dreambooth.checkpoints import (
    last_loss,
    list_checkpoints,
    prune_checkpoints,
    read_training_state,
    remove_if_untrained,
    resolve_checkpoint,
    save_checkpoint,
    sweep_temporary,
)
from booth.dreambooth.config import TrainConfig, load_config
from booth.dreambooth.errors import CheckpointError, ConfigError, TrainingError
from booth.dreambooth.models import (
    FINAL_DIR,
    LORA_DIR,
    discard_outputs_after,
    export_lora,
    export_pipeline,
    final_model_path,
    load_run_pipeline,
)
from booth.dreambooth.progress import training_progress
from booth.dreambooth.setup import (
    Training,
    is_main_process,
    peak_memory,
    prepare,
    process_console,
    reset_peak_memory,
    resolve_for_device,
    stop_everywhere,
    tracker_config,
    wait_for_everyone,
)
from booth.dreambooth.step_log import StepLog, read_every
from booth.dreambooth.train_data import (
    input_changes,
    input_fingerprint,
    save_fingerprint,
    thread_change,
)
from booth.dreambooth.validation import validation_due, watch

__all__ = ["CheckpointError", "ConfigError", "TrainConfig", "TrainResult", "TrainingError",
           "list_checkpoints", "load_run_pipeline", "resume", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "interrupted"
    steps_done: int
    final_loss: float | None
    checkpoints: list[Path] = field(default_factory=list)
    final_model: Path | None = None
    seconds: float = 0.0
    # What the time went on, for estimates: the steps this call ran, and the seconds of the
    # loop that ran them (the rest is loading, caching and export).
    steps_run: int = 0
    loop_seconds: float = 0.0
    peak_memory: float | None = None  # bytes the GPU held at most (None without CUDA)


def train(config: TrainConfig, *, console=None, should_stop: Callable[[], bool] = lambda: False,
          on_started: Callable[[Path], None] = lambda run_dir: None) -> TrainResult:
    """Start a new run in `config.output_dir`, which must not hold one yet.

    Launched as several processes, each calls this; all check before the main one writes.
    `on_started(run_dir)` is called on the main process once the folder holds run.yaml (the
    caller's own files go in then: the folder must be empty before).
    """
    config.check()
    console = process_console(console)
    run_dir = Path(config.output_dir).resolve()
    if (run_dir / "run.yaml").exists():
        raise TrainingError(f"{run_dir} already holds a run; resume it instead of starting over")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"{run_dir} is not empty; give a new folder for the run")
    config = resolve_for_device(config, run_dir, console)
    wait_for_everyone()  # no process may find the folder the main one is about to create
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save_yaml(run_dir / "run.yaml")
        save_fingerprint(run_dir, input_fingerprint(config))
        on_started(run_dir)
    wait_for_everyone()
    try:
        return _run(config, run_dir, None, console, should_stop)
    except BaseException:
        if is_main_process():
            remove_if_untrained(run_dir)
        raise


def resume(run_dir: str | Path, checkpoint: str = "latest", max_train_steps: int | None = None,
           *, console=None, should_stop: Callable[[], bool] = lambda: False) -> TrainResult:
    """Continue a run from one of its checkpoints, to its max_train_steps or a new total.

    The LR schedule is rebuilt for the (possibly new) total before the checkpoint is loaded:
    a constant schedule continues exactly; a decaying one is stretched to the new total.
    What the run wrote after that checkpoint (later checkpoints, metric lines, the final
    model) is discarded once the model and checkpoint are loaded, since training from it
    writes them anew. A run killed while exporting its final model only exports it; one
    killed before its first checkpoint starts again from step 0 with its own config (the
    same losses: everything random follows the seed). Refused if the training images changed
    since the run started (see train_data.input_changes).
    """
    console = process_console(console)
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "run.yaml").is_file():
        raise TrainingError(f"{run_dir} is not a run folder (no run.yaml)")
    config = load_config(run_dir / "run.yaml", output_dir=str(run_dir))
    if is_main_process():  # checkpoint-* folders are all another process reads
        sweep_temporary(run_dir)
    if not list_checkpoints(run_dir):  # killed before its first checkpoint
        if str(checkpoint) != "latest":
            raise CheckpointError(f"run {run_dir.name!r} has no complete checkpoint yet; "
                                  "resume it from 'latest' to start it again from step 0")
        step, folder = 0, None
    else:
        step, folder = resolve_checkpoint(run_dir, checkpoint)
    # Killed while writing the final model: the last checkpoint is the end; export it only.
    export_only = (folder is not None and max_train_steps is None
                   and step >= config.max_train_steps
                   and step == list_checkpoints(run_dir)[-1][0]
                   and final_model_path(run_dir) is None)
    if max_train_steps is not None:
        if max_train_steps <= step:
            raise TrainingError(
                f"{folder.name} is already at step {step}; max_train_steps must be larger"
            )
        config.max_train_steps = max_train_steps
    elif step >= config.max_train_steps and not export_only:
        raise TrainingError(
            f"{folder.name} is the end of this run ({config.max_train_steps} steps); "
            "pass a larger max_train_steps to train further"
        )
    config = resolve_for_device(config.check(), run_dir, console)
    fingerprint = None if export_only else input_fingerprint(config)
    changed = fingerprint and input_changes(run_dir, fingerprint)
    if changed:
        raise TrainingError(changed)
    threads = fingerprint and thread_change(run_dir, fingerprint)
    if threads:
        console.print(f"[yellow]{threads}[/]")

    def discard_later() -> None:
        # Only now, with the base model and the checkpoint loaded: a resume that fails
        # before this point leaves the run exactly as it was.
        if is_main_process():
            config.save_yaml(run_dir / "run.yaml")
            discard_outputs_after(run_dir, step)
        wait_for_everyone()

    return _run(config, run_dir, folder, console, should_stop, on_loaded=discard_later,
                resuming=True)


def _run(config: TrainConfig, run_dir: Path, checkpoint: Path | None, console, should_stop,
         on_loaded: Callable[[], None] = lambda: None, resuming: bool = False) -> TrainResult:
    started = time.monotonic()
    reset_peak_memory()
    t = prepare(config, run_dir, console)
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "elapsed": 0.0}
    if checkpoint is not None:
        t.accelerator.load_state(str(checkpoint))
        state.update({k: v for k, v in read_training_state(checkpoint).items() if k in state})
    on_loaded()
    if config.report_to != "none":
        # After a resume, TensorBoard drops what the killed run logged past the checkpoint.
        purge = {"tensorboard": {"purge_step": state["step"] + 1}} if resuming else {}
        t.accelerator.init_trackers("dreambooth", config=tracker_config(config), init_kwargs=purge)
    final_model, first_step, loop_started = None, state["step"], time.monotonic()
    try:
        if state["step"] >= config.max_train_steps:  # resumed only to export the end
            status, loss = "completed", last_loss(run_dir / "metrics.jsonl")
        else:
            status, loss = _loop(t, config, run_dir, state, console, should_stop,
                                 saved_at=state["step"] if checkpoint else -1)
        loop_seconds = time.monotonic() - loop_started
        if status == "completed":
            final_model = _export(t, config, run_dir)
        watch(t, config, run_dir, state["step"], console)  # e.g. after an export-only resume
    finally:
        if config.report_to != "none":
            t.accelerator.end_training()
    return TrainResult(
        run_dir=run_dir, status=status, steps_done=state["step"], final_loss=loss,
        checkpoints=[path for _, path in list_checkpoints(run_dir)], final_model=final_model,
        seconds=time.monotonic() - started, steps_run=state["step"] - first_step,
        loop_seconds=loop_seconds, peak_memory=peak_memory(),
    )



def _loop(t: Training, config: TrainConfig, run_dir: Path, state: dict, console, should_stop,
          saved_at: int) -> tuple[str, float | None]:
    """Train from `state` to max_train_steps; return (status, last logged loss)."""
    accelerator, loss = t.accelerator, None
    elapsed_before, resumed_at = state["elapsed"], time.monotonic()
    progress, task = training_progress(console, config.max_train_steps, state["step"],
                                   disable=not accelerator.is_main_process)
    main = accelerator.is_main_process
    with progress, ((run_dir / "metrics.jsonl").open("a", encoding="utf-8") if main
                    else nullcontext()) as metrics:
        log = StepLog(accelerator, metrics, read_every(config, accelerator.device), config,
                      tracking=config.report_to != "none")
        try:
            while True:
                # Same (seed, epoch) -> same order; a resumed run skips what it already saw.
                t.loader.set_epoch(state["epoch"])
                t.dataset.set_epoch(state["epoch"])
                skip = state["batches_in_epoch"]
                batches = accelerator.skip_first_batches(t.loader, skip) if skip else t.loader
                micros: list = []
                for batch in batches:
                    state["batches_in_epoch"] += 1
                    losses, lr = _micro_step(t, batch, config)
                    micros.append(losses)  # on the device: read by `log` every few steps
                    if not accelerator.sync_gradients:
                        continue  # accumulating: the optimizer has not stepped yet
                    state["step"] += 1
                    state["elapsed"] = elapsed_before + time.monotonic() - resumed_at
                    log.add(state, lr, micros)
                    micros = []
                    if state["batches_in_epoch"] == len(t.loader):  # the next step: new epoch
                        state["epoch"], state["batches_in_epoch"] = state["epoch"] + 1, 0
                    done = state["step"] >= config.max_train_steps
                    save = state["step"] % config.checkpointing_steps == 0 or done
                    if save or log.due:  # checked and written before any checkpoint
                        loss = log.flush()
                        progress.update(task, loss=f"{loss:.4f}")
                    if save:
                        _checkpoint(t, run_dir, state, config, progress)
                        saved_at = state["step"]
                    elif validation_due(config, state["step"]):  # between checkpoints
                        watch(t, config, run_dir, state["step"], progress.console)
                    progress.update(task, completed=state["step"])
                    if done:
                        return "completed", loss
                    # Launched, asking the others is a sync: only where the log was read.
                    if (accelerator.num_processes == 1 or not log.pending) and \
                            stop_everywhere(accelerator, should_stop()):
                        loss = log.flush() or loss
                        if saved_at != state["step"]:
                            _checkpoint(t, run_dir, state, config, progress)
                        return "interrupted", loss
        except BaseException:
            log.flush_quietly()  # the steps that finished before the failure stay logged
            raise


def _micro_step(t: Training, batch, config: TrainConfig):
    """Forward and backward of one batch; the optimizer steps when accumulation is complete.

    Nothing here waits for the device: the losses are returned as device tensors."""
    with t.accelerator.accumulate(*t.models):
        losses = _losses(batch, t.models[0], t.prompts, t.noise_scheduler, t.generator, config,
                         t.scaling)
        t.accelerator.backward(losses["loss"])
        if t.accelerator.sync_gradients and config.max_grad_norm > 0:
            t.accelerator.clip_grad_norm_(t.params, config.max_grad_norm)
        lr = t.optimizer.param_groups[0]["lr"]  # the rate this step uses
        t.optimizer.step()
        t.lr_scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in losses.items()}, lr


def _losses(batch, unet, prompts, noise_scheduler, generator, config, scaling) -> dict:
    """Instance and prior MSE of the noise (or v) prediction for one batch; with snr_gamma,
    each example's error is weighted by min-SNR first."""
    import torch

    mean, std = batch["latents"].unbind(1)  # cached statistics of the frozen VAE's posterior
    draw = {"generator": generator, "device": mean.device, "dtype": mean.dtype}
    latents = (mean + std * torch.randn(mean.shape, **draw) - scaling[1]) * scaling[0]
    noise = torch.randn(latents.shape, **draw)
    if config.noise_offset:  # drawn only when on: the default run's noise stays the same
        noise = noise + config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), **draw)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = prompts(batch["prompts"])
    prediction = unet(noisy, timesteps, hidden, return_dict=False)[0].float()
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    if v_prediction:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    weights = (_min_snr_weights(noise_scheduler, timesteps, config.snr_gamma, v_prediction)
               if config.snr_gamma else None)
    n = batch["num_instance"]
    instance_loss = _mse(prediction, target, weights, slice(None, n))
    if not config.with_prior_preservation:
        return {"loss": instance_loss, "instance_loss": instance_loss}
    prior_loss = _mse(prediction, target, weights, slice(n, None))
    loss = instance_loss + config.prior_loss_weight * prior_loss
    return {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}


def _mse(prediction, target, weights, rows: slice):
    """MSE of the examples `rows`; each example's error times its weight when weighted."""
    import torch.nn.functional as F

    if weights is None:  # the plain MSE, summed in the same order as always
        return F.mse_loss(prediction[rows], target[rows].float())
    errors = (prediction[rows] - target[rows].float()).pow(2).flatten(1).mean(1)
    return (errors * weights[rows]).mean()


def _min_snr_weights(noise_scheduler, timesteps, gamma: float, v_prediction: bool):
    """min(SNR, gamma) / SNR for an epsilon target, / (SNR + 1) for v (Hang et al. 2023:
    the v-loss already carries a factor SNR + 1 relative to the x0-loss)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def _checkpoint(t: Training, run_dir: Path, state: dict, config: TrainConfig,
                progress) -> None:
    models = ["unet", "text_encoder"][: len(t.models)]
    saved = save_checkpoint(t.accelerator, run_dir,
                            {**state, "models": models, "use_lora": config.use_lora})
    if t.accelerator.is_main_process:
        prune_checkpoints(run_dir, config.checkpoints_total_limit)
        progress.console.print(f"saved {saved.name}")
    watch(t, config, run_dir, state["step"], progress.console)  # validation images, loss.png


def _export(t: Training, config: TrainConfig, run_dir: Path) -> Path:
    """The final model: a pipeline folder, or LoRA weights, and its single-file or kohya
    export, written by the main process."""
    t.accelerator.wait_for_everyone()
    unet = t.accelerator.unwrap_model(t.models[0])
    text_encoder = t.accelerator.unwrap_model(t.models[1]) if len(t.models) > 1 else None
    dest = run_dir / (LORA_DIR if config.use_lora else FINAL_DIR)
    if t.accelerator.is_main_process:
        if config.use_lora:
            export_lora(unet, text_encoder, dest)
        else:
            export_pipeline(config.base_model, unet, text_encoder, dest)
        if config.export_file:
            from booth.dreambooth.export import write_final_export

            # After final/ or lora/: the one file A1111, ComfyUI and kohya load (export.py).
            write_final_export(run_dir, config)
    t.accelerator.wait_for_everyone()
    return dest

