"""Whole benchmark processes, measured the same way whoever wrote them: wall time, peak RSS
(os.wait4) and peak GPU memory (nvidia-smi, polled)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child_env(threads: int, cuda: bool = False) -> dict:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "BOOTH_THREADS"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # both would take a GPU they see
    return env


def run_child(command: list[str], env: dict, cwd: Path) -> dict:
    """Run a whole process; its wall time, its own peak RSS (wait4), its peak GPU memory as
    nvidia-smi sees it (polled; when the child may use CUDA) and its stdout."""
    log = Path(tempfile.mkstemp(prefix="child-", suffix=".log")[1])
    started, started_at = time.monotonic(), time.time()
    with log.open("wb") as stderr:
        child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                 stderr=stderr)
        gpu = GpuPeak(child.pid) if env.get("CUDA_VISIBLE_DEVICES") != "" else None
        stdout = child.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - started
    gpu_mb = gpu.stop() if gpu else None
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"{' '.join(command[:4])} ... failed ({child.returncode}):\n"
                 f"{log.read_text(errors='replace')[-3000:]}")
    log.unlink()
    return {"wall_s": wall, "started_at": started_at, "ended_at": started_at + wall,
            "peak_rss_mb": usage.ru_maxrss / 1024, "peak_gpu_mb": gpu_mb,
            "stdout": stdout}


class GpuPeak:
    """The most GPU memory one process held, from nvidia-smi every 0.2 s (the same method for
    both programs; None without nvidia-smi)."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self.done = pid, None, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory",
                 "--format=csv,noheader,nounits"]
        while not self.done.wait(0.2):
            try:
                text = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in text.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak = max(self.peak or 0.0, float(used))

    def stop(self) -> float | None:
        self.done.set()
        self.thread.join()
        return self.peak
