"""How booth's CPU work slows down when other programs keep the cores busy, per thread setting.

Starts N busy processes (pure-Python spin loops that end on their own after a bound, and are
killed at the end anyway), then runs in a fresh process each: a short training of the tiny
model (64 px, UNet + text encoder, prior preservation) and one 10-step generation, under
several thread settings. Prints seconds per training step and per image for each.

    python benchmarks/busy_cpu.py                      # 0 and 2 busy processes, 12 steps
    python benchmarks/busy_cpu.py --busy 0,2,4 --steps 24 --repeat 2
    python benchmarks/busy_cpu.py --env GOMP_SPINCOUNT=10000 --skip "torch default"

Each setting starts a new Python process because OpenMP reads its environment once, when torch
is imported. "booth" is what booth.threads.configure_threads() picks on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Measure this checkout's booth (in the children too), not whichever one is installed.
CHECKOUT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, CHECKOUT)

# The knobs each setting adds to a clean environment (no OMP_*/MKL_*/BOOTH_THREADS).
SETTINGS = {
    "torch default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
           "KMP_BLOCKTIME", "BOOTH_THREADS")
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,2", help="comma-separated busy-process counts")
    parser.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    parser.add_argument("--repeat", type=int, default=1, help="measurements per cell")
    parser.add_argument("--env", action="append", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                        help="one more setting to measure (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="a built-in setting not to measure (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    settings = {**SETTINGS, "booth": booth_choice()}
    settings.update({text: dict(pair.split("=", 1) for pair in text.split(","))
                     for text in args.env})
    settings = {name: extra for name, extra in settings.items() if name not in args.skip}
    with tempfile.TemporaryDirectory() as tmp:
        model, data = prepare(Path(tmp))
        table = {}
        for busy in [int(n) for n in args.busy.split(",")]:
            with busy_processes(busy, seconds=60 + 20 * len(settings) * args.repeat * args.steps):
                for _ in range(args.repeat):  # settings interleaved, so drift hits them all
                    for name, extra in settings.items():
                        job = {"model": model, "data": data, "steps": args.steps,
                               "out": f"{tmp}/run-{busy}-{len(table)}-{time.monotonic_ns()}"}
                        table.setdefault((busy, name), []).append(in_child(job, extra))
    report(args, settings, table)


def booth_choice() -> dict:
    from booth.threads import thread_settings

    clean = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return thread_settings(clean)


def prepare(root: Path) -> tuple[str, str]:
    import numpy as np
    from PIL import Image

    from booth.dreambooth.tiny import save_tiny_model

    model = save_tiny_model(root / "tiny", seed=0)
    rng = np.random.default_rng(0)
    for kind, count in (("instance", 3), ("class", 4)):
        (root / "data" / kind).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                root / "data" / kind / f"{i:04d}.png")
    return str(model), str(root / "data")


class busy_processes:
    """N spin loops for at most `seconds`; all killed on exit, whatever happened."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds, self.children = count, seconds, []

    def __enter__(self):
        code = SPIN.format(seconds=self.seconds)
        self.children = [subprocess.Popen([sys.executable, "-c", code])
                         for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for child in self.children:
            child.kill()
        for child in self.children:
            child.wait()


def in_child(job: dict, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | extra
    env["CUDA_VISIBLE_DEVICES"] = ""  # the question is CPU threads
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [CHECKOUT, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode:
        sys.exit(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, data: str, steps: int, out: str) -> dict:
    """Runs in the child: train `steps` steps, then generate one image; seconds of each."""
    import torch

    from booth.dreambooth.config import TrainConfig
    from booth.dreambooth.loading import load_pipeline
    from booth.dreambooth.trainer import train

    config = TrainConfig(
        base_model=model, output_dir=out, resolution=64, max_train_steps=steps,
        instance_images=[str(p) for p in sorted(Path(data, "instance").iterdir())],
        class_data_dir=str(Path(data, "class")), class_prompt="a photo of a dog",
        learning_rate=1e-4, checkpointing_steps=10**6, report_to="none")
    result = train(config)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    # Step 1 carries one-off costs (allocations, first kernels): time the others.
    step = (rows[-1]["elapsed"] - rows[0]["elapsed"]) / max(1, len(rows) - 1)
    pipeline = load_pipeline(model, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    pipeline("a photo of a dog", num_inference_steps=10, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    return {"s_per_step": step, "s_per_image": time.perf_counter() - started,
            "threads": torch.get_num_threads()}


def report(args, settings: dict, table: dict) -> None:
    print(f"{os.cpu_count()} CPUs; tiny model, 64 px, {args.steps} training steps "
          f"(first step not timed) + one 10-step image; median of {args.repeat}")
    print(f"booth's choice here: {settings['booth'] or 'torch defaults'}")
    width = max(26, *map(len, settings))
    print(f"{'busy':>4}  {'setting':{width}s} {'threads':>7}  {'s/step':>7}  {'s/image':>7}")
    for (busy, name), runs in table.items():
        step = sorted(r["s_per_step"] for r in runs)[len(runs) // 2]
        image = sorted(r["s_per_image"] for r in runs)[len(runs) // 2]
        print(f"{busy:>4}  {name:{width}s} {runs[0]['threads']:>7}  {step:7.3f}  {image:7.3f}")


if __name__ == "__main__":
    main()
