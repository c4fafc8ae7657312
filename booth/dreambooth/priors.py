"""Class (prior-preservation) images generated with the base model, reproducibly and resumably.

A prior set is a folder of `0001.png, 0002.png, ...` plus `priors.json`, which records the key
(everything that decides the pixels: model, prompt, negative prompt, scheduler, steps, guidance,
seed, resolution) and the images made so far.

- Image n is always drawn from its own generator seeded with `image_seed(seed, n)`, so it does
  not depend on the batch size nor on where an earlier run stopped. (Batched and single
  runs agree to float rounding: on CPU a handful of pixels may differ by one level.)
- Each image is written as soon as it exists (temporary name, then `os.replace`), so a killed
  run leaves only whole images, and the next run makes only the missing ones.
- The model is loaded only when something is missing: a fully reused set costs no model load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from booth.dreambooth.errors import PriorSetError
from booth.dreambooth.progress import image_progress

PRIORS_FILE = "priors.json"
# DPM-Solver++ (2M) matches the default sampler's images in about half the steps; class images
# only need to look like the model's idea of the class, and there are hundreds of them.
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
_FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class PriorKey:
    """Everything that decides the pixels of a prior set."""

    base_model: str
    prompt: str
    negative_prompt: str | None = None
    scheduler: str = DEFAULT_SCHEDULER
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int = 0
    resolution: int = 512
    # "fp32", "fp16" or "bf16"; None: the device's usual one (fp16 on CUDA, else fp32), which
    # is left out of the identity so the sets made before this field keep their key.
    precision: str | None = None
    # Where the model is loaded from. Not part of the key: the same model at another path
    # (a moved folder, a replayed session elsewhere) draws the same pixels.
    source: str = field(default="", compare=False)

    @classmethod
    def create(cls, base_model: str, prompt: str, **settings) -> PriorKey:
        """A key with the model identified by what it is, wherever it is given from."""
        negative = settings.pop("negative_prompt", None)
        return cls(model_id(base_model), normalize_prompt(prompt),
                   normalize_prompt(negative) if negative else None, **settings,
                   source=base_model)

    def identity(self) -> dict:
        """The fields that decide the pixels (what priors.json compares)."""
        return _identity(asdict(self))

    def digest(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def folder_name(self) -> str:
        """`<slug of the prompt>-<8 hex of the key>`: readable, unique per key."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48].rstrip("-")
        return f"{slug or 'priors'}-{self.digest()}"


@dataclass
class PriorResult:
    folder: Path
    status: str                     # "complete" or "interrupted"
    images: list[Path]              # every image of the set present now, in order
    generated: list[Path] = field(default_factory=list)
    reused: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # of `seconds`, loading the model (0 when nothing was missing)


