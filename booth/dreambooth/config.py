"""The one description of a DreamBooth run: a dataclass whose fields carry their reasons.

Each setting a user may give is `Annotated[type, Param(description, bounds)]`: the `train`
tool's schema, the validation before it runs and the check of a config read from YAML all
come from these lines. Fields without a Param (paths) are filled in by the code that starts
the run. `check()` adds only the rules a schema cannot say.

Layers, last wins: the defaults below -> a YAML file -> explicit overrides. The fully resolved
config is written as `run.yaml` beside every run, so a run can be read, repeated and resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from booth.dreambooth.errors import ConfigError
from booth.schema import NOT_BLANK, PATH, Param, errors, pattern, settings_schema

__all__ = ["ConfigError", "SUMMARY_FIELDS", "TrainConfig", "load_config"]

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
Precision = Literal["no", "fp16", "bf16"]
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine",
                    "cosine_with_restarts", "polynomial"]
STEPS = {"minimum": 1, "maximum": 1_000_000}
SEED = {"minimum": 0, "maximum": 2**32 - 1}
PROMPT_LINE = pattern(r"^[^\n\r]*\S[^\n\r]*$", "one line of text (not blank)")


@dataclass
class TrainConfig:
    # --- what to learn from ---------------------------------------------------------------
    # VAE, tokenizer and scheduler come from the base model too.
    base_model: Annotated[str, Param("Diffusers SD-1.x folder or hub id", min_length=1,
                                     max_length=1000, pattern=PATH)] = DEFAULT_BASE_MODEL
    # The run folder: run.yaml, metrics.jsonl, logs/, checkpoints/, final/ or lora/.
    output_dir: str = "runs/dreambooth"
    # The 3-20 subject photos; one prompt binds them all to the rare identifier.
    instance_images: list[str] = field(default_factory=list)
    instance_prompt: Annotated[str, Param("Prompt that binds the subject photos to the "
                                          "identifier, e.g. 'a photo of sks dog'",
                                          min_length=1, max_length=300,
                                          pattern=r"^[^\n\r]+$")] = "a photo of sks dog"
    # Class images keep the class from collapsing onto the subject; needed only when
    # prior_loss_weight > 0.
    class_data_dir: str | None = None
    class_prompt: Annotated[str | None, Param("Prompt of the class images, e.g. 'a photo of "
                                              "a dog'", min_length=1, max_length=300,
                                              pattern=NOT_BLANK)] = None
    # Images are resized on their short side and centre-cropped.
    resolution: Annotated[int, Param("Square training resolution in pixels, a multiple of 8",
                                     minimum=64, multiple_of=8)] = 512
    # False: each epoch a random crop, placed by (seed, epoch, index). Only images that are not
    # square have anything to crop (prepare_dataset's are square); those are re-encoded
    # through the VAE every epoch, which stays in memory.
    center_crop: Annotated[bool, Param("Centre crop; false: a random crop each epoch (of "
                                       "images that are not square)")] = True
    # Off by default: a subject's asymmetric marks (a parting, a logo) would be learned both
    # ways. The choice is seeded by (seed, epoch, index).
    random_flip: Annotated[bool, Param("Mirror images at random (avoid for asymmetric "
                                       "subjects)")] = False

    # --- optimisation ---------------------------------------------------------------------
    max_train_steps: Annotated[int, Param("~400 without priors, ~800 with", **STEPS)] = 400
    learning_rate: Annotated[float, Param("5e-6 (faces 2e-6); 1e-4 with LoRA",
                                          exclusive_minimum=0,
                                          exclusive_maximum=1)] = 5e-6
    # loss = instance MSE + prior_loss_weight * class MSE.
    prior_loss_weight: Annotated[float, Param("Class-image loss weight; 0: no prior "
                                              "preservation", minimum=0,
                                              maximum=10)] = 1.0
    # With priors each batch also holds as many class images.
    train_batch_size: Annotated[int, Param("Subject images per batch (as many class images "
                                           "are added)", minimum=1, maximum=64)] = 1
    # A larger batch on a small GPU.
    gradient_accumulation_steps: Annotated[int, Param("Batches per optimizer step", minimum=1,
                                                      maximum=64)] = 1
    lr_scheduler: Annotated[Scheduler, Param("Learning-rate schedule")] = "constant"
    lr_warmup_steps: Annotated[int, Param("Warm-up steps of the schedule", minimum=0,
                                          maximum=1_000_000)] = 0
    # cosine_with_restarts: how many times the cosine starts over; polynomial: the power of
    # its decay (1 is linear).
    lr_num_cycles: Annotated[int, Param("Restarts of cosine_with_restarts", minimum=1,
                                        maximum=1000)] = 1
    lr_power: Annotated[float, Param("Power of the polynomial schedule's decay", minimum=0,
                                     maximum=100)] = 1.0
    adam_beta1: Annotated[float, Param("AdamW beta1", minimum=0, exclusive_maximum=1)] = 0.9
    adam_beta2: Annotated[float, Param("AdamW beta2", minimum=0, exclusive_maximum=1)] = 0.999
    adam_weight_decay: Annotated[float, Param("AdamW weight decay", minimum=0,
                                              maximum=1)] = 1e-2
    adam_epsilon: Annotated[float, Param("AdamW epsilon", exclusive_minimum=0,
                                         maximum=1)] = 1e-8
    # Clipping keeps one bad batch from wrecking a few-image fine-tune.
    max_grad_norm: Annotated[float, Param("Clip gradients to this norm; 0 turns clipping off",
                                          minimum=0, maximum=1000)] = 1.0
    # Min-SNR weighting (Hang et al. 2023): each example's loss is scaled by
    # min(SNR, gamma)/SNR (epsilon) or min(SNR, gamma)/(SNR + 1) (v-prediction), so the many
    # nearly noise-free timesteps stop dominating. 5 is the paper's value.
    snr_gamma: Annotated[float | None, Param("Min-SNR loss weighting gamma (5 is usual); "
                                             "0 or unset: off", minimum=0,
                                             maximum=1000)] = None
    # Offset noise: a per-channel constant added to the noise lets the model learn overall
    # brightness (very dark or bright images); 0.05-0.1 is usual.
    noise_offset: Annotated[float, Param("Offset noise strength; 0: off", minimum=0,
                                         maximum=1)] = 0.0
    # Data order, flips, noise, timesteps and LoRA init all follow it.
    seed: Annotated[int, Param("Seed of data order, noise and timesteps", **SEED)] = 0

    # --- what is trained (the VAE is always frozen) ----------------------------------------
    train_text_encoder: Annotated[bool, Param("Also train the text encoder (better, "
                                              "more memory)")] = True
    use_lora: Annotated[bool, Param("Small LoRA adapters instead of all "
                                    "weights")] = False
    lora_rank: Annotated[int, Param("LoRA rank", minimum=1, maximum=256)] = 4

    # --- memory and speed (GPU tricks are ignored, with a warning, where they cannot work) --
    # Trained weights stay fp32 under autocast: fp16 ones cannot be unscaled.
    mixed_precision: Annotated[Precision, Param("fp16/bf16 save GPU memory")] = "no"
    gradient_checkpointing: Annotated[bool, Param("Much less memory, ~20% slower")] = False
    # Only on CUDA with bitsandbytes installed, else plain AdamW.
    use_8bit_adam: Annotated[bool, Param("8-bit AdamW (CUDA + bitsandbytes)")] = False

    # --- checkpoints and tracking ---------------------------------------------------------
    # The full training state (weights, optimizer, scheduler, RNGs, step).
    checkpointing_steps: Annotated[int, Param("Save a resumable checkpoint every N steps",
                                              **STEPS)] = 200
    # Oldest removed first; None keeps them all.
    checkpoints_total_limit: Annotated[int | None, Param("Keep only the newest N checkpoints",
                                                         minimum=1, maximum=1000)] = None
    report_to: Annotated[Literal["tensorboard", "wandb", "none"],
                         Param("Experiment tracker for the metrics")] = "tensorboard"
    # export/<name>.safetensors (full) or <name>-lora.safetensors (LoRA), for A1111/ComfyUI.
    export_file: Annotated[bool, Param("Also write the one-file export (original SD layout, "
                                       "or kohya's LoRA format) at the end")] = True
    export_dtype: Annotated[Literal["fp16", "fp32", "bf16"],
                            Param("Precision of the single file or kohya LoRA written at the "
                                  "end")] = "fp16"
    # Watching it learn (booth.dreambooth.validation): images rendered with the model being
    # trained, at fixed seeds, so those of successive steps differ only by what training
    # changed. None: the instance prompt, and its subject on a beach (does the identifier
    # carry the subject beyond the photos?).
    validation_prompts: Annotated[list[str] | None, Param(
        "Prompts rendered while training (default: the instance prompt and its subject "
        "on the beach)", min_items=1, max_items=8, min_length=1, max_length=300,
        pattern=PROMPT_LINE)] = None
    # None: at every checkpoint (and the end); 0: never.
    validation_steps: Annotated[int | None, Param(
        "Render validation images every N steps and at the end (default: at every "
        "checkpoint); 0 turns them off", minimum=0, maximum=1_000_000)] = None
    num_validation_images: Annotated[int, Param("Validation images per prompt", minimum=1,
                                                maximum=8)] = 2
    # Few steps of a fast deterministic sampler: enough to see the subject, cheap to repeat.
    validation_inference_steps: Annotated[int, Param("Denoising steps of validation images",
                                                     minimum=1, maximum=200)] = 10
    loss_plot: Annotated[bool, Param("Draw loss.png at checkpoints and at the end")] = True

    # --- speed (not tool settings: for code calling the trainer; run.yaml keeps them) ----
    # Steps between reads of the losses from the device (and NaN checks); None: 1 on the CPU,
    # where a read costs nothing, 10 on a GPU, where each read makes the host wait.
    log_every: int | None = None
    # TF32 matmuls on Ampere+ GPUs: faster fp32 steps, other losses than fp32 (opt-in;
    # torch already runs convolutions in TF32 by default).
    allow_tf32: bool = False
    # torch.compile the UNet (CUDA): minutes of compiling first, cached under
    # $BOOTH_COMPILE_CACHE or the HF cache; the losses are close, not identical (opt-in).
    compile_unet: bool = False

    @property
    def with_prior_preservation(self) -> bool:
        return self.prior_loss_weight > 0

    def check(self) -> TrainConfig:
        """Raise ConfigError for values that cannot train; return self for chaining."""
        problems = errors(settings_schema(TrainConfig), self.settings())
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))
        if self.log_every is not None and not (isinstance(self.log_every, int)
                                               and 1 <= self.log_every <= 10_000):
            raise ConfigError(f"log_every must be a whole number of steps from 1 to 10000, "
                              f"not {self.log_every!r}")
        if not self.instance_images:
            raise ConfigError("instance_images is empty: give the subject photos to learn")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise ConfigError(
                "prior preservation (prior_loss_weight > 0) needs class_data_dir and class_prompt; "
                "generate class images first, or set prior_loss_weight to 0"
            )
        return self

    def settings(self) -> dict[str, Any]:
        """The fields a user may set, as given (None: left out, as a tool call omits it)."""
        names = settings_schema(TrainConfig)["properties"]
        return {k: v for k, v in self.to_dict().items() if k in names and v is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        """Write the resolved config (every field, so the file alone describes the run)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)


# What a run's summary shows (the system prompt, `booth ls`): the settings that tell runs apart.
SUMMARY_FIELDS = ("instance_prompt", "class_prompt", "max_train_steps", "learning_rate",
                  "use_lora", "resolution")


def load_config(yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Dataclass defaults, then the YAML file (if any), then `overrides`; not yet checked."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read {yaml_path}: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path} does not hold a mapping of config fields")
        values.update(loaded)
    values.update(overrides)
    return TrainConfig.from_dict(values)
