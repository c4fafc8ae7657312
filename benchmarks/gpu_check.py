"""The first thing to run on a machine with a GPU: booth's memory plans and speed, measured.

It builds a Stable Diffusion 1.5-shaped model with random weights from the real configs (no
download), trains each rung of the memory ladder at 512 px for a few steps through booth's
own train tool, then the opt-in speed options (TF32, torch.compile of the UNet: its payoff
and its compile time) and, given `--diffusers-script`, booth against diffusers'
train_dreambooth.py at 512 px in bf16 (benchmarks/side_by_side.py, whole processes). One
table: the plan's memory, the measured peak (torch.cuda.max_memory_allocated; nvidia-smi for
the side-by-side) and steps/s. Then it checks that a run stopped and resumed on the GPU logs
the very same losses as one that never stopped.

    python benchmarks/gpu_check.py --diffusers-script D/examples/dreambooth/train_dreambooth.py
    python benchmarks/gpu_check.py                      # booth only (~6 min on an H100)
    python benchmarks/gpu_check.py --smoke              # the tiny model on the CPU (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's booth

import side_by_side  # noqa: E402 - after the path is set
from common import subject_dataset  # noqa: E402

RUNGS = [  # (name, settings): the ladder of booth.tools.memory, as train arguments
    ("full, text encoder, fp32", {}),
    ("fp16 + checkpointing + 8-bit Adam", {"mixed_precision": "fp16",
                                           "gradient_checkpointing": True,
                                           "use_8bit_adam": True}),
    ("the same, no text encoder", {"mixed_precision": "fp16", "gradient_checkpointing": True,
                                   "use_8bit_adam": True, "train_text_encoder": False}),
    ("LoRA, fp16", {"mixed_precision": "fp16", "use_lora": True, "train_text_encoder": False,
                    "learning_rate": 1e-4}),
    ("full, text encoder, bf16", {"mixed_precision": "bf16"}),
]
SPEED = [  # (name, config fields no tool call sets): each option's payoff, measured
    ("full, text encoder, fp32 + TF32", {"allow_tf32": True}),
    ("full, text encoder, bf16 + compile", {"mixed_precision": "bf16", "compile_unet": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 3 steps")
    parser.add_argument("--steps", type=int, default=12, help="steps per rung")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--diffusers-script", type=Path, help="examples/dreambooth/"
                        "train_dreambooth.py of a diffusers checkout, for the side-by-side")
    args = parser.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke for the CPU smoke test")
    steps = 3 if args.smoke else args.steps
    resolution = 64 if args.smoke else args.resolution
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", tiny=args.smoke)
        rows = [measure(Path(tmp), model, name, settings, steps, resolution, index)
                for index, (name, settings) in enumerate(RUNGS[:2] if args.smoke else RUNGS)]
        rows += [speed_option(Path(tmp), model, name, fields, steps, resolution, index)
                 for index, (name, fields) in enumerate(SPEED[1:] if args.smoke else SPEED)]
        side, note = against_diffusers(Path(tmp), model, args, steps, resolution)
        exact = resume_is_exact(Path(tmp), model, resolution, smoke=args.smoke)
    report(rows + side, exact, torch, note)


def build_model(folder: Path, tiny: bool) -> str:
    """SD-1.5's own architecture with random weights (or the tiny model for --smoke)."""
    from booth.dreambooth.tiny import save_tiny_model

    if tiny:
        return str(save_tiny_model(folder))
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from booth.dreambooth.tiny import build_tiny_pipeline

    tiny_parts = build_tiny_pipeline()  # its tokenizer and scheduler serve as they are
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tiny_parts.tokenizer.bos_token_id,
        eos_token_id=tiny_parts.tokenizer.eos_token_id,
        pad_token_id=tiny_parts.tokenizer.pad_token_id))
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_parts.tokenizer,
        scheduler=tiny_parts.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def workspace_for(root: Path, resolution: int) -> Path:
    workspace = root / "workspace"
    if not (workspace / "datasets" / "subject").is_dir():
        subject_dataset(workspace, resolution, name="subject", count=4)
    return workspace


def measure(root: Path, model: str, name: str, settings: dict, steps: int, resolution: int,
            index: int | str) -> dict:
    """One rung: the plan's figure, then a real run's peak and speed."""
    from rich.console import Console

    from booth.tools import ToolContext, get_tool
    from booth.tools.memory import GB, parameter_counts
    from booth.tools.train import _memory_plan, _planned_config

    ctx = ToolContext.from_options(workspace=str(workspace_for(root, resolution)),
                                   base_model=model, console=Console(stderr=True, quiet=True))
    tool = get_tool("train")
    run = index if isinstance(index, str) else f"rung-{index}"
    call = tool.validate({"dataset": "subject", "max_train_steps": steps, "learning_rate": 5e-6,
                          "prior_loss_weight": 0, "report_to": "none", "validation_steps": 0,
                          "checkpointing_steps": 10_000, "run_name": run,
                          **settings})
    config = _planned_config(ctx, call)
    ctx.free_gpu_memory = lambda: float("inf")  # the plan's own figure, not a verdict
    plan = _memory_plan(ctx, config)
    planned = plan.needed / GB if plan else None
    started = time.monotonic()
    try:
        result = tool.call(ctx, call)
    except Exception as error:  # a rung that fails is a finding, not the end of the check
        return {"rung": name, "planned_gb": planned, "error": f"{type(error).__name__}: "
                f"{str(error)[:120]}"}
    peak = _peak(root, ctx)
    per_step = _loop_seconds(ctx, run) / max(steps - 1, 1)
    return {"rung": name, "planned_gb": planned, "peak_gb": peak / GB if peak else None,
            "steps_per_s": 1 / per_step if per_step else None, "status": result["status"],
            "seconds": round(time.monotonic() - started, 1),
            "first_step_s": _first_step(ctx, run),
            "unet_params_m": parameter_counts(model)["unet"] / 1e6}


