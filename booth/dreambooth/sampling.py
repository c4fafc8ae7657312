"""Rendering prompts with a pipeline: PNG files, one grid, a samples.json of the settings.

Classifier-free guidance is diffusers' own: with guidance_scale > 1, StableDiffusionPipeline
concatenates the unconditional and conditional inputs and runs the UNet ONCE per denoising
step on the doubled batch (tests/test_priors_sample.py counts the calls to prove it).

Image j of every prompt starts from the same noise (seeded by `image_seed(seed, j)`), so a
grid compares prompts on equal terms and the same seed reproduces the same images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from booth.dreambooth.grids import labelled_grid
from booth.dreambooth.progress import image_progress

# Works well at 20-30 steps whatever scheduler a model folder was saved with (a trained run
# may carry the DDPM scheduler used in training, which needs hundreds of steps).
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"
DEFAULT_STEPS = 30


@dataclass
class SampleResult:
    images: list[Path]
    grid: Path | None
    status: str = "complete"        # or "interrupted"
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    cells: dict[tuple[int, int], Path] = field(default_factory=dict)  # (row, 1-based column)

    def by_prompt(self, prompts: list[str]) -> dict[str, list[Path]]:
        """{prompt: its images}, in prompt order (a prompt given twice pools its rows)."""
        found: dict[str, list[Path]] = {}
        for (row, _), path in sorted(self.cells.items()):
            found.setdefault(prompts[row], []).append(path)
        return found


def image_seed(seed: int, column: int) -> int:
    """Generator seed of image `column` (1-based) of every prompt."""
    digest = hashlib.sha256(f"booth-sample:{seed}:{column}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def use_scheduler(pipeline, name: str = DEFAULT_SCHEDULER):
    """Swap the pipeline's scheduler for diffusers class `name`, keeping its noise schedule."""
    import diffusers

    if type(pipeline.scheduler).__name__ != name:
        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)
    return pipeline


def sample_images(pipeline, prompts: list[str], out_dir: Path, *, num_images_per_prompt: int = 4,
                  guidance_scale: float = 7.5, num_inference_steps: int = DEFAULT_STEPS,
                  seed: int = 0, negative_prompt: str | None = None, height: int | None = None,
                  width: int | None = None, batch_size: int = 4, console=None,
                  should_stop: Callable[[], bool] | None = None,
                  grid_title: str | None = None) -> SampleResult:
    """Render every prompt `num_images_per_prompt` times into `out_dir`, plus `grid.png`
    (one row per prompt, labelled with it; `grid_title` on top). `should_stop()` is checked
    between batches."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_scheduler(pipeline).set_progress_bar_config(disable=True)
    cells: dict[tuple[int, int], Path] = {}
    status = "complete"
    batches = [(row, cols) for row in range(len(prompts))
               for cols in _chunks(range(1, num_images_per_prompt + 1), batch_size)]
    settings = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                    height=height, width=width, negative_prompt=negative_prompt)
    with image_progress(console, "sampling", len(prompts) * num_images_per_prompt) as advance:
        for row, cols in batches:
            if should_stop is not None and should_stop():
                status = "interrupted"
                break
            images = _render(pipeline, prompts[row], cols, seed, settings)
            for col, image in zip(cols, images, strict=True):
                path = out_dir / f"{row + 1:02d}-{col:02d}-{_slug(prompts[row])}.png"
                image.save(path)
                cells[row, col] = path
            advance(len(cols))
    grid = None
    if cells:
        grid = out_dir / "grid.png"
        labelled_grid(cells, len(prompts), num_images_per_prompt, row_labels=prompts,
                      title=grid_title).save(grid)
    settings = {"prompts": prompts, "seed": seed, "num_images_per_prompt": num_images_per_prompt,
                "scheduler": type(pipeline.scheduler).__name__, **settings}
    paths = [cells[k] for k in sorted(cells)]
    write_json(out_dir / "samples.json", {**settings, "status": status,
                                           "images": [p.name for p in paths]})
    return SampleResult(paths, grid, status, round(time.monotonic() - started, 2), settings,
                        cells)


def _render(pipeline, prompt: str, cols: list[int], seed: int, settings: dict):
    import torch

    generators = [torch.Generator("cpu").manual_seed(image_seed(seed, c)) for c in cols]
    with torch.inference_mode():
        return pipeline(prompt=prompt, num_images_per_prompt=len(cols), generator=generators,
                        **settings).images


def _chunks(values, size: int) -> list[list[int]]:
    values = list(values)
    return [values[i:i + size] for i in range(0, len(values), size)]


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-") or "prompt"


def write_json(path: Path, data: dict) -> None:
    """A settings or scores file a person can read: indented, UTF-8, ending in a newline;
    written beside and renamed, so a kill leaves the old file or the new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
