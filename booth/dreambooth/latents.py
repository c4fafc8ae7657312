"""What the frozen VAE makes of the training images: their latent statistics, encoded once.

The VAE is never trained, so every image goes through it once before the first step and the
loop samples latents from the stored posterior. Random crops (center_crop=false) are the
exception: an image that is not square is encoded again at the start of each epoch.
"""

from __future__ import annotations

from pathlib import Path

from booth.dreambooth.config import TrainConfig

ENCODE_CHUNK = 8  # images per VAE forward pass while caching latents


def cache_latent_stats(vae, config: TrainConfig, device, dtype, console):
    """Mean and std of the frozen VAE's posterior for every image (and mirror), computed once.

    Returns (instance, classes, crops): tensors (N, views, 2, C, h, w), fp32, on a CUDA GPU
    or else the CPU
    (classes None without prior preservation), and the RandomCrops that re-encode the
    images whose crop changes each epoch (None with center_crop). Sampling from the stored
    posterior each step keeps the reference's behaviour (it re-encodes and samples every
    step) at a fraction of the cost.
    """
    import torch

    from booth.dreambooth.train_data import list_images

    vae.to(device)
    if dtype != torch.float32:  # the frozen VAE may run in low precision; it is only read
        vae.to(dtype=dtype)
    sets = {"instance": [Path(p) for p in config.instance_images]}
    if config.with_prior_preservation:
        sets["class"] = list_images(config.class_data_dir)
    total = sum(len(paths) for paths in sets.values())
    console.print(f"encoding {total} images through the frozen VAE (once)")
    stats = {kind: encode_views(vae, paths, config, device, dtype)
             for kind, paths in sets.items()}
    crops = None if config.center_crop else RandomCrops(vae, sets, config, device, dtype)
    return stats["instance"], stats.get("class"), crops


def encode_views(vae, paths: list[Path], config: TrainConfig, device, dtype,
                 offsets: list[float | None] | None = None):
    """(N, views, 2, C, h, w): posterior mean and std of each image (and its mirror)."""
    import torch

    from booth.dreambooth.train_data import load_views

    offsets = offsets or [None] * len(paths)
    chunks = []
    for start in range(0, len(paths), ENCODE_CHUNK):
        views = load_views(paths[start:start + ENCODE_CHUNK], config.resolution,
                           config.random_flip, offsets[start:start + ENCODE_CHUNK])
        with torch.no_grad():
            dist = vae.encode(views.flatten(0, 1).to(device, dtype)).latent_dist
        pair = torch.stack([dist.mean, dist.std], dim=1).float()
        # On a GPU they stay in its memory (a few MB even for 200 class images at 512 px):
        # no batch is then copied from the host each step, pinned or not.
        pair = pair if device.type == "cuda" else pair.cpu()
        chunks.append(pair.unflatten(0, views.shape[:2]))
    return torch.cat(chunks)


class RandomCrops:
    """center_crop=false: at the start of each epoch, the images that are not square re-enter
    the frozen VAE cut at that epoch's crop (placed by (seed, epoch, kind, index), like the
    flips, so a resume sees the same crops). Square images, all prepare_dataset makes, have
    nothing to crop and keep their cached latents; the cost is the VAE kept in memory and one
    encode per non-square image per epoch."""

    def __init__(self, vae, sets: dict[str, list[Path]], config: TrainConfig, device, dtype):
        from booth.dreambooth.train_data import can_crop

        self.vae, self.config, self.device, self.dtype = vae, config, device, dtype
        self.croppable = {kind: [(i, path) for i, path in enumerate(paths)
                                 if can_crop(path, config.resolution)]
                          for kind, paths in sets.items()}

    def __call__(self, dataset, epoch: int) -> None:
        from booth.dreambooth.train_data import crop_offset

        for kind, images in self.croppable.items():
            if not images:
                continue
            offsets = [crop_offset(self.config.seed, epoch, kind, i) for i, _ in images]
            stats = encode_views(self.vae, [path for _, path in images], self.config,
                                 self.device, self.dtype, offsets)
            tensors = dataset.instance if kind == "instance" else dataset.classes
            for row, (i, _) in zip(stats, images, strict=True):
                tensors[i] = row
