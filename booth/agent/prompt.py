"""The system prompt: booth/prompts/system.md filled with the actual state of the workspace.

The model plans from facts (which datasets, prior sets, runs and checkpoints exist, on which
device) rather than guesses. The facts come from booth.tools.workspace.describe_workspace,
which reads every file defensively: a broken manifest is reported as "unreadable" and never
stops a chat from starting; this module only words them.
"""

from __future__ import annotations

import functools
from datetime import date
from importlib import resources
from pathlib import Path

from booth.tools.workspace import (
    INTERRUPTED,
    NO_FINAL_MODEL,
    TRAINING_OR_CRASHED,
    describe_workspace,
)


def load_template(name: str = "system.md") -> str:
    """A prompt template shipped in the booth.prompts package."""
    return resources.files("booth.prompts").joinpath(name).read_text(encoding="utf-8")


def build_system_prompt(ctx, today: date | None = None, device: str | None = None,
                        gpu_note: str | None = None) -> str:
    """The system prompt for a session working in `ctx.workspace` with `ctx.base_model`.
    `gpu_note`: what the LLM server does for GPU tools (booth.agent.gpu_share)."""
    values = {
        "today": (today or date.today()).isoformat(),
        "device": device if device is not None else machine_facts(ctx, gpu_note),
        "base_model": ctx.base_model,
        "workspace": str(ctx.workspace.root),
        "state": workspace_state(ctx.workspace),
    }
    text = load_template()
    # str.replace rather than str.format: the template may hold JSON braces one day.
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def machine_facts(ctx, gpu_note: str | None = None) -> str:
    """The device, with the card's free memory now (the LLM server may hold much of it),
    what the server gives back during GPU tools, and the training speed measured here."""
    parts = [device_line()]
    free = _courtesy(ctx.free_gpu_memory)
    if free is not None:
        parts.append(f"{free / 2**30:.0f} GB free now")
    if gpu_note and free is not None:
        parts.append(gpu_note)
    measured = _courtesy(lambda: measured_speed(ctx.workspace.root))
    if measured:
        parts.append(measured)
    return "; ".join(parts)


def measured_speed(workspace_root) -> str | None:
    """'training measured here: 0.42 s/step at 512 px' from the newest calibration entry."""
    from booth.tools.calibration import newest

    entry = newest(workspace_root, "train")
    if entry is None:
        return None
    return (f"training measured here: {entry['per_unit']:.2g} s/step at "
            f"{entry['resolution']} px")


def _courtesy(ask):
    try:
        return ask()
    except Exception:  # a fact the prompt can do without must never stop a chat
        return None


@functools.cache
def device_line() -> str:
    """'cuda: <name>, <memory> GB' or 'CPU only'. Imports torch: asked once per process."""
    try:
        import torch
    except ImportError:
        return "CPU only (torch is not installed)"
    if not torch.cuda.is_available():
        return "CPU only (no CUDA GPU)"  # system.md says what that means for a plan
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    more = f" (x{count})" if count > 1 else ""
    return f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GB{more}"


def workspace_state(workspace) -> str:
    """Markdown lists of the datasets, prior sets and runs of `workspace`."""
    state = describe_workspace(workspace)
    sections = [
        ("Datasets (datasets/)", [_dataset_line(d) for d in state["datasets"]]),
        ("Prior sets (priors/)", [_priors_line(p) for p in state["prior_sets"]]),
        ("Runs (runs/)", [_run_line(r) for r in state["runs"]]),
    ]
    lines = []
    for title, items in sections:
        lines.append(f"{title}:")
        lines.extend(f"- {item}" for item in items or ["none yet"])
    return "\n".join(lines)


def _settings(values: dict) -> list[str]:
    return [f"{key} {value!r}" for key, value in values.items() if value not in (None, "")]


def _dataset_line(dataset: dict) -> str:
    if dataset.get("error"):
        return f"{dataset['name']}: {dataset['error']}"
    parts = [f"{dataset['name']}: {dataset['images']} images kept"]
    parts += _settings({k: dataset[k] for k in ("instance_prompt", "class_prompt", "resolution")})
    if dataset["rejected"]:
        parts.append(f"{dataset['rejected']} rejected")
    return ", ".join(parts)


def _priors_line(priors: dict) -> str:
    if priors.get("error"):
        return f"{priors['name']}: {priors['error']}"
    size = f" at {priors['resolution']} px" if priors.get("resolution") else ""
    return f"{priors['name']}: {priors['images']} images of {priors['prompt']!r}{size}"


_WHY_NOT_FINISHED = {
    INTERRUPTED: "interrupted; resume_checkpoint continues it",
    TRAINING_OR_CRASHED: "still training, or crashed after its last checkpoint",
    NO_FINAL_MODEL: "stopped while exporting; resume_checkpoint exports it",
}


def _run_line(run: dict) -> str:
    config = ", ".join(_settings(run["config"])) if run["config"] is not None \
        else "run.yaml missing or unreadable"
    steps = run["checkpoints"]
    parts = [f"checkpoints at steps {', '.join(map(str, steps))}" if steps
             else "no checkpoints"]
    if run["last_loss"] is not None:
        parts.append(f"last loss {run['last_loss']:.4g}")
    if run["final_model"]:
        parts.append(f"finished: {Path(run['final_model']).name}/")
    else:
        parts.append(f"no final weights yet ({_WHY_NOT_FINISHED.get(run['status'], '?')})")
    return f"{run['name']}: {config}; " + "; ".join(parts)
