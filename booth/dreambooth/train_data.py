"""Training examples: subject photos paired with class images, one pair per dataset index.

Images are read once with Pillow (no torchvision: its PyPI wheel does not load beside the CPU
torch) and, because the VAE is frozen, encoded to latents once by the trainer. This module
only decides which cached tensor each batch position gets, so it never touches the global RNG:
the flip of index i in epoch e is a pure function of (seed, e, i), which keeps a resumed run
bit-identical to one never stopped even though the loader prefetches a batch ahead.
"""

from __future__ import annotations

import random
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image(path: str | Path, resolution: int, offset: float | None = None):
    """A (3, resolution, resolution) float tensor in [-1, 1]: short side resized, then the
    centre crop, or with `offset` in [0, 1] the crop that far along the long side.

    Class images from a prior set may have been made at another size; this brings any image
    to the training resolution.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = resolution / min(image.size)
    if image.size != (resolution, resolution):
        size = (max(resolution, round(image.width * scale)),
                max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        if offset is not None:
            left = round((image.width - resolution) * offset)
            top = round((image.height - resolution) * offset)
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def can_crop(path: str | Path, resolution: int) -> bool:
    """Whether a random crop of `path` can differ from its centre crop (it is not square once
    its short side is `resolution`); reads the header only."""
    from PIL import Image

    with Image.open(path) as opened:
        short, long = sorted(opened.size)
    return round(long * resolution / short) > resolution


def crop_offset(seed: int, epoch: int, kind: str, index: int) -> float:
    """Where image `index` of `kind` is cropped in `epoch` (see PairedExamples._view)."""
    return random.Random(f"{seed}/{epoch}/crop/{kind}/{index}").random()


# --- captions: `<image>.txt` beside a photo (kohya's convention) -------------------------------
# A caption replaces the instance prompt for its photo; it should name the identifier too.

CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 2000  # CLIP reads 77 tokens (~300 characters); long tag lists still fit


class CaptionError(ValueError):
    """A caption file that cannot be used; the message says why."""


def caption_path(image: str | Path) -> Path:
    return Path(image).with_suffix(CAPTION_SUFFIX)


def read_caption(image: str | Path) -> str | None:
    """The caption of `image` (whitespace, newlines included, collapsed to single spaces), or
    None when it has no caption file. Raises CaptionError for one that cannot be a caption."""
    path = caption_path(image)
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_CAPTION_BYTES:
            raise CaptionError(f"caption is {path.stat().st_size:,} bytes, above the "
                               f"{MAX_CAPTION_BYTES:,}-byte limit: not a caption")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CaptionError("caption is not UTF-8 text") from None
    except OSError as error:
        raise CaptionError(f"caption cannot be read ({error.strerror or error})") from None
    caption = " ".join(text.removeprefix("\ufeff").split())
    if not caption:
        raise CaptionError("caption file is empty")
    if any(not ch.isprintable() for ch in caption):
        raise CaptionError("caption holds control characters: not a caption")
    return caption


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, in name order (the order is part of the seed)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_views(paths: list[Path], resolution: int, random_flip: bool,
               offsets: list[float | None] | None = None):
    """Tensor (N, V, 3, H, W): each image, and its mirror image when flips are on (V = 2)."""
    import torch

    offsets = offsets or [None] * len(paths)
    images = torch.stack([load_image(p, resolution, o) for p, o in zip(paths, offsets,
                                                                       strict=True)])
    if random_flip:
        return torch.stack([images, images.flip(-1)], dim=1)
    return images.unsqueeze(1)


class PairedExamples:
    """A map-style dataset (torch's DataLoader needs only __len__ and __getitem__).

    Index i -> instance example i mod N, and (with priors) class example i mod M.

    `instance` and `classes` hold one tensor per image with a leading "view" axis (the image,
    and its mirror when flips are on); here they are the cached VAE latent statistics, but any
    per-image tensor works. The length is max(N, M), as in the DreamBooth reference code, so an
    epoch shows every class image once and cycles the few subject photos.
    """

    def __init__(self, instance, classes=None, seed: int = 0,
                 prompt_rows: tuple[list[int], int] | None = None):
        if len(instance) == 0:
            raise ValueError("no instance examples")
        if classes is not None and len(classes) == 0:
            raise ValueError("prior preservation needs class examples, found none")
        self.instance = instance
        self.classes = classes
        self.seed = seed
        self.epoch = 0
        # Which prompt each example is trained with (PromptEmbeddings' rows): one per subject
        # photo (its caption, or the instance prompt), and the class prompt's.
        self.instance_rows, self.class_row = prompt_rows or ([0] * len(instance), 1)
        # (dataset, epoch) -> None: replaces examples that change per epoch (random crops).
        self.on_epoch = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(self, epoch)

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes) if self.classes is not None else 0)

    def _view(self, kind: str, index: int, views: int) -> int:
        if views == 1:
            return 0
        # String seeds go through SHA-512 in `random`: stable across processes and runs.
        return random.Random(f"{self.seed}/{self.epoch}/{kind}/{index}").randrange(views)

    def __getitem__(self, index: int) -> dict:
        item = {}
        for kind, tensors in (("instance", self.instance), ("class", self.classes)):
            if tensors is None:
                continue
            example = tensors[index % len(tensors)]
            item[kind] = example[self._view(kind, index, example.shape[0])]
        item["prompts"] = [self.instance_rows[index % len(self.instance)]]
        if self.classes is not None:
            item["prompts"].append(self.class_row)
        return item


def collate_pairs(items: list[dict]) -> dict:
    """One batch: all instance examples first, then all class examples (one forward pass),
    with the prompt row of each in the same order."""
    import torch

    examples = [item["instance"] for item in items]
    examples += [item["class"] for item in items if "class" in item]
    rows = [item["prompts"][0] for item in items] + [row for item in items
                                                     for row in item["prompts"][1:]]
    return {"latents": torch.stack(examples), "num_instance": len(items),
            "prompts": torch.tensor(rows)}


# --- the inputs a run was started with --------------------------------------------------------
# A resume is exact only on the same data: re-preparing a dataset replaces its photos, and
# generate_priors with a larger count grows the class folder. inputs.json pins them.

INPUTS_FILE = "inputs.json"


def input_fingerprint(config) -> dict:
    """sha256 of every subject photo of a TrainConfig, and the names (and count) of its class
    images."""
    import hashlib

    import torch

    instance = {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest()
                for p in config.instance_images}
    classes = config.class_data_dir if config.with_prior_preservation else None
    names = [p.name for p in list_images(classes)] if classes else []
    # Not an input, but it decides the last bits of every CPU sum: a resume is bit-identical
    # only at the same thread count (FIELD-NOTES: 1 vs 2 threads, 10 of 24 losses equal).
    captions = {str(p): read_caption(p) for p in config.instance_images}
    captions = {p: text for p, text in captions.items() if text is not None}
    return {"instance_images": instance, "class_images": {"count": len(names), "names": names},
            "cpu_threads": torch.get_num_threads(), **({"captions": captions} if captions else {})}


def save_fingerprint(run_dir: Path, fingerprint: dict) -> None:
    import json

    (run_dir / INPUTS_FILE).write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")


def thread_change(run_dir: Path, fingerprint: dict) -> str | None:
    """A warning when this process uses another CPU thread count than the run started with
    (None when the same, unknown, or training on a GPU)."""
    import json

    import torch

    path = run_dir / INPUTS_FILE
    if torch.cuda.is_available() or not path.is_file():
        return None
    before = json.loads(path.read_text(encoding="utf-8")).get("cpu_threads")
    now = fingerprint["cpu_threads"]
    if before is None or before == now:
        return None
    return (f"run {run_dir.name!r} was trained with {before} CPU threads and resumes with {now}: "
            "the losses will be close but not bit-identical to an uninterrupted run (set "
            f"BOOTH_THREADS={before} to resume exactly)")


def input_changes(run_dir: Path, fingerprint: dict) -> str | None:
    """Why the inputs differ from those the run started with; None: the same (or unknown)."""
    import json

    path = run_dir / INPUTS_FILE
    if not path.is_file():  # a run from before inputs were recorded
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    changes = []
    old, new = saved.get("instance_images", {}), fingerprint["instance_images"]
    changed = [Path(p).name for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
    if changed:
        changes.append(f"subject photo(s) {', '.join(changed[:3])}"
                       f"{' ...' if len(changed) > 3 else ''} changed (dataset prepared again?)")
    if saved.get("captions", {}) != fingerprint.get("captions", {}):
        changes.append("the photos' captions (<image>.txt) changed")
    old_class, new_class = saved.get("class_images", {}), fingerprint["class_images"]
    if old_class.get("names", []) != new_class["names"]:
        changes.append(f"the class images changed ({old_class.get('count', 0)} -> "
                       f"{new_class['count']} images; generate_priors added or replaced some?)")
    if not changes:
        return None
    return (f"the inputs of run {run_dir.name!r} changed since it started: {'; '.join(changes)}. "
            "Resuming would train on other data than its checkpoints saw; start a new run with "
            "train instead")
