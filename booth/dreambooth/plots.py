"""`loss.png`: a run's loss curve from its metrics.jsonl, the picture people look at first.

DreamBooth's loss is mostly noise (each step draws its own timestep), so the raw values are
drawn faint and an exponential moving average on top; the instance and prior losses get
their own lines when the run has prior preservation, and the learning rate a strip below.
matplotlib's Figure is used directly with the Agg canvas: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from booth.dreambooth.checkpoints import TMP_PREFIX

CURVES = (("loss", "loss", "tab:blue"), ("instance_loss", "instance", "tab:orange"),
          ("prior_loss", "prior", "tab:green"))


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a line cut short by a kill is skipped)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and "loss" in row:
            rows.append(row)
    return rows


def smoothed(values: list[float]) -> list[float]:
    """A debiased exponential moving average spanning ~10% of the points (2 to 100)."""
    span = min(max(len(values) // 10, 2), 100)
    beta, average, out = 1 - 2 / (span + 1), 0.0, []
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def write_loss_plot(metrics: Path, dest: Path) -> Path | None:
    """Plot `metrics` into `dest` (PNG, replaced in one rename). Nothing to plot: None, and
    an older plot goes (a run resumed from step 0 has no curve yet)."""
    rows = read_metrics(metrics)
    if not rows:
        dest.unlink(missing_ok=True)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    # Fixed margins: a layout engine would double the time of every plot.
    losses, rates = figure.subplots(2, 1, sharex=True, height_ratios=(4, 1), gridspec_kw=dict(
        left=0.1, right=0.98, top=0.93, bottom=0.1, hspace=0.12))
    curves = [c for c in CURVES if all(c[0] in row for row in rows)]
    if "prior_loss" not in rows[-1]:  # without priors the instance loss is the loss
        curves = [c for c in curves if c[0] != "instance_loss"]
    steps = [row["step"] for row in rows]
    positive = True
    for key, label, color in curves:
        values = [float(row[key]) for row in rows]
        positive = positive and min(values) > 0
        losses.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        losses.plot(steps, smoothed(values), color=color, linewidth=1.8, label=label)
    low, high = losses.get_ylim()
    if positive and high > 10 * low:  # a spread over decades: each shows on a log axis
        losses.set_yscale("log")
        losses.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    losses.xaxis.set_major_locator(MaxNLocator(integer=True))
    losses.set_ylabel("loss (faint: raw)")
    losses.legend(loc="upper right")
    losses.grid(True, alpha=0.3)
    losses.set_title(f"{dest.parent.name}: loss over {steps[-1]} steps")
    if all("lr" in row for row in rows):
        rates.plot(steps, [row["lr"] for row in rows], color="tab:gray")
    rates.set_ylabel("lr")
    rates.set_xlabel("step")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
