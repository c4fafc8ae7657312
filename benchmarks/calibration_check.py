"""How honest is a measured estimate? Train 30 steps, ask the approval's estimate for 120 steps
of the same settings, train those 120 steps, and compare (tiny model, this machine).

    python benchmarks/calibration_check.py                  # 64 px, with prior preservation
    python benchmarks/calibration_check.py --resolution 128 --short 30 --long 120
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import subject_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--short", type=int, default=30, help="steps of the calibrating run")
    parser.add_argument("--long", type=int, default=120, help="steps of the estimated run")
    args = parser.parse_args()
    from rich.console import Console

    from booth.tools import ToolContext, get_tool

    with tempfile.TemporaryDirectory() as tmp:
        root, model = make_workspace(Path(tmp), args.resolution)
        ctx = ToolContext.from_options(workspace=str(root), base_model=model,
                                       console=Console(stderr=True, quiet=True))
        tool = get_tool("train")
        call = {"dataset": "rex", "learning_rate": 1e-4, "report_to": "none",
                "checkpointing_steps": 50}
        before = tool.estimate(ctx, tool.validate({**call, "max_train_steps": args.short}))
        tool.run(ctx, {**call, "max_train_steps": args.short, "run_name": "calibrate"})
        planned = tool.validate({**call, "max_train_steps": args.long, "run_name": "measured"})
        line = tool.estimate(ctx, planned)
        estimated = seconds_of(ctx, planned)
        started = time.monotonic()
        tool.call(ctx, planned)
        took = time.monotonic() - started
    print(f"before any run:       {before}")
    print(f"after {args.short} steps:      {line}")
    print(f"{args.long} steps took     {took:.1f} s; estimated {estimated:.1f} s; "
          f"error {100 * (estimated - took) / took:+.0f}%")


def seconds_of(ctx, arguments: dict) -> float:
    """The number behind the estimate's words."""
    from booth.dreambooth.config import TrainConfig
    from booth.tools import estimates
    from booth.tools.train import _setup

    settings = {k: v for k, v in arguments.items() if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**{**settings, "base_model": ctx.base_model,
                            "resolution": arguments.get("resolution") or 64})
    return estimates.training_time(ctx.workspace.root, ctx.base_model, _setup(config),
                                   config.max_train_steps).seconds


def make_workspace(tmp: Path, resolution: int) -> tuple[Path, str]:
    """The tiny model, 3 subject photos and 4 class images, made by booth's own tools."""
    from rich.console import Console

    from booth.dreambooth.tiny import save_tiny_model
    from booth.tools import ToolContext, get_tool

    model = str(save_tiny_model(tmp / "model"))
    root = tmp / "workspace"
    subject_dataset(root, resolution)
    ctx = ToolContext.from_options(workspace=str(root), base_model=model,
                                   console=Console(stderr=True, quiet=True))
    get_tool("generate_priors").run(ctx, {"class_prompt": "a photo of a dog", "num_images": 4,
                                          "resolution": resolution, "num_inference_steps": 2})
    return root, model


if __name__ == "__main__":
    main()
