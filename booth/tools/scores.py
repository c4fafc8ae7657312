"""The sample tool's scores: what a run knows of its subject, the evaluators, the tables.

The metrics themselves are booth.dreambooth.evaluation's; this module finds what they are
measured against (the run's subject photos and identifier from run.yaml and its dataset's
manifest, its class prompt and prior set), says once why a score is missing, writes
scores.json beside the images and prints the figures as a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from booth.tools.context import ToolContext

SCORES_FILE = "scores.json"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MAX_CLASS_IMAGES = 32  # enough for a mean; a prior set of 200 would cost seconds per call
NO_SUBJECT = "DINO and CLIP-I need the run's subject photos"


@dataclass
class Subject:
    """What generated images of a run are measured against."""

    photos: list[Path] = field(default_factory=list)
    identifier: str | None = None
    class_noun: str | None = None
    class_prompt: str | None = None
    class_images: list[Path] = field(default_factory=list)
    note: str | None = None  # why DINO and CLIP-I are missing, said once


@dataclass
class Scorer:
    evaluators: object
    subject: Subject

    def score(self, images: dict[str, list[Path]]) -> dict:
        from booth.dreambooth.evaluation import score_images

        s = self.subject
        try:
            scores = score_images(self.evaluators, images, s.photos, identifier=s.identifier,
                                  class_noun=s.class_noun, class_prompt=s.class_prompt,
                                  class_images=s.class_images)
        except OSError as error:  # a subject photo or class image that no longer opens
            return {"skipped": f"not scored: {error}"}
        if s.note:
            scores["note"] = s.note
        return scores


def scorer(ctx: ToolContext, run: str | None, base_model: str) -> Scorer | str:
    """The scorer for images of `run` (None: the base model), or why there is none."""
    from booth.dreambooth.evaluation import EvaluatorsUnavailable, load_evaluators

    try:
        evaluators = load_evaluators(ctx.eval_models, base_model)
    except EvaluatorsUnavailable as error:
        return f"not scored: {error}"
    return Scorer(evaluators, run_subject(ctx, run))


def run_subject(ctx: ToolContext, run: str | None) -> Subject:
    if run is None:
        return Subject(note=f"{NO_SUBJECT} (sample a run): only CLIP-T")
    from booth.dreambooth.config import load_config

    config = load_config(ctx.workspace.existing_run(run) / "run.yaml")
    photos = [Path(p) for p in config.instance_images if Path(p).is_file()]
    identifier, class_noun = _identifier(photos, config.instance_prompt, config.class_prompt)
    class_images = []
    if config.class_data_dir and Path(config.class_data_dir).is_dir():
        class_images = sorted(p for p in Path(config.class_data_dir).iterdir()
                              if p.suffix.lower() in _IMAGE_SUFFIXES)[:_MAX_CLASS_IMAGES]
    note = None if photos else (f"{NO_SUBJECT}, and those in its run.yaml are gone: only "
                                "CLIP-T")
    return Subject(photos, identifier, class_noun, config.class_prompt, class_images, note)


def _identifier(photos: list[Path], instance_prompt: str, class_prompt: str | None):
    """(identifier, class noun): from the dataset's manifest.json when the photos are a
    prepared dataset's, else the one word the instance prompt adds to the class prompt."""
    for photo in photos[:1]:
        manifest = photo.parent.parent / "manifest.json"
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if data.get("instance_token"):
                return data["instance_token"], data.get("class_noun")
        except (OSError, ValueError, AttributeError):
            pass
    if class_prompt:
        words, known = instance_prompt.split(), set(class_prompt.lower().split())
        extra = [i for i, w in enumerate(words) if w.lower() not in known]
        if len(extra) == 1:
            after = words[extra[0] + 1] if extra[0] + 1 < len(words) else None
            return words[extra[0]], after
    return None, None


def write_scores(folder: Path, scores: dict) -> None:
    (Path(folder) / SCORES_FILE).write_text(json.dumps(scores, indent=2, ensure_ascii=False)
                                            + "\n", encoding="utf-8")


def _figure(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_prompt_table(console, scores: dict) -> None:
    """One row per prompt, then the means: what a person reads after sampling."""
    from rich.table import Table

    table = Table("prompt", "DINO", "CLIP-I", "CLIP-T", title="scores (DreamBooth paper)",
                  title_justify="left")
    for row in scores["per_prompt"]:
        table.add_row(row["prompt"], *(_figure(row.get(k)) for k in ("dino", "clip_i",
                                                                     "clip_t")))
    table.add_row("[bold]mean[/]", *(_figure(scores.get(k)) for k in ("dino", "clip_i",
                                                                     "clip_t")))
    console.print(table)
    _print_prior(console, scores.get("prior"))
    if scores.get("note"):
        console.print(scores["note"], highlight=False)


def _print_prior(console, prior: dict | None) -> None:
    if prior:
        console.print(f"prior preservation ({prior['prompt']!r}): DINO to the subject "
                      f"{_figure(prior.get('dino_to_subject'))} (lower is better), to the base "
                      f"model's class images {_figure(prior.get('dino_to_class_images'))}",
                      highlight=False)


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
