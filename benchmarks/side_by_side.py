"""booth against diffusers' own DreamBooth script: same model, data and settings, whole processes.

    python benchmarks/side_by_side.py --diffusers-script D/examples/dreambooth/train_dreambooth.py
    python benchmarks/side_by_side.py --resolution 64 --steps 300 --repeats 3 --diffusers-script ...
    python benchmarks/side_by_side.py --steps 20 --class-images 8      # booth alone (no script)

What runs (one temporary workspace, the tiny SD of booth/dreambooth/tiny.py with a
DPMSolverMultistep scheduler config so both generate class images with the same scheduler):
- class images: `booth call generate_priors` against the script's own generation path (the
  script run with an empty class folder, --num_class_images N). Same model, scheduler, 50 steps
  (the script's pipeline default, given to booth), guidance 7.5, the model's own resolution,
  batch, count. Seeds differ in kind (booth seeds each image, the script the global RNG): the
  pixels differ, the work does not. Rate = images after the first batch / seconds between the
  first batch's files and the last file (file mtimes, the same rule for both).
- training: `booth call train` against the script at the same settings: the dataset booth's
  prepare_dataset made and the class images booth made, resolution, text encoder trained,
  prior preservation (weight 1), batch 1 + 1, steps, lr, constant schedule, AdamW defaults,
  grad-norm clip 1, seed, --mixed-precision (fp32), TensorBoard on in both (the script's
  default), the final pipeline exported by both (booth also saves a last checkpoint, so the run
  can be resumed further: part of its fixed cost). Off in both: checkpoints (every 10^6
  steps), validation images (the script without --validation_prompt, booth with
  validation_steps=0), the loss plot and the one-file export (booth's loss_plot=false,
  export_file=false: the script makes neither). Runs alternate booth,
  diffusers, booth, ... (`--repeats`).
  steps/s: each one's own step clock past the first `--warmup` steps: booth's metrics.jsonl
  `elapsed`, the script's TensorBoard wall times of its per-step `loss` scalar.
  Fixed cost = whole-process wall time - steps x per-step time; split into the seconds
  before the first step's TensorBoard log and after the last one (same clock for both).
- peak memory: ru_maxrss of each child from os.wait4; on a GPU also nvidia-smi's figure for
  the child's pid, polled every 0.2 s (the same methods for both).
- floor: one process trains booth's run.yaml (report_to none) and then times the same
  model's bare step on tensors of the same shapes (latents at the VAE's own scale factor),
  `--repeats` times alternated: text encoder forward, UNet forward, MSE,
  backward, grad clip, AdamW step, zero_grad. booth per-step / floor is the loop's overhead.

Both children get the same threads (OMP_NUM_THREADS, OMP_WAIT_POLICY=PASSIVE, booth's own
default) and no network (HF_HUB_OFFLINE=1). The script's torchvision import is served by
benchmarks/diffusers_shim.py, in the diffusers child only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's booth

from children import child_env, run_child  # noqa: E402 - after the path is set
from common import subject_dataset  # noqa: E402
from diffusers_shim import write_shim  # noqa: E402

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"
GEN_STEPS, GUIDANCE = 50, 7.5  # the script's pipeline(prompt) defaults
ROOT = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", type=Path, help="examples/dreambooth/"
                        "train_dreambooth.py of a diffusers checkout (without: booth alone)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steps/s")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--class-images", type=int, default=12)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--gen-steps", type=int, default=GEN_STEPS,
                        help="booth's denoising steps (alone only: the script always runs 50)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    parser.add_argument("--booth-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra train argument for booth (e.g. to turn validation off)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # the floor child
    return parser


PARSER_DEFAULTS = make_parser().parse_args([])


def main() -> None:
    args = make_parser().parse_args()
    if args.floor:
        print(json.dumps(floor_child(args.floor, args.warmup, args.repeats)))
        return
    script = args.diffusers_script
    if script is None:
        print("no --diffusers-script given: measuring booth alone (diffusers' examples are not "
              "in its PyPI package; pass examples/dreambooth/train_dreambooth.py of a checkout)")
    elif not script.is_file():
        sys.exit(f"--diffusers-script {script}: no such file")
    elif args.gen_steps != GEN_STEPS:
        sys.exit(f"--gen-steps: the script's class images take {GEN_STEPS} steps; so must booth's")
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        bench = Bench(Path(tmp), args)
        results = {"generation": [] if args.skip_generation else bench.generation(),
                   "training": bench.training()}
        results["floor"] = bench.floor()
    report(args, results)


def options(**changes) -> argparse.Namespace:
    """The command line's settings with `changes`, for a caller (gpu_check.py) to use Bench."""
    return argparse.Namespace(**{**vars(PARSER_DEFAULTS), **changes})


