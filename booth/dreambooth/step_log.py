"""The losses of finished steps, kept on the device and read in one go every few steps.

Reading a GPU tensor (`.item()`, an `isfinite` test in Python) makes the host wait until the
GPU has run everything queued so far, so a read every step stops the host from queueing the
next step while the GPU works. On the CPU there is no queue and a read costs nothing, so
there the losses are read, checked and written every step, as before.

What stays true with reads every N steps:
- metrics.jsonl still has one line per step, with the very same values (the tensors read are
  the ones that were read one by one before; the sums are made in the same order).
- Before any checkpoint the pending steps are written and checked: a run killed later keeps
  every line up to its last checkpoint, which is all a resume keeps anyway (it discards the
  lines after the checkpoint it starts from).
- A NaN/inf loss stops the run with the same error and step number, at most N-1 steps later
  and always before a checkpoint could save the diverged weights.
"""

from __future__ import annotations

import json
import math

from booth.dreambooth.errors import TrainingError

GPU_READ_EVERY = 10  # steps between reads where the device runs ahead of the host


def read_every(config, device) -> int:
    """The steps between reads: config.log_every if set, else 1 on the CPU, 10 elsewhere."""
    if config.log_every:
        return config.log_every
    return 1 if device.type == "cpu" else GPU_READ_EVERY


class StepLog:
    """Collects each finished step's micro-batch losses (device tensors) and host values."""

    def __init__(self, accelerator, metrics_file, every: int, config, tracking: bool):
        self.accelerator, self.file, self.every = accelerator, metrics_file, every
        self.config, self.tracking = config, tracking
        self.pending: list[tuple[dict, list[dict]]] = []  # (host values, micro-batch losses)

    def add(self, state: dict, lr: float, micro_losses: list[dict]) -> None:
        host = {"step": state["step"], "lr": lr, "epoch": state["epoch"],
                "elapsed": round(state["elapsed"], 3)}
        self.pending.append((host, micro_losses))

    @property
    def due(self) -> bool:
        return len(self.pending) >= self.every

    def flush(self) -> float | None:
        """Read, check and write the pending steps; the last one's loss (None if none)."""
        if not self.pending:
            return None
        pending, self.pending = self.pending, []
        keys = list(pending[0][1][0])
        values = self._read([micro for _, micros in pending for micro in micros], keys)
        loss, at, total = None, 0, keys.index("loss")
        for host, micros in pending:
            rows = values[at:at + len(micros)]
            at += len(micros)
            if not all(math.isfinite(row[total]) for row in rows):
                raise TrainingError(diverged(host["step"], self.config))
            loss = self._write(host, keys, rows)
        if self.file is not None:
            self.file.flush()  # a killed run keeps every step up to its last checkpoint
        return loss

    def flush_quietly(self) -> None:
        """On the way out of a failed run: keep what can still be read, raise nothing. Not
        when launched: reading means averaging with processes that may not have failed (they
        would wait in another collective for ever); their run is lost past its checkpoint."""
        if self.accelerator.num_processes > 1:
            self.pending = []
            return
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            self.pending = []

    def _read(self, micros: list[dict], keys: list[str]) -> list[list[float]]:
        import torch

        # One (micro-batches x keys) tensor, averaged over the processes, read once.
        table = torch.stack([torch.stack([micro[k] for k in keys]) for micro in micros])
        return self.accelerator.reduce(table, "mean").tolist()

    def _write(self, host: dict, keys: list[str], rows: list[list[float]]) -> float:
        sums = {}
        for row in rows:  # summed in micro-batch order, as the per-step reads did
            for key, value in zip(keys, row, strict=True):
                sums[key] = sums.get(key, 0.0) + value
        line = {"step": host["step"], **{k: v / len(rows) for k, v in sums.items()},
                "lr": host["lr"], "epoch": host["epoch"], "elapsed": host["elapsed"]}
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
        if self.tracking:
            self.accelerator.log({k: v for k, v in line.items() if k != "step"},
                                 step=host["step"])
        return line["loss"]


def diverged(step: int, config) -> str:
    return (
        f"the loss became NaN/inf at step {step}: training diverged. Try a lower "
        f"learning_rate than {config.learning_rate:g} (e.g. {config.learning_rate / 5:g}), "
        "or resume from an earlier checkpoint"
    )
