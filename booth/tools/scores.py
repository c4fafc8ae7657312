"""The sample tool's scores: the evaluators and the run's subject, scores.json, the tables.

The metrics, and what a run's images are measured against, are booth.dreambooth.evaluation's;
this module finds the run, says once why a score is missing, writes scores.json beside the
images and prints the figures as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from booth.dreambooth.evaluation import (
    NO_SUBJECT,
    SCORES_FILE,
    Subject,
    score_subject,
    subject_of,
)
from booth.tools.context import ToolContext


@dataclass
class Scorer:
    evaluators: object
    subject: Subject

    def score(self, images: dict[str, list[Path]]) -> dict:
        return score_subject(self.evaluators, images, self.subject)


def scorer(ctx: ToolContext, run: str | None, base_model: str) -> Scorer | str:
    """The scorer for images of `run` (None: the base model), or why there is none."""
    from booth.dreambooth.evaluation import EvaluatorsUnavailable, load_evaluators

    try:
        evaluators = load_evaluators(ctx.eval_models, base_model)
    except EvaluatorsUnavailable as error:
        return f"not scored: {error}"
    if run is None:
        return Scorer(evaluators, Subject(note=f"{NO_SUBJECT} (sample a run): only CLIP-T"))
    from booth.dreambooth.config import load_config

    config = load_config(ctx.workspace.existing_run(run) / "run.yaml")
    return Scorer(evaluators, subject_of(config))


def write_scores(folder: Path, scores: dict) -> None:
    from booth.dreambooth.sampling import write_json

    write_json(Path(folder) / SCORES_FILE, scores)


def _figure(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_prompt_table(console, scores: dict) -> None:
    """One row per prompt, then the means: what a person reads after sampling."""
    from rich.table import Table
    from rich.text import Text

    table = Table("prompt", "DINO", "CLIP-I", "CLIP-T", title="scores (DreamBooth paper)",
                  title_justify="left")
    for row in scores["per_prompt"]:
        table.add_row(Text(row["prompt"]), *(_figure(row.get(k)) for k in ("dino", "clip_i",
                                                                     "clip_t")))
    table.add_row("[bold]mean[/]", *(_figure(scores.get(k)) for k in ("dino", "clip_i",
                                                                     "clip_t")))
    console.print(table)
    _print_prior(console, scores.get("prior"))
    if scores.get("note"):
        console.print(scores["note"], markup=False, highlight=False)


def _print_prior(console, prior: dict | None) -> None:
    if prior:
        console.print(f"prior preservation ({prior['prompt']!r}): DINO to the subject "
                      f"{_figure(prior.get('dino_to_subject'))} (lower is better), to the base "
                      f"model's class images {_figure(prior.get('dino_to_class_images'))}",
                      markup=False, highlight=False)


def comparison_table(rows: list[dict], best: str | None, rule: str):
    """One row per checkpoint, the best one starred: the table a comparison prints."""
    from rich.table import Table

    with_prior = any("prior_dino_to_subject" in r for r in rows)
    columns = ["checkpoint", "step", "DINO", "CLIP-I", "CLIP-T"]
    if with_prior:
        columns.append("prior DINO↓")
    table = Table(*columns, title="checkpoints compared (DreamBooth paper scores)",
                  title_justify="left", caption=f"★ best: {rule}", caption_justify="left")
    for row in rows:
        name = row["checkpoint"] + (" ★" if row["checkpoint"] == best else "")
        cells = [name, str(row.get("step") or "-"),
                 *(_figure(row.get(k)) for k in ("dino", "clip_i", "clip_t"))]
        if with_prior:
            cells.append(_figure(row.get("prior_dino_to_subject")))
        table.add_row(*cells, style="bold" if row["checkpoint"] == best else None)
    return table
