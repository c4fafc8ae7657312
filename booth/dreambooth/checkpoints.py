"""Checkpoints of a run: written atomically, found by step, read back exactly.

    <run>/checkpoints/checkpoint-<step>/     accelerate's save_state (optimizer, LR scheduler,
        unet.safetensors                     RNG states, the noise generator) + the trained
        text_encoder.safetensors             weights only (all of them, or just the LoRA ones)
        pytorch_lora_weights.safetensors     LoRA runs: the same adapters for load_lora_weights
        training_state.json                  step/epoch/position: save_state does not keep them

A checkpoint is written to `.tmp-checkpoint-<step>` and renamed when complete, so a kill in the
middle never leaves a `checkpoint-*` folder that cannot be loaded; "latest" is simply the
highest complete step, and stale `.tmp-*` folders are ignored and swept away on resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from booth.dreambooth.errors import CheckpointError
from booth.schema import pattern

CHECKPOINTS = "checkpoints"
EXPORT_DIR = "export"  # files for other tools (export.py); swept here with the rest
STATE_FILE = "training_state.json"
TMP_PREFIX = ".tmp-"
# The one spelling of checkpoint names: folders are `checkpoint-<step>`; a user or the model
# may also say `<step>` or "latest" (CHOICE is that rule as a JSON-schema pattern).
_FOLDER_RE = re.compile(r"checkpoint-(\d{1,9})")
_STEP_RE = re.compile(r"(?:checkpoint-)?(\d{1,9})")
CHOICE = pattern(r"^(latest|(checkpoint-)?[0-9]{1,9})$",
                 "'latest', 'checkpoint-<step>' or '<step>'")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _FOLDER_RE.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(run_dir: str | Path, name: str | int = "latest") -> tuple[int, Path]:
    """The checkpoint called "latest", "checkpoint-<step>" or "<step>" in a run."""
    available = list_checkpoints(run_dir)
    if not available:
        raise CheckpointError(f"run {Path(run_dir).name!r} has no complete checkpoint yet")
    if str(name) == "latest":
        return available[-1]
    step, steps = checkpoint_step(name), dict(available)
    if step in steps:
        return step, steps[step]
    names = ", ".join(checkpoint_name(step) for step, _ in available)
    raise CheckpointError(
        f"run {Path(run_dir).name!r} has no checkpoint {name!r}; available: {names} (or 'latest')"
    )


def checkpoint_step(name: str | int) -> int | None:
    """The step a checkpoint is called by ("checkpoint-400" or "400"), or None."""
    match = _STEP_RE.fullmatch(str(name))
    return int(match.group(1)) if match else None


def read_training_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))


def sweep_temporary(run_dir: str | Path) -> None:
    """Remove what a killed run left half-written or half-deleted: `.tmp-*` checkpoints,
    `.tmp-*` exports and metric files at the run's top level, and half-written export/ files."""
    for folder in (Path(run_dir) / CHECKPOINTS, Path(run_dir), Path(run_dir) / EXPORT_DIR):
        if folder.is_dir():
            for path in folder.glob(f"{TMP_PREFIX}*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def save_checkpoint(accelerator, run_dir: Path, state: dict) -> Path:
    """accelerate's save_state into a temporary folder, then one rename to checkpoint-<step>."""
    step = state["step"]
    final = run_dir / CHECKPOINTS / checkpoint_name(step)
    tmp = run_dir / CHECKPOINTS / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG states into tmp
    if accelerator.is_main_process:
        # Written last: a folder with this file holds everything save_state wrote.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing an older `target` without a moment of neither."""
    if target.exists():
        old = target.with_name(f"{TMP_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (None keeps all)."""
    if keep is None:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        remove_dir(path)


def discard_after(run_dir: Path, step: int) -> list[int]:
    """Resuming from `step` rewrites what came after it: drop the later checkpoints."""
    dropped = [s for s, path in list_checkpoints(run_dir) if s > step]
    for s in dropped:
        remove_dir(run_dir / CHECKPOINTS / checkpoint_name(s))
    return dropped


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill midway never leaves it half there under its own name:
    it is renamed to `.tmp-del-<name>` first (ignored by list_checkpoints, swept on resume)."""
    if not path.exists():
        return
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= `step`, so the resumed run appends where it left."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    # A temporary file and one rename: a kill midway leaves the old file or the new one.
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_if_untrained(run_dir: Path) -> None:
    """A run that failed before its first step (bad model, no memory) leaves nothing behind,
    so its name can be used again; one that trained keeps its metrics for the post-mortem."""
    metrics = run_dir / "metrics.jsonl"
    if not list_checkpoints(run_dir) and not (metrics.is_file() and metrics.stat().st_size):
        shutil.rmtree(run_dir, ignore_errors=True)


def last_loss(path: Path) -> float | None:
    """The loss of the last complete line of metrics.jsonl (None if there is none)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            return float(json.loads(line)["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


class GeneratorState:
    """Lets accelerate save and restore a torch.Generator (it wants state_dict methods).

    All training noise comes from this generator, not the global RNG: building a DataLoader
    iterator draws from the global RNG, which would shift the noise after a resume.
    accelerate writes custom objects from the main process only, so with several processes
    the state holds every process's generator ("per_process"), and each takes back its own.
    """

    def __init__(self, generator, accelerator=None):
        self.generator = generator
        self.accelerator = accelerator

    def _processes(self) -> tuple[int, int]:
        if self.accelerator is None:
            return 0, 1
        return self.accelerator.process_index, self.accelerator.num_processes

    def state_dict(self) -> dict:
        state = {"state": self.generator.get_state()}
        if self._processes()[1] > 1:  # save_state calls this on every process: a collective
            from accelerate.utils import gather_object

            state["per_process"] = gather_object([state["state"]])
        return state

    def load_state_dict(self, state: dict) -> None:
        import torch

        rank, _ = self._processes()
        saved = state.get("per_process") or [state["state"]]
        if rank < len(saved):
            self.generator.set_state(saved[rank])
            return
        # Saved by fewer processes: a stream of its own, derived from the saved one.
        self.generator.set_state(saved[0])
        offset = torch.randint(2**62, (1,), generator=self.generator,
                               device=self.generator.device)
        self.generator.manual_seed(int(offset) + rank)


def trainable_state_dict(model) -> dict:
    """The parameters being trained (all of them, or only LoRA's), ready for safetensors."""
    return {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_weights(model, file: Path, *, require_all_trainable: bool = False) -> None:
    """Load a trained-weights file into `model`; every key must belong to the model."""
    from safetensors.torch import load_file

    state = load_file(str(file), device="cpu")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{file} does not match the model (e.g. {result.unexpected_keys[0]!r}); was it made "
            "with another base model or LoRA setting?"
        )
    if require_all_trainable:
        missing = set(trainable_state_dict(model)) - set(state)
        if missing:
            raise CheckpointError(f"{file} lacks trained weights such as {sorted(missing)[0]!r}")


def register_weight_hooks(accelerator, names: dict[int, str]) -> None:
    """Make save_state/load_state store only the trained parameters, one file per model.

    `names` maps id(unwrapped model) -> file stem ("unet", "text_encoder"). A LoRA checkpoint
    is then a few MB instead of a full UNet, and `load_run_pipeline` can read it by name; it
    also holds the adapters in diffusers' names, so `load_lora_weights(checkpoint)` works.
    """

    def _name(model) -> str:
        return names[id(accelerator.unwrap_model(model))]

    def save_hook(models, weights, output_dir):
        from safetensors.torch import save_file

        from booth.dreambooth.lora_formats import (  # it imports this module
            LORA_FILE,
            is_lora_state,
            lora_modules,
            to_diffusers,
        )

        if accelerator.is_main_process:
            lora = {}
            for model in models:
                state = trainable_state_dict(accelerator.unwrap_model(model))
                save_file(state, str(Path(output_dir) / f"{_name(model)}.safetensors"))
                if is_lora_state(state):
                    lora.update(lora_modules(state, _name(model)))
            if lora:  # PEFT's names above are for resuming; this file is for load_lora_weights
                save_file(to_diffusers(lora), str(Path(output_dir) / LORA_FILE))
        weights.clear()  # saved here; accelerate must not write them a second time

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            file = Path(input_dir) / f"{_name(model)}.safetensors"
            load_weights(accelerator.unwrap_model(model), file, require_all_trainable=True)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
