"""The one description of a DreamBooth run: a dataclass whose fields carry their reasons.

Layers, last wins: the defaults below -> a YAML file -> explicit overrides. The fully resolved
config is written as `run.yaml` beside every run, so a run can be read, repeated and resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)
TRACKERS = ("tensorboard", "wandb", "none")


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names the field."""


@dataclass
class TrainConfig:
    # --- what to learn from ---------------------------------------------------------------
    # A diffusers SD-1.x pipeline folder or a hub id; VAE, tokenizer and scheduler come from it.
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # The run folder: run.yaml, metrics.jsonl, logs/, checkpoints/, final/ or lora/.
    output_dir: str = "runs/dreambooth"
    # The 3-20 subject photos; one prompt binds them all to the rare identifier.
    instance_images: list[str] = field(default_factory=list)
    instance_prompt: str = "a photo of sks dog"
    # Class images ("a photo of a dog") made by the base model: they keep the class from
    # collapsing onto the subject. Needed only when prior_loss_weight > 0.
    class_data_dir: str | None = None
    class_prompt: str | None = None
    # Square training size; images are resized on their short side and centre-cropped.
    resolution: int = 512
    # Mirror images at random. Off by default: a subject's asymmetric marks (a parting, a
    # logo) would be learned both ways. The choice is seeded by (seed, epoch, index).
    random_flip: bool = False

    # --- optimisation ---------------------------------------------------------------------
    # DreamBooth practice: ~400 steps without priors, ~800 with ~200 class images.
    max_train_steps: int = 400
    # 5e-6 for full fine-tuning (faces 1e-6..2e-6); LoRA wants 1e-4..5e-4.
    learning_rate: float = 5e-6
    # loss = instance MSE + prior_loss_weight * class MSE; 0 turns prior preservation off.
    prior_loss_weight: float = 1.0
    # Instance examples per micro-batch; with priors each batch also holds as many class ones.
    train_batch_size: int = 1
    # Micro-batches summed into one optimizer step: a larger batch on a small GPU.
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    # Clipping keeps one bad batch from wrecking a few-image fine-tune.
    max_grad_norm: float = 1.0
    # Everything random (data order, flips, noise, timesteps, LoRA init) follows this seed.
    seed: int = 0

    # --- what is trained ------------------------------------------------------------------
    # Best fidelity, at the cost of memory; the VAE is always frozen.
    train_text_encoder: bool = True
    # Train small low-rank adapters instead of the full weights: fits small GPUs, tiny files.
    use_lora: bool = False
    lora_rank: int = 4

    # --- memory and speed (GPU tricks are ignored, with a warning, where they cannot work) --
    # "fp16"/"bf16" autocast; trained weights stay fp32 (fp16 ones cannot be unscaled).
    mixed_precision: str = "no"
    # Recompute activations in the backward pass: much less memory, ~20% slower.
    gradient_checkpointing: bool = False
    # bitsandbytes' 8-bit AdamW; only on CUDA with bitsandbytes installed, else plain AdamW.
    use_8bit_adam: bool = False

    # --- checkpoints and tracking ---------------------------------------------------------
    # Full training state (weights, optimizer, scheduler, RNGs, step) every N optimizer steps.
    checkpointing_steps: int = 200
    # Keep at most this many checkpoints (oldest removed first); None keeps them all.
    checkpoints_total_limit: int | None = None
    report_to: str = "tensorboard"

    @property
    def with_prior_preservation(self) -> bool:
        return self.prior_loss_weight > 0

    def check(self) -> TrainConfig:
        """Raise ConfigError for values that cannot train; return self for chaining."""
        _at_least(self, 1, "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                  "checkpointing_steps", "lora_rank")
        _at_least(self, 0, "lr_warmup_steps", "seed", "prior_loss_weight", "max_grad_norm")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.resolution < 64 or self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, >= 64; got {self.resolution}")
        _one_of(self, "mixed_precision", MIXED_PRECISION)
        _one_of(self, "lr_scheduler", LR_SCHEDULERS)
        _one_of(self, "report_to", TRACKERS)
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoints_total_limit must be >= 1 (or None to keep all)")
        if not self.instance_images:
            raise ConfigError("instance_images is empty: give the subject photos to learn")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise ConfigError(
                "prior preservation (prior_loss_weight > 0) needs class_data_dir and class_prompt; "
                "generate class images first, or set prior_loss_weight to 0"
            )
        return self

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


def load_config(yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Dataclass defaults, then the YAML file (if any), then `overrides`; not yet checked."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path} does not hold a mapping of config fields")
        values.update(loaded)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def _at_least(config: TrainConfig, low: float, *names: str) -> None:
    for name in names:
        if getattr(config, name) < low:
            raise ConfigError(f"{name} must be >= {low}, got {getattr(config, name)}")


def _one_of(config: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