def model_id(base_model: str) -> str:
    """A hub id as given; a local folder by a fingerprint of its contents, so that moving it
    keeps its class images and rebuilding another model at the same path does not."""
    path = Path(base_model).expanduser()
    if not (path / "model_index.json").is_file():
        return base_model  # a hub id, or no model at all (loading will say so)
    digest = hashlib.sha256()
    # The pipeline's own files only (its component folders, one level down), never a walk of
    # whatever else the folder holds.
    files = [path / "model_index.json", *path.glob("*/*.json"), *path.glob("*/*.txt"),
             *path.glob("*/*.safetensors"), *path.glob("*/*.bin")]
    for file in sorted(p for p in files if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as handle:  # the head of each file: configs whole, weights'
            digest.update(handle.read(_FINGERPRINT_BYTES))  # header and first tensors
    return f"local:{digest.hexdigest()[:16]}"


def normalize_prompt(prompt: str) -> str:
    return " ".join(prompt.split())


def image_seed(seed: int, number: int) -> int:
    """The generator seed of image `number` of a set: a hash, so neighbours are unrelated."""
    digest = hashlib.sha256(f"booth-prior:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def image_name(number: int) -> str:
    return f"{number:04d}.png"


def read_prior_set(folder: Path) -> dict | None:
    """The parsed priors.json of `folder`, or None when absent or unreadable."""
    try:
        return json.loads((Path(folder) / PRIORS_FILE).read_text())
    except (OSError, ValueError):
        return None


def existing_images(folder: Path) -> list[int]:
    """Numbers of the images present in `folder` (whole files only: see the atomic write)."""
    if not Path(folder).is_dir():
        return []
    return sorted(int(p.stem) for p in Path(folder).glob("[0-9]*.png") if p.stem.isdigit())


def generate_class_images(key: PriorKey, folder: Path, num_images: int,
                          load_pipeline: Callable[[], object], *, batch_size: int = 4,
                          console=None, should_stop: Callable[[], bool] | None = None
                          ) -> PriorResult:
    """Make sure images 1..num_images of `key` exist in `folder`; generate only missing ones.

    `load_pipeline()` is called only if something is missing. `should_stop()` is checked
    between batches; when it returns True the result has status "interrupted".
    """
    started = time.monotonic()
    folder = Path(folder)
    _claim(folder, key)
    present = set(existing_images(folder))
    missing = [n for n in range(1, num_images + 1) if n not in present]
    reused = num_images - len(missing)
    generated: list[Path] = []
    status, load_seconds = "complete", 0.0
    if missing:
        pipeline = _prepare_pipeline(load_pipeline(), key.scheduler)
        load_seconds = time.monotonic() - started
        from rich.markup import escape

        label = f"class images [dim]{escape(key.prompt[:40])}"
        with image_progress(console, label, num_images, reused) as advance:
            for start in range(0, len(missing), batch_size):
                if should_stop is not None and should_stop():
                    status = "interrupted"
                    break
                numbers = missing[start:start + batch_size]
                for number, image in zip(numbers, _generate(pipeline, key, numbers), strict=True):
                    generated.append(_save_atomic(image, folder / image_name(number)))
                advance(len(numbers))
                _write_metadata(folder, key)
    _write_metadata(folder, key)
    images = [folder / image_name(n) for n in existing_images(folder) if n <= num_images]
    return PriorResult(folder, status, images, generated, reused,
                       round(time.monotonic() - started, 2), round(load_seconds, 2))


def _claim(folder: Path, key: PriorKey) -> None:
    """Create the folder for `key`, or check that the one there was made for the same key."""
    recorded = read_prior_set(folder)
    if recorded is not None and _identity(recorded.get("key")) != key.identity():
        raise PriorSetError(f"{folder} holds class images made with other settings "
                         f"({recorded.get('key')}); refusing to mix them")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a run killed in the middle of a write
        stale.unlink(missing_ok=True)
    _write_metadata(folder, key)


def _identity(recorded_key: dict | None) -> dict | None:
    if not recorded_key:
        return None
    return {k: v for k, v in recorded_key.items()
            if k != "source" and not (k == "precision" and v is None)}


def _write_metadata(folder: Path, key: PriorKey) -> None:
    numbers = existing_images(folder)
    data = {"key": asdict(key), "count": len(numbers),
            "images": [image_name(n) for n in numbers],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = folder / f".{PRIORS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, folder / PRIORS_FILE)


def _save_atomic(image, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _prepare_pipeline(pipeline, scheduler: str):
    from booth.dreambooth.sampling import use_scheduler

    use_scheduler(pipeline, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipeline, key: PriorKey, numbers: list[int]):
    """PIL images for image numbers `numbers`, one batch, one generator per image."""
    import torch

    # CPU generators: the starting noise of image n is the same on every device.
    generators = [torch.Generator("cpu").manual_seed(image_seed(key.seed, n)) for n in numbers]
    negative = [key.negative_prompt] * len(numbers) if key.negative_prompt else None
    with torch.inference_mode():
        return pipeline(prompt=[key.prompt] * len(numbers), negative_prompt=negative,
                        num_inference_steps=key.num_inference_steps,
                        guidance_scale=key.guidance_scale, height=key.resolution,
                        width=key.resolution, generator=generators).images


def find_prior_sets(priors_root: Path, prompt: str, base_model: str,
                    resolution: int | None = None) -> list[tuple[Path, int]]:
    """(folder, image count) of the prior sets for this prompt and model, most images first."""
    wanted_prompt, wanted_model = normalize_prompt(prompt), model_id(base_model)
    found = []
    for meta_file in sorted(Path(priors_root).glob(f"*/{PRIORS_FILE}")):
        key = (read_prior_set(meta_file.parent) or {}).get("key") or {}
        if key.get("prompt") != wanted_prompt or key.get("base_model") != wanted_model:
            continue
        if resolution is not None and key.get("resolution") != resolution:
            continue
        count = len(existing_images(meta_file.parent))
        if count:
            found.append((meta_file.parent, count))
    return sorted(found, key=lambda item: -item[1])


def unet_and_vae_config(base_model: str) -> tuple[dict, dict] | None:
    """The UNet and VAE configs of a local folder or an already cached hub model, without
    loading any weights; None when they cannot be read."""
    path = Path(base_model).expanduser()
    try:
        if path.is_dir():
            files = [path / "unet" / "config.json", path / "vae" / "config.json"]
        else:
            from huggingface_hub import try_to_load_from_cache

            files = [try_to_load_from_cache(base_model, f"{part}/config.json")
                     for part in ("unet", "vae")]
            if not all(isinstance(f, str) for f in files):
                return None
        unet, vae = (json.loads(Path(f).read_text()) for f in files)
        return unet, vae
    except (OSError, ValueError, ImportError):
        return None


def natural_resolution(base_model: str, fallback: int = 512) -> int:
    """The resolution the model was trained at: UNet sample size x VAE scale factor."""
    configs = unet_and_vae_config(base_model)
    if configs is None:
        return fallback
    unet, vae = configs
    try:
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError):
        return fallback
