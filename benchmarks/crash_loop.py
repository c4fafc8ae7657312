"""Kill-anywhere crash loop: training processes SIGKILLed at the worst moments, then resumed.

Each run is started with `booth call train`, killed, continued with `booth call
resume_checkpoint`, killed again, ... and finally finished; its metrics and final weights are
then compared with a run of the same settings that was never stopped. Kill points, in turn:
before the first checkpoint, while a checkpoint is being written (a `.tmp-checkpoint-*`
folder exists), while the final model is being written, and at a random moment.
Nothing outside the workspace may change (a canary folder beside it is compared), and no
process may end with a Python traceback.

    python benchmarks/crash_loop.py                 # 4 runs x 6 kills (~5 min on 2 cores)
    python benchmarks/crash_loop.py --runs 1 --kills 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import subject_dataset

STEPS, EVERY = 24, 5  # steps per run, checkpointing_steps: 4 checkpoints and a final export
KINDS = ("before_first_checkpoint", "during_checkpoint_write", "during_export", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--kills", type=int, default=6, help="kills per run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # resume is exact at one thread count
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, workspace, canary = setup(root)
        before = snapshot(canary)
        reference = train_straight(workspace, model)
        results = [crash_run(workspace, model, f"crash-{i}", args.kills, rng)
                   for i in range(args.runs)]
        changed_outside = snapshot(canary) != before or stray_files(root, workspace, canary)
    report(results, reference, changed_outside)


def setup(root: Path) -> tuple[str, Path, Path]:
    from booth.dreambooth.tiny import save_tiny_model

    model = str(save_tiny_model(root / "model"))
    workspace = root / "workspace"
    subject_dataset(workspace, 64, seed=5)
    canary = root / "outside"
    canary.mkdir()
    (canary / "keep.txt").write_text("must not change\n")
    return model, workspace, canary


def booth_call(workspace: Path, model: str, tool: str, *words: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "booth.cli", "-w", str(workspace), "--base-model", model,
               "call", tool, *words]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def train_words(name: str) -> list[str]:
    return ["dataset=rex", f"max_train_steps={STEPS}", "learning_rate=1e-3",
            "prior_loss_weight=0", f"checkpointing_steps={EVERY}", "report_to=none", "seed=3",
            f"run_name={name}"]


def train_straight(workspace: Path, model: str) -> dict:
    child = booth_call(workspace, model, "train", *train_words("straight"))
    _, err = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{err}")
    return outcome(workspace / "runs" / "straight")


def crash_run(workspace: Path, model: str, name: str, kills: int, rng: random.Random) -> dict:
    run_dir = workspace / "runs" / name
    kinds, tracebacks, started = [], [], False
    for index in range(kills):
        kind = KINDS[index % len(KINDS)] if index < len(KINDS) else rng.choice(KINDS)
        if started:
            child = booth_call(workspace, model, "resume_checkpoint", f"run={name}")
        else:
            child = booth_call(workspace, model, "train", *train_words(name))
        started = True
        killed = kill_at(child, run_dir, kind, rng)
        err = child.stderr.read()
        if "Traceback" in err:
            tracebacks.append(err[err.index("Traceback"):][-1500:])
        kinds.append(kind if killed else f"{kind} (finished before the kill)")
        if not killed and child.returncode == 0:
            break
    while not (run_dir / "final").is_dir():  # finish it
        child = booth_call(workspace, model, "resume_checkpoint", f"run={name}")
        _, err = child.communicate()
        if "Traceback" in err:
            tracebacks.append(err[err.index("Traceback"):][-1500:])
        if child.returncode != 0:
            return {"name": name, "kills": kinds, "tracebacks": tracebacks, "error": err[-800:]}
    return {"name": name, "kills": kinds, "tracebacks": tracebacks, **outcome(run_dir)}


def kill_at(child: subprocess.Popen, run_dir: Path, kind: str, rng: random.Random) -> bool:
    """SIGKILL `child` at the moment `kind` names; False if it ended first."""
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 300
    delay = time.monotonic() + rng.uniform(1.5, 6)

    def moment() -> bool:
        if kind == "before_first_checkpoint":
            return metrics_lines(run_dir) >= 1 and not any(checkpoints.glob("checkpoint-*"))
        if kind == "during_checkpoint_write":
            return any(checkpoints.glob(".tmp-checkpoint-*"))
        if kind == "during_export":
            return (run_dir / ".tmp-final").exists()
        return time.monotonic() >= delay

    while child.poll() is None and time.monotonic() < deadline:
        if moment():
            child.send_signal(signal.SIGKILL)
            child.wait()
            return True
        time.sleep(0.002)
    child.wait()
    return False


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def outcome(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"], r["lr"]) for r in rows]
    digest = hashlib.sha256()
    for file in sorted((run_dir / "final").rglob("*.safetensors")):
        for key, tensor in sorted(load_file(str(file)).items()):
            digest.update(key.encode())
            digest.update(tensor.numpy().tobytes())
    return {"losses": losses, "weights": digest.hexdigest()}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def stray_files(root: Path, workspace: Path, canary: Path) -> list[str]:
    """Files the runs created outside the workspace (the model and canary were made here)."""
    allowed = (workspace, canary, root / "model", root / "photos-rex")
    return [str(p) for p in root.rglob("*")
            if p.is_file() and not any(a == p or a in p.parents for a in allowed)]


def report(results: list[dict], reference: dict, changed_outside) -> None:
    kills = sum(not k.endswith("(finished before the kill)") for r in results for k in r["kills"])
    print(f"{'run':10} {'kills':>5} {'losses':>10} {'weights':>8}  kill points")
    identical = 0
    for r in results:
        same_losses = r.get("losses") == reference["losses"]
        same_weights = r.get("weights") == reference["weights"]
        identical += same_losses and same_weights
        print(f"{r['name']:10} {len(r['kills']):>5} {'same' if same_losses else 'DIFFER':>10} "
              f"{'same' if same_weights else 'DIFFER':>8}  {', '.join(r['kills'])}")
        if "error" in r:
            print(f"  failed to finish: {r['error']}")
        for text in r["tracebacks"]:
            print(f"  traceback:\n{text}")
    print(f"\nkills {kills}; runs resumed with identical losses and weights "
          f"{identical}/{len(results)}; tracebacks {sum(len(r['tracebacks']) for r in results)}; "
          f"changed outside the workspace {len(changed_outside) if changed_outside else 0}")


if __name__ == "__main__":
    main()
