"""What this machine measured, so that time estimates come from measurements, not tables.

Every training run, prior generation and sampling records its throughput in
`<workspace>/calibration.json`: seconds per unit of work (an optimizer step, or one image
times one denoising step) and the fixed seconds around it (loading, caching, export), keyed
by what decides them: the device, the model, the resolution, the examples per step, the
precision, text-encoder training and LoRA. An estimate uses the nearest comparable entry
(same kind of work, device, model, precision, text encoder and LoRA), scaled to the asked
resolution and batch, and says "measured"; with nothing comparable it falls back to the
caller's table and says "rough guess".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FILE = "calibration.json"
VERSION = 1
PIXEL_EXPONENT = 0.8  # time grows a little slower than pixels (64 -> 128 px on CPU, measured)
_KEEP = 200  # entries kept, newest first: a workspace used for years stays small


@dataclass(frozen=True)
class Setup:
    """What decides the speed of one kind of work."""

    kind: str             # "train" (unit: optimizer step) or "generate" (image x step)
    device: str           # e.g. "cpu (2 threads)", "cuda (NVIDIA H200)"
    model: str            # priors.model_id: the model's files, wherever they are
    resolution: int
    examples: int = 1     # images per optimizer step (batch x accumulation x 2 with priors)
    precision: str = "no"
    text_encoder: bool = False
    lora: bool = False

    def comparable(self, other: Setup) -> bool:
        keys = ("kind", "device", "model", "precision", "text_encoder", "lora")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str  # "measured" or "rough guess"

    def words(self, where: str) -> str:
        from booth.tools.estimates import duration

        return f"~{duration(self.seconds)} on {where} ({self.source})"


def record(workspace_root: Path, setup: Setup, units: float, unit_seconds: float,
           fixed_seconds: float, peak_memory: float | None = None) -> None:
    """Store what one run measured (`unit_seconds` per unit over `units` units, and the GPU's
    peak bytes when there was one); the entry of the same setup is replaced. Never fails the
    tool: a workspace where the file cannot be written keeps no entry."""
    if units <= 0 or unit_seconds <= 0:
        return
    entry = {**asdict(setup), "per_unit": unit_seconds / units, "fixed": max(fixed_seconds, 0),
             "units": units, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if peak_memory:
        entry["peak_memory"] = peak_memory
    entries = [e for e in _read(workspace_root) if _setup(e) != setup]
    path = Path(workspace_root) / FILE
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": VERSION, "entries": [entry, *entries][:_KEEP]},
                                  indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def estimate(workspace_root: Path, setup: Setup, units: float, guess_per_unit: float,
             guess_fixed: float) -> Estimate:
    """Seconds for `units` units of `setup`: from the nearest comparable measurement, scaled,
    or from the caller's guess when this machine measured nothing comparable."""
    candidates = [(e, _setup(e)) for e in _read(workspace_root)]
    candidates = [(e, s) for e, s in candidates if s is not None and s.comparable(setup)]
    if not candidates:
        return Estimate(guess_fixed + units * guess_per_unit, "rough guess")
    entry, measured = min(candidates, key=lambda c: _distance(c[1], setup))
    scale = ((setup.resolution / measured.resolution) ** 2) ** PIXEL_EXPONENT
    scale *= setup.examples / measured.examples
    return Estimate(entry["fixed"] + units * entry["per_unit"] * scale, "measured")


def newest(workspace_root: Path, kind: str) -> dict | None:
    """The newest entry of this kind of work, or None (entries are kept newest first)."""
    return next((e for e in _read(workspace_root) if e["kind"] == kind), None)


def measured_peak(workspace_root: Path, setup: Setup) -> float | None:
    """The GPU peak a run of exactly this setup reached here, if one was measured."""
    for entry in _read(workspace_root):
        if _setup(entry) == setup and isinstance(entry.get("peak_memory"), (int, float)):
            return float(entry["peak_memory"])
    return None


def _distance(measured: Setup, wanted: Setup) -> tuple:
    return (abs(measured.resolution - wanted.resolution), abs(measured.examples - wanted.examples))


def _setup(entry: dict) -> Setup | None:
    try:
        return Setup(**{f.name: entry[f.name] for f in fields(Setup)})
    except (KeyError, TypeError):
        return None


def _read(workspace_root: Path) -> list[dict]:
    """The entries on file; a missing, damaged or foreign file counts as none."""
    try:
        data = json.loads((Path(workspace_root) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []
    number = (int, float)
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("per_unit"), number)
            and isinstance(e.get("fixed"), number) and _setup(e) is not None]
