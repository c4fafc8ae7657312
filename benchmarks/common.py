"""What the benchmarks share: a subject dataset made the way a user makes one."""

from __future__ import annotations

from pathlib import Path


def subject_dataset(workspace: Path, resolution: int, name: str = "rex", count: int = 3,
                    seed: int = 0) -> str:
    """`count` random photos prepared by booth's own prepare_dataset tool into dataset
    `name` of `workspace` (the photos sit beside the workspace, as a user's would)."""
    import numpy as np
    from PIL import Image
    from rich.console import Console

    from booth.tools import ToolContext, get_tool

    photos = Path(workspace).parent / f"photos-{name}"
    photos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{name}_{i + 1:02d}.png")
    ctx = ToolContext.from_options(workspace=str(workspace),
                                   console=Console(stderr=True, quiet=True))
    get_tool("prepare_dataset").run(ctx, {"images_dir": str(photos), "class_noun": "dog",
                                          "resolution": resolution, "name": name})
    return name