class Bench:
    def __init__(self, root: Path, args, model: str | None = None):
        self.root, self.args = root, args
        self.model = model or str(dpm_model(root / "model"))
        self.workspace = root / "ws"
        subject_dataset(self.workspace, args.resolution, name="rex", count=3)
        self.env = child_env(args.threads, cuda=args.device == "cuda")
        # The class images the training of both uses: booth's, made once, untimed.
        self.booth_call(self.workspace, "generate_priors", self.gen_arguments(args.class_images))
        self.class_dir = images_only(next((self.workspace / "priors").iterdir()),
                                     root / "class-images")
        self.booth_run = None

    def gen_arguments(self, count: int) -> dict:
        from booth.dreambooth.priors import natural_resolution

        return {"class_prompt": CLASS_PROMPT, "num_images": count,
                "batch_size": self.args.gen_batch, "num_inference_steps": self.args.gen_steps,
                "guidance_scale": GUIDANCE, "resolution": natural_resolution(self.model)}

    def booth_call(self, workspace: Path, tool: str, arguments: dict) -> dict:
        command = [sys.executable, "-m", "booth.cli", "-w", str(workspace), "--base-model",
                   self.model, "call", tool, json.dumps(arguments)]
        return run_child(command, self.env, cwd=ROOT)

    def generation(self) -> list[dict]:
        rows = []
        for i in range(self.args.repeats):
            workspace = self.root / f"gen-booth-{i}"
            run = self.booth_call(workspace, "generate_priors",
                                  self.gen_arguments(self.args.class_images))
            rows.append({"who": "booth", **run,
                         "images_per_s": image_rate(next((workspace / "priors").iterdir()),
                                                    self.args.gen_batch)})
            if self.args.diffusers_script:
                folder = self.root / f"gen-diffusers-{i}"
                run = self.diffusers(folder, steps=1, num_class_images=self.args.class_images)
                rows.append({"who": "diffusers", **run,
                             "images_per_s": image_rate(folder / "class", self.args.gen_batch)})
        return rows

    def training(self) -> list[dict]:
        rows = []
        for i in range(self.args.repeats):
            run_name = f"bench-{i}"
            arguments = {"dataset": "rex", "max_train_steps": self.args.steps,
                         "learning_rate": self.args.learning_rate, "seed": 0,
                         "resolution": self.args.resolution, "class_prompt": CLASS_PROMPT,
                         "prior_loss_weight": 1.0, "train_text_encoder": True,
                         "checkpointing_steps": 10**6, "report_to": "tensorboard",
                         "mixed_precision": self.args.mixed_precision,
                         # What the script does not do: validation images (none without a
                         # prompt), a loss plot, a one-file export.
                         "validation_steps": 0, "loss_plot": False, "export_file": False,
                         "run_name": run_name, **dict(parse_pair(p) for p in self.args.booth_arg)}
            run = self.booth_call(self.workspace, "train", arguments)
            self.booth_run = self.workspace / "runs" / run_name
            per_step = booth_per_step(self.booth_run / "metrics.jsonl", self.args.warmup)
            rows.append({"who": "booth", **run, "per_step": per_step,
                         **ends(run, logged_steps(self.booth_run))})
            if self.args.diffusers_script:
                folder = self.root / f"train-diffusers-{i}"
                run = self.diffusers(folder, steps=self.args.steps,
                                     class_dir=self.class_dir,
                                     num_class_images=len(list(self.class_dir.iterdir())))
                walls = logged_steps(folder / "out")
                rows.append({"who": "diffusers", **run, "per_step": per_step_of(walls,
                                                                            self.args.warmup),
                             **ends(run, walls)})
        for row in rows:
            row["fixed_s"] = row["wall_s"] - self.args.steps * row["per_step"]
        return rows

    def diffusers(self, folder: Path, steps: int, num_class_images: int,
                  class_dir: Path | None = None) -> dict:
        runner = write_shim(self.root / "shim")
        env = {**self.env, "PYTHONPATH": str(runner.parent)}
        class_dir = class_dir or folder / "class"
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, str(runner), str(self.args.diffusers_script.resolve()),
            "--pretrained_model_name_or_path", self.model,
            "--instance_data_dir", str(self.workspace / "datasets" / "rex" / "images"),
            "--class_data_dir", str(class_dir), "--output_dir", str(folder / "out"),
            "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
            "--with_prior_preservation", "--prior_loss_weight", "1.0",
            "--num_class_images", str(num_class_images),
            "--sample_batch_size", str(self.args.gen_batch),
            "--resolution", str(self.args.resolution), "--center_crop", "--train_text_encoder",
            "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--learning_rate", str(self.args.learning_rate), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--max_grad_norm", "1.0", "--seed", "0",
            "--checkpointing_steps", str(10**6),
            "--mixed_precision", self.args.mixed_precision,
            "--report_to", "tensorboard",
        ]
        return run_child(command, env, cwd=folder)

    def floor(self) -> dict | None:
        if self.booth_run is None:
            return None
        command = [sys.executable, __file__, "--floor", str(self.booth_run / "run.yaml"),
                   "--warmup", str(self.args.warmup), "--repeats", str(self.args.repeats)]
        run = run_child(command, self.env, cwd=ROOT)
        return json.loads(run["stdout"].strip().splitlines()[-1])