def _peak(root: Path, ctx) -> float | None:
    entries = json.loads((ctx.workspace.root / "calibration.json").read_text())["entries"]
    return entries[0].get("peak_memory")


def _first_step(ctx, run: str) -> float | None:
    lines = (ctx.workspace.run_dir(run) / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[0])["elapsed"] if lines else None


def _loop_seconds(ctx, run: str) -> float:
    """Seconds between the first and last logged step: the steady speed, warm-up left out."""
    rows = [json.loads(line) for line in
            (ctx.workspace.run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["elapsed"] - rows[0]["elapsed"] if len(rows) > 1 else 0.0


def speed_option(root: Path, model: str, name: str, fields: dict, steps: int,
                 resolution: int, index: int) -> dict:
    """A rung with config fields the train tool does not expose (added to the config it
    builds); the first step's seconds show what compiling costs."""
    import dataclasses

    from booth.dreambooth import trainer

    plain = trainer.train

    def with_fields(config, **kwargs):
        return plain(dataclasses.replace(config, **fields), **kwargs)

    trainer.train = with_fields
    try:
        row = measure(root, model, name, {}, steps, resolution, f"speed-{index}")
    finally:
        trainer.train = plain
    if row.get("first_step_s") is not None:
        row["status"] = f"{row['status']} (first step {row['first_step_s']:.1f} s)"
    return row


def against_diffusers(root: Path, model: str, args, steps: int,
                      resolution: int) -> tuple[list[dict], str]:
    """booth vs diffusers' script at the same settings (bf16 on a GPU, fp32 on the CPU):
    table rows and a line saying the ratio (or why it was skipped)."""
    if args.diffusers_script is None:
        return [], "booth vs diffusers: skipped (no --diffusers-script PATH given)"
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    options = side_by_side.options(
        diffusers_script=args.diffusers_script, resolution=resolution,
        steps=max(steps, 6) if args.smoke else 30, warmup=2 if args.smoke else 5,
        class_images=4, gen_batch=4, mixed_precision="bf16" if cuda else "no",
        device="cuda" if cuda else "cpu")
    bench = side_by_side.Bench(root / "side-by-side", options, model=model)
    rows, runs = [], bench.training()
    for run in runs:
        gpu = run.get("peak_gpu_mb")
        precision = {"no": "fp32"}.get(options.mixed_precision, options.mixed_precision)
        rows.append({"rung": f"{run['who']} side by side, {resolution} px {precision}",
                     "peak_gb": gpu / 1024 if gpu else None,
                     "steps_per_s": 1 / run["per_step"],
                     "status": f"whole process {run['wall_s']:.0f} s"})
    booth, diffusers = rows[0], rows[1]
    note = (f"booth vs diffusers: x{booth['steps_per_s'] / diffusers['steps_per_s']:.2f} "
            f"steps/s, x{runs[0]['wall_s'] / runs[1]['wall_s']:.2f} wall time")
    if booth["peak_gb"] and diffusers["peak_gb"]:
        note += f", x{booth['peak_gb'] / diffusers['peak_gb']:.2f} peak GPU memory"
    return rows, note


def resume_is_exact(root: Path, model: str, resolution: int, smoke: bool) -> str:
    """6 steps straight against 3 + resume 3: the same losses, bit for bit?"""
    from rich.console import Console

    from booth.tools import ToolContext, get_tool

    ctx = ToolContext.from_options(workspace=str(workspace_for(root, resolution)),
                                   base_model=model, console=Console(stderr=True, quiet=True))
    settings = {"dataset": "subject", "learning_rate": 5e-6, "prior_loss_weight": 0,
                "report_to": "none", "checkpointing_steps": 3, "validation_steps": 0,
                **({} if smoke else {"mixed_precision": "bf16"})}
    get_tool("train").run(ctx, {**settings, "max_train_steps": 6, "run_name": "straight"})
    get_tool("train").run(ctx, {**settings, "max_train_steps": 3, "run_name": "stopped"})
    get_tool("resume_checkpoint").run(ctx, {"run": "stopped", "max_train_steps": 6})

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in
                (ctx.workspace.run_dir(run) / "metrics.jsonl").read_text().splitlines()]

    same = losses("straight") == losses("stopped")
    return f"{'bit-identical' if same else 'DIFFERENT'} ({len(losses('straight'))} steps)"


def report(rows: list[dict], exact: str, torch, note: str) -> None:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device: {device}")
    print(f"{'rung':36} {'plan GB':>8} {'peak GB':>8} {'steps/s':>8}  status")
    for row in rows:
        print(f"{row['rung']:36} {_cell(row, 'planned_gb'):>8} {_cell(row, 'peak_gb'):>8} "
              f"{_cell(row, 'steps_per_s', 2):>8}  {row.get('status') or row.get('error')}")
    print(note)
    print(f"resume after a stop: {exact}")


def _cell(row: dict, key: str, digits: int = 1) -> str:
    value = row.get(key)
    return f"{value:.{digits}f}" if isinstance(value, float) else "-"


if __name__ == "__main__":
    main()
