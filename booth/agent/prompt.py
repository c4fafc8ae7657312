"""The system prompt: booth/prompts/system.md filled with the actual state of the workspace.

The model plans from facts (which datasets, prior sets, runs and checkpoints exist, on which
device) rather than guesses. Every file is read defensively: a broken manifest is reported
as "unreadable" and never stops a chat from starting.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any


def load_template(name: str = "system.md") -> str:
    """A prompt template shipped in the booth.prompts package."""
    return resources.files("booth.prompts").joinpath(name).read_text(encoding="utf-8")


def build_system_prompt(ctx, today: date | None = None, device: str | None = None) -> str:
    """The system prompt for a session working in `ctx.workspace` with `ctx.base_model`."""
    values = {
        "today": (today or date.today()).isoformat(),
        "device": device if device is not None else device_line(),
        "base_model": ctx.base_model,
        "workspace": str(ctx.workspace.root),
        "state": workspace_state(ctx.workspace.root),
    }
    text = load_template()
    # str.replace rather than str.format: the template may hold JSON braces one day.
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


@functools.cache
def device_line() -> str:
    """'cuda: <name>, <memory> GB' or 'CPU only'. Imports torch: asked once per process."""
    try:
        import torch
    except ImportError:
        return "CPU only (torch is not installed)"
    if not torch.cuda.is_available():
        return "CPU only (no CUDA GPU): training is slow, keep runs small"
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    more = f" (x{count})" if count > 1 else ""
    return f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GB{more}"


def workspace_state(root: Path) -> str:
    """Markdown lists of the datasets, prior sets and runs found under `root`."""
    sections = [
        ("Datasets (datasets/)", [_dataset_line(p) for p in _folders(root / "datasets")]),
        ("Prior sets (priors/)", [_priors_line(p) for p in _folders(root / "priors")]),
        ("Runs (runs/)", [_run_line(p) for p in _folders(root / "runs")]),
    ]
    lines = []
    for title, items in sections:
        lines.append(f"{title}:")
        lines.extend(f"- {item}" for item in items or ["none yet"])
    return "\n".join(lines)


def _folders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _read_json(path: Path) -> Any:
    """The parsed file, or None when missing or broken (the caller says 'unreadable')."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, (list, dict)) else value


def _dataset_line(folder: Path) -> str:
    manifest = _read_json(folder / "manifest.json")
    if not isinstance(manifest, dict):
        return f"{folder.name}: manifest.json missing or unreadable"
    kept = next((_count(manifest[k]) for k in ("kept", "images", "num_images") if k in manifest),
                "?")
    parts = [f"{folder.name}: {kept} images kept"]
    for key in ("instance_prompt", "class_prompt", "resolution"):
        if manifest.get(key):
            parts.append(f"{key} {manifest[key]!r}")
    rejected = manifest.get("rejected")
    if rejected:
        parts.append(f"{_count(rejected)} rejected")
    return ", ".join(parts)


def _priors_line(folder: Path) -> str:
    info = _read_json(folder / "priors.json")
    if not isinstance(info, dict):
        return f"{folder.name}: priors.json missing or unreadable"
    count = next((_count(info[k]) for k in ("count", "num_images", "images") if k in info), None)
    if count is None:
        count = len(list(folder.glob("*.png"))) + len(list(folder.glob("*.jpg")))
    key = info.get("key") if isinstance(info.get("key"), dict) else {}
    prompt = info.get("prompt") or info.get("class_prompt") or key.get("prompt") or "?"
    size = f" at {key['resolution']} px" if key.get("resolution") else ""
    return f"{folder.name}: {count} images of {prompt!r}{size}"


def _run_line(folder: Path) -> str:
    parts = [folder.name + ":"]
    parts.append(_run_config(folder / "run.yaml"))
    steps = _checkpoint_steps(folder / "checkpoints")
    parts.append(f"checkpoints at steps {', '.join(map(str, steps))}" if steps
                 else "no checkpoints")
    loss = _last_metric(folder / "metrics.jsonl")
    if loss:
        parts.append(loss)
    outputs = [name + "/" for name in ("final", "lora") if (folder / name).is_dir()]
    parts.append("finished: " + " ".join(outputs) if outputs else "no final weights yet")
    return " ".join(parts[:2]) + "; " + "; ".join(parts[2:])


def _run_config(path: Path) -> str:
    import yaml  # only here: a workspace with runs pays for it

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return "run.yaml missing or unreadable"
    if not isinstance(config, dict):
        return "run.yaml unreadable"
    keys = ("instance_prompt", "class_prompt", "max_train_steps", "learning_rate", "use_lora",
            "resolution")
    return ", ".join(f"{k} {config[k]!r}" for k in keys if config.get(k) is not None)


def _checkpoint_steps(folder: Path) -> list[int]:
    steps = []
    for path in _folders(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _last_metric(path: Path) -> str | None:
    """'last loss 0.123 at step 40' from the last readable line of metrics.jsonl."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash; the one before it is fine
        if isinstance(record, dict) and "loss" in record:
            loss = record["loss"]
            loss = f"{loss:.4g}" if isinstance(loss, (int, float)) else str(loss)
            return f"last loss {loss} at step {record.get('step', '?')}"
    return None
