"""benchmarks/gpu_check.py cannot rot while no GPU is at hand: its smoke mode runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_gpu_check_smoke_mode_trains_two_rungs_a_speed_option_and_resumes_exactly():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "device: cpu"
    rungs = [line for line in lines if line.endswith("completed")]
    assert len(rungs) == 2, done.stdout
    compiled = [line for line in lines if line.startswith("full, text encoder, bf16 + compile")]
    assert len(compiled) == 1 and "completed (first step" in compiled[0], done.stdout
    assert "booth vs diffusers: skipped (no --diffusers-script PATH given)" in lines
    assert "resume after a stop: bit-identical (6 steps)" in done.stdout


def test_without_a_gpu_the_full_check_says_how_to_smoke_test():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "--smoke" in done.stderr