# --- the children ------------------------------------------------------------------------------


def floor_child(run_yaml: Path, warmup: int, repeats: int) -> dict:
    """booth's loop on its own run.yaml, then the bare step of the same model, one process."""
    import dataclasses

    from booth.dreambooth.config import load_config
    from booth.dreambooth.trainer import train

    booth, floor = [], []
    for _ in range(repeats):  # alternated, as the processes are
        with tempfile.TemporaryDirectory() as tmp:
            config = dataclasses.replace(load_config(run_yaml), output_dir=f"{tmp}/run",
                                         report_to="none", checkpointing_steps=10**6)
            result = train(config)
            booth.append(booth_per_step(result.run_dir / "metrics.jsonl", warmup))
        floor.append(bare_step(config, warmup))
    return {"booth_per_step": statistics.median(booth),
            "floor_per_step": statistics.median(floor)}


def bare_step(config, warmup: int) -> float:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = config.base_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet").to(device).train()
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").to(device)
    text_encoder.train()
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2,
                                  fused=device == "cuda")  # as booth's make_optimizer
    torch.manual_seed(0)
    vae = AutoencoderKL.load_config(source, subfolder="vae")  # the latents' size, not weights
    side = config.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    latents = torch.randn(2, unet.config.in_channels, side, side, device=device)
    noise = torch.randn_like(latents)
    ids = tokenizer([config.instance_prompt, config.class_prompt], padding="max_length",
                    truncation=True, max_length=text_encoder.config.max_position_embeddings,
                    return_tensors="pt").input_ids.to(device)
    timesteps = torch.tensor([10, 500], device=device)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    autocast = torch.autocast(device, dtype=low, enabled=low is not None)
    stamps = []
    for _ in range(config.max_train_steps):
        with autocast:  # fp32 weights, low-precision compute: what accelerate does
            hidden = text_encoder(ids)[0]
            prediction = unet(latents, timesteps, hidden, return_dict=False)[0].float()
        loss = F.mse_loss(prediction[:1], noise[:1]) + F.mse_loss(prediction[1:], noise[1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.monotonic())
    return (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)


# --- reading what each wrote -------------------------------------------------------------------


def dpm_model(folder: Path) -> Path:
    """The tiny SD with a DPMSolverMultistep scheduler config: the script's class images then
    use the scheduler booth's do. Training reads it as DDPM in both (the same beta schedule)."""
    from diffusers import DPMSolverMultistepScheduler

    from booth.dreambooth.tiny import save_tiny_model

    save_tiny_model(folder)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.save_config(folder / "scheduler")
    return folder


def images_only(prior_folder: Path, dest: Path) -> Path:
    """The image files of a booth prior set (the script counts every file as an image)."""
    import shutil

    dest.mkdir()
    for path in sorted(prior_folder.iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            shutil.copy2(path, dest / path.name)
    return dest


def image_rate(folder: Path, batch: int) -> float | None:
    times = sorted(p.stat().st_mtime for p in folder.iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(times) <= batch:
        return None
    return (len(times) - batch) / (times[-1] - times[batch - 1])


def booth_per_step(metrics: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return (rows[-1]["elapsed"] - rows[warmup - 1]["elapsed"]) / (len(rows) - warmup)


def logged_steps(run_dir: Path) -> dict[int, float]:
    """{step: wall clock} of the `loss` scalars a run logged to TensorBoard (the last per
    step: the script logs once per micro-batch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.glob("logs/**/events.out.tfevents*"))
    if not events:
        sys.exit(f"no TensorBoard events under {run_dir / 'logs'}")
    accumulator = EventAccumulator(str(events[-1].parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {e.step: e.wall_time for e in accumulator.Scalars("loss")}


def per_step_of(walls: dict[int, float], warmup: int) -> float:
    steps = sorted(walls)
    return (walls[steps[-1]] - walls[steps[warmup - 1]]) / (len(steps) - warmup)


def ends(run: dict, walls: dict[int, float]) -> dict:
    """Seconds from the process's start to its first logged step (imports, loading, caching,
    that step) and from its last logged step to its exit (export), on the same clock for both
    (TensorBoard's wall times; booth's are logged when its losses are read)."""
    return {"start_s": walls[min(walls)] - run["started_at"],
            "end_s": run["ended_at"] - walls[max(walls)]}


def parse_pair(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# --- the table ---------------------------------------------------------------------------------


def report(args, results: dict) -> None:
    precision = {"no": "fp32"}.get(args.mixed_precision, args.mixed_precision)
    print(f"{args.resolution} px, {args.steps} steps ({args.warmup} warm-up left out of "
          f"steps/s), text encoder + priors, batch 1+1, {precision}, {args.threads} threads, "
          f"{args.repeats} repeat(s) alternated; medians")
    if results["generation"]:
        print(f"class images: {args.class_images} at {args.gen_steps} DPM steps, batch "
              f"{args.gen_batch}")
        _compare(results["generation"], [("images/s", "images_per_s", True)])
    print("training:")
    _compare(results["training"], [("steps/s", "steps_per_s", True),
                                   ("wall s", "wall_s", False), ("fixed s", "fixed_s", False),
                                   ("to step 1 s", "start_s", False),
                                   ("after last s", "end_s", False),
                                   ("peak RSS MB", "peak_rss_mb", False),
                                   ("peak GPU MB", "peak_gpu_mb", False)])
    floor = results["floor"]
    if floor:
        print(f"floor (same process): booth {floor['booth_per_step']:.4f} s/step, bare step "
              f"{floor['floor_per_step']:.4f} s/step: booth / floor = "
              f"{floor['booth_per_step'] / floor['floor_per_step']:.2f}x")


def _compare(rows: list[dict], columns: list[tuple[str, str, bool]]) -> None:
    for row in rows:
        if "per_step" in row:
            row["steps_per_s"] = 1 / row["per_step"]
    who = sorted({row["who"] for row in rows}, key=["booth", "diffusers"].index)
    medians = {w: {key: _median([r.get(key) for r in rows if r["who"] == w])
                   for _, key, _ in columns} for w in who}
    for label, key, _ in columns:
        if all(medians[w][key] is None for w in who):
            continue  # not measured here (GPU memory on a CPU)
        cells = "  ".join(f"{w} {_fmt(medians[w][key])}" for w in who)
        ratio = ""
        if len(who) == 2 and medians["booth"][key] and medians["diffusers"][key]:
            ratio = f"  booth/diffusers x{medians['booth'][key] / medians['diffusers'][key]:.2f}"
        print(f"  {label:12} {cells}{ratio}")


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
