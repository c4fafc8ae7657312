"""Will this training fit on the card? A memory plan made before the call is approved.

The plan counts what training keeps on the GPU: the trained weights (fp32 even under
autocast), their gradients and AdamW's two moments (2 bytes a parameter with 8-bit Adam),
the frozen parts in the compute dtype, and the activations, which grow with the examples per
step and the pixels, halve under fp16/bf16 and shrink to about a quarter with gradient
checkpointing. Parameter counts come from the model's own safetensors headers (no weights
are read); an unknown model is taken to be SD-1.5 sized.

Calibrated on the field's ladder for SD-1.5 at 512 px (diffusers' DreamBooth docs): the full
fine-tune with the text encoder wants ~24 GB; fp16 + gradient checkpointing + 8-bit Adam
~16 GB; the same without the text encoder ~12 GB (a T4 ran it in 9.9 GB); LoRA ~8 GB. A run's
measured peak (`torch.cuda.max_memory_allocated`) is filed with its calibration entry and
replaces the formula for the same setup.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
SD15 = {"unet": 859.5e6, "text_encoder": 123.1e6, "vae": 83.7e6}  # parameters
ACTIVATIONS_512 = 4.5e9  # bytes per example per step at 512 px, fp32, no checkpointing
LORA_PARAMS_PER_RANK = {"unet": 0.8e6, "text_encoder": 0.15e6}
HEADROOM = 0.5 * GB  # the allocator's fragmentation and CUDA's own buffers
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


@dataclass(frozen=True)
class Knobs:
    """The settings that decide memory (a TrainConfig's, or a rung of the ladder)."""

    resolution: int = 512
    examples: int = 2  # images per micro-batch: batch x 2 with prior preservation
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    train_text_encoder: bool = True
    use_lora: bool = False
    lora_rank: int = 4
    priors: bool = True  # prior preservation: a class image beside each subject image


# The ladder, cheapest loss of quality first: each rung adds one trick to the one before.
LADDER = (
    ("as asked", {}),
    ("mixed_precision='fp16', gradient_checkpointing=true, use_8bit_adam=true",
     {"mixed_precision": "fp16", "gradient_checkpointing": True, "use_8bit_adam": True}),
    ("the same and train_text_encoder=false",
     {"mixed_precision": "fp16", "gradient_checkpointing": True, "use_8bit_adam": True,
      "train_text_encoder": False}),
    ("use_lora=true with mixed_precision='fp16'",
     {"mixed_precision": "fp16", "use_lora": True, "train_text_encoder": False}),
    ("use_lora=true, mixed_precision='fp16', gradient_checkpointing=true, "
     "train_batch_size=1", {"mixed_precision": "fp16", "use_lora": True,
                            "gradient_checkpointing": True, "train_text_encoder": False,
                            "train_batch_size": 1}),
)


def needed_bytes(counts: dict[str, float], knobs: Knobs) -> float:
    """Peak GPU bytes of a training step with these settings (see the module docstring)."""
    half = knobs.mixed_precision in ("fp16", "bf16")
    frozen_bytes = 2 if half else 4
    optimizer_bytes = 2 if knobs.use_8bit_adam else 8
    trained = frozen = 0.0
    for part in ("unet", "text_encoder"):
        wanted = part == "unet" or knobs.train_text_encoder
        if knobs.use_lora:
            frozen += counts[part]
            trained += LORA_PARAMS_PER_RANK[part] * knobs.lora_rank if wanted else 0
        elif wanted:
            trained += counts[part]
        else:
            frozen += counts[part]
    frozen += counts["vae"]  # encodes the photos once, then stays frozen
    weights = trained * (4 + 4 + optimizer_bytes) + frozen * frozen_bytes
    activations = ACTIVATIONS_512 * knobs.examples * (knobs.resolution / 512) ** 2
    activations *= (0.5 if half else 1) * (0.25 if knobs.gradient_checkpointing else 1)
    return weights + activations


@dataclass(frozen=True)
class Plan:
    needed: float            # bytes
    free: float              # bytes free on the card now
    source: str              # "estimated" or "measured"
    rung: str | None = None  # the first rung of the ladder that fits, when this does not
    given_back: float = 0.0  # bytes the LLM server frees while the tool runs

    @property
    def fits(self) -> bool:
        return self.needed + HEADROOM <= self.free + self.given_back

    def words(self) -> str:
        text = (f"needs ~{self.needed / GB:.1f} GB of GPU memory ({self.source}), "
                f"{self.free / GB:.1f} GB free")
        if self.given_back:
            text += f" + {self.given_back / GB:.1f} GB the LLM server frees while it runs"
        if self.fits:
            return text
        if self.rung:
            return f"{text}: will not fit; fits with {self.rung}"
        return f"{text}: will not fit, not even with LoRA: lower the resolution"


def plan(counts: dict[str, float], knobs: Knobs, free: float,
         measured: float | None = None, given_back: float = 0.0) -> Plan:
    """The plan for `knobs` on a card with `free` bytes, and `given_back` more once the LLM
    server has released its memory; `measured` is a peak this machine measured for the same
    setup, which beats the formula."""
    needed = measured or needed_bytes(counts, knobs)
    source = "measured" if measured else "estimated"
    available = free + given_back
    if needed + HEADROOM <= available:
        return Plan(needed, free, source, given_back=given_back)
    for words, changes in LADDER[1:]:
        rung = _rung(knobs, changes)
        if needed_bytes(counts, rung) + HEADROOM <= available:
            return Plan(needed, free, source, words, given_back)
    return Plan(needed, free, source, given_back=given_back)


def _rung(knobs: Knobs, changes: dict) -> Knobs:
    """`knobs` with a rung's changes; a batch of one is one image, two with priors."""
    changes = dict(changes)
    if changes.pop("train_batch_size", None) == 1:
        changes["examples"] = 2 if knobs.priors else 1
    return dataclasses.replace(knobs, **changes)


def parameter_counts(base_model: str) -> dict[str, float]:
    """Parameters of the UNet, text encoder and VAE of a local folder or cached hub model,
    read from the safetensors headers; SD-1.5's counts for what cannot be read."""
    counts = dict(SD15)
    for part in counts:
        files = _weight_files(base_model, part)
        total = sum(_parameters_in(f) for f in files)
        if total:
            counts[part] = total
    return counts


def _weight_files(base_model: str, part: str) -> list[Path]:
    folder = Path(base_model).expanduser() / part
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base_model, f"{part}/config.json")
        except (ImportError, ValueError):
            return []
        if not isinstance(found, str):
            return []
        folder = Path(found).parent
    files = sorted(folder.glob("*.safetensors"))
    # A folder with fp16 variants beside the full weights: count one set.
    plain = [f for f in files if ".fp16." not in f.name]
    return plain or files


def _parameters_in(file: Path) -> float:
    """Number of values in a safetensors file, from its JSON header alone."""
    try:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                return 0
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return 0
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        start, end = info.get("data_offsets", (0, 0))
        total += (end - start) / _DTYPE_BYTES.get(info.get("dtype"), 4)
    return total
