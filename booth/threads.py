"""CPU thread settings for torch, chosen once at process start.

torch's OpenMP threads spin while they wait for work. On a machine whose cores are busy with
other programs those spinning threads fight the programs and each other: with two busy
processes on two cores a tiny training step went from 0.17 s to 7 s and a 10-step image from
0.4 s to 25 s, where passive waiting gave 0.4-0.6 s and 1.2-2.2 s (benchmarks/busy_cpu.py).
OpenMP reads its settings once, when torch is imported, so `configure_threads()` must run
before anything imports torch; called later it can still fix the thread count, not the waiting.

The thread count also decides the floating-point summation order, so an exact (bit-identical)
resume needs the same count as the run it continues: `thread_count()` is what to record.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

OVERRIDE = "BOOTH_THREADS"
# The variables a person (or `accelerate launch --num_cpu_threads_per_process`) may have set
# on purpose; when any is set, booth leaves the thread count alone.
USER_COUNT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Most threads booth starts on its own. A team of threads waits for its slowest member, so a
# big team suffers most when other programs take cores; and one count on every machine with
# 4+ cores lets an exact resume move between them. (A judgement: measured on 2 cores only.)
MAX_DEFAULT_THREADS = 4


class ThreadSettingError(ValueError):
    """BOOTH_THREADS holds something that is not a thread count."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset or a container sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def thread_settings(environ: Mapping[str, str] | None = None,
                    cpus: int | None = None) -> dict[str, str]:
    """The environment variables booth adds for OpenMP and MKL (nothing that is already set).

    BOOTH_THREADS=N asks for N threads and wins over everything; BOOTH_THREADS=torch leaves
    torch's own defaults. Otherwise an OMP_NUM_THREADS or MKL_NUM_THREADS already set is kept,
    and without one booth uses min(available CPUs, 4) threads. Waiting threads always sleep
    (OMP_WAIT_POLICY=PASSIVE) unless the environment says otherwise."""
    environ = os.environ if environ is None else environ
    cpus = available_cpus() if cpus is None else cpus
    override = environ.get(OVERRIDE, "").strip()
    if override.lower() == "torch":
        return {}
    settings = {} if "OMP_WAIT_POLICY" in environ else {"OMP_WAIT_POLICY": "PASSIVE"}
    if override:
        count = _parse_count(override)
        return {**settings, "OMP_NUM_THREADS": str(count), "MKL_NUM_THREADS": str(count)}
    if any(environ.get(name) for name in USER_COUNT):
        return settings
    count = str(min(cpus, MAX_DEFAULT_THREADS))
    return {**settings, "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}


def _parse_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ThreadSettingError(
            f"{OVERRIDE} must be a whole number of threads (1 or more) or 'torch' for torch's "
            f"own default, not {text!r}")
    return int(text)


def configure_threads() -> dict[str, str]:
    """Apply `thread_settings` to this process's environment (children inherit it) and, if
    torch is already imported, to torch itself. Returns what it set. Call it once, first thing
    in the process; calling it again changes nothing. Raises ThreadSettingError for a bad
    BOOTH_THREADS, before changing anything."""
    settings = thread_settings(os.environ)
    os.environ.update(settings)
    torch = sys.modules.get("torch")
    if torch is not None and "OMP_NUM_THREADS" in settings:
        # Too late for the wait policy; the count can still be made the same as in children.
        torch.set_num_threads(int(settings["OMP_NUM_THREADS"]))
    return settings


def thread_count() -> int:
    """The number of threads torch uses for its CPU kernels in this process (imports torch).
    An exact resume matches the original run only at the same count."""
    import torch

    return torch.get_num_threads()
