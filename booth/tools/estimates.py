"""The time estimates of the approval prompt: measured on this machine when it can be
(booth.tools.calibration), else a rough guess from the tables below."""

from __future__ import annotations

from pathlib import Path

from booth.tools.calibration import PIXEL_EXPONENT, Estimate, Setup, estimate, record

# Rough guesses, used until this machine has measured something comparable. Training: seconds
# per example (forward + backward) at a reference resolution, and the fixed seconds of a run
# (imports, loading, caching latents, checkpoints, export). The tiny model was measured on this
# project's 2-core CPU (0.125 s a step of 1+1 images at 64 px, ~13 s fixed); SD 1.5 at 512 px:
# a T4 ran ~0.93 steps/s with a subject and a class image.
_TRAIN_GUESS = {
    ("cpu", "tiny"): (64, 0.065, 13), ("cuda", "tiny"): (64, 0.01, 8),
    ("mps", "tiny"): (64, 0.03, 10), ("cpu", "sd"): (512, 20.0, 120),
    ("cuda", "sd"): (512, 0.3, 60), ("mps", "sd"): (512, 2.5, 90),
}
# Generation: seconds per image per denoising step at a reference resolution with guidance
# (two UNet rows per image), and the seconds to load the model.
_GENERATE_GUESS = {
    ("cpu", "tiny"): (64, 0.04, 2), ("cuda", "tiny"): (64, 0.005, 2),
    ("mps", "tiny"): (64, 0.01, 2), ("cpu", "sd"): (512, 5.0, 30),
    ("cuda", "sd"): (512, 0.05, 15), ("mps", "sd"): (512, 0.4, 20),
}


def device_kind() -> str:
    """'cuda', 'mps' or 'cpu': what the tools will run on (imports torch)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def device_name() -> str:
    """The device as measurements are filed: the CPU's thread count matters, the GPU's name."""
    import torch

    kind = device_kind()
    if kind == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    threads = torch.get_num_threads()
    return "mps (Apple GPU)" if kind == "mps" else \
        f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def duration(seconds: float) -> str:
    """A rough duration as a person says it: '40 s', '12 min', '2.5 h'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def model_size(base_model: str) -> str:
    """'tiny' for a small local test model (UNet weights under 50 MB), else 'sd'."""
    unet = Path(base_model).expanduser() / "unet"
    if unet.is_dir():
        weights = sum(f.stat().st_size for f in unet.glob("*.safetensors")) or sum(
            f.stat().st_size for f in unet.glob("*.bin"))
        return "tiny" if 0 < weights < 50e6 else "sd"
    return "sd"


# --- training --------------------------------------------------------------------------------


def train_setup(base_model: str, resolution: int, examples: int, precision: str,
                text_encoder: bool, lora: bool) -> Setup:
    """`examples`: images per optimizer step (batch x accumulation, x2 with priors)."""
    from booth.dreambooth.priors import model_id

    return Setup("train", device_name(), model_id(base_model), resolution, examples, precision,
                 text_encoder, lora)


def training_time(workspace_root: Path, base_model: str, setup: Setup, steps: int,
                  fixed: bool = True) -> Estimate:
    """`fixed`: whether the run's fixed cost counts (a resume pays it too)."""
    reference, per_example, fixed_guess = _TRAIN_GUESS[(device_kind(), model_size(base_model))]
    pixels = (setup.resolution / reference) ** 2
    per_step = per_example * setup.examples * pixels ** PIXEL_EXPONENT
    return estimate(workspace_root, setup, steps, per_step, fixed_guess if fixed else 0)


def measured_pace(when: Estimate, units: float) -> float | None:
    """Seconds per unit of an estimate for `units` units (no fixed cost in it), if measured."""
    return when.seconds / units if when.source == "measured" and units > 0 else None


def record_training(workspace_root: Path, setup: Setup, result) -> None:
    """File what a finished (or stopped) run measured: its loop, and the rest as fixed."""
    record(workspace_root, setup, result.steps_run, result.loop_seconds,
           result.seconds - result.loop_seconds, result.peak_memory)


# --- generation (class images, samples) ------------------------------------------------------


def generate_setup(base_model: str, resolution: int, guidance: float) -> Setup:
    from booth.dreambooth.priors import model_id

    precision = "fp16" if device_kind() == "cuda" else "no"  # as load_inference_pipeline does
    return Setup("generate", device_name(), model_id(base_model), resolution,
                 2 if guidance > 1 else 1, precision)


def generation_time(workspace_root: Path, base_model: str, setup: Setup, images: int,
                    steps: int) -> Estimate:
    reference, per_unit, load = _GENERATE_GUESS[(device_kind(), model_size(base_model))]
    per_unit *= setup.examples / 2 * ((setup.resolution / reference) ** 2) ** PIXEL_EXPONENT
    return estimate(workspace_root, setup, images * steps, per_unit, load)


def image_pace(workspace_root: Path, base_model: str, setup: Setup, steps: int
               ) -> float | None:
    """Seconds an image took here at these settings (loading aside), if measured."""
    ten = generation_time(workspace_root, base_model, setup, 10, steps)
    none = generation_time(workspace_root, base_model, setup, 0, steps)
    return measured_pace(Estimate(ten.seconds - none.seconds, ten.source), 10)


def record_generation(workspace_root: Path, setup: Setup, images: int, steps: int,
                      seconds: float, load_seconds: float) -> None:
    record(workspace_root, setup, images * steps, seconds - load_seconds, load_seconds)
