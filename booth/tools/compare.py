"""`sample(checkpoints=[...])`: the same prompts and seeds from several checkpoints of a run,
scored with the paper's metrics, side by side, and the one that balances subject and prompt
fidelity best named (booth.dreambooth.evaluation.best_checkpoint states the rule).

    samples/<run>-compare-<time>/
        grid.png                 one row per checkpoint (its name and scores at the left)
        scores.json              the table, the best checkpoint and the rule
        checkpoint-200/ ...      each one's images, grid.png, samples.json, scores.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from booth.tools.context import ToolContext
from booth.tools.registry import ToolArgumentError, ToolError
from booth.tools.sample import Render, output_folder, render_prompts, run_base_model, settings_of

ALL, FINAL, LATEST = "all", "final", "latest"
MAX_COMPARED = 50  # the schema carries no bounds (they would cost tokens): checked here


@dataclass(frozen=True)
class Candidate:
    name: str                # "checkpoint-200" or "final"
    step: int | None
    checkpoint: str | None   # what load_run_pipeline is given; None: the final model


def resolve_candidates(ctx: ToolContext, run: str,
                       names: list[str]) -> tuple[list[Candidate], str | None]:
    """The models `names` stand for, in the order given, each once; and a note for the
    result. ["all"]: every checkpoint, and the final model unless a checkpoint holds its
    step already (the same weights). Unknown names: ToolArgumentError listing the real ones."""
    from booth.dreambooth.checkpoints import checkpoint_name, list_checkpoints
    from booth.dreambooth.config import load_config
    from booth.dreambooth.models import final_model_path

    if not 1 <= len(names) <= MAX_COMPARED:
        raise ToolArgumentError(f"checkpoints takes 1 to {MAX_COMPARED} names, or ['all']; "
                                f"got {len(names)}")
    run_dir = ctx.workspace.existing_run(run)
    steps = [step for step, _ in list_checkpoints(run_dir)]
    final = None
    if final_model_path(run_dir) is not None:
        final = Candidate(FINAL, load_config(run_dir / "run.yaml").max_train_steps, None)
    by_name = {checkpoint_name(s): Candidate(checkpoint_name(s), s, checkpoint_name(s))
               for s in steps}
    if not by_name and final is None:
        raise ToolError(f"run {run!r} has no checkpoints and no final model yet: nothing to "
                        "compare")
    if ALL in names:
        if not by_name:
            return [final], (f"run {run!r} has no checkpoints: the final model is compared "
                             "alone")
        chosen = list(by_name.values())
        if final is not None and final.step not in steps:
            chosen.append(final)
        return chosen, None
    chosen, unknown = [], []
    for name in names:
        found = _lookup(name, by_name, steps, final)
        if found is None:
            unknown.append(repr(name))
        elif found not in chosen:
            chosen.append(found)
    if unknown:
        existing = [*by_name, *([FINAL] if final else [])]
        raise ToolArgumentError(f"run {run!r} has no {', '.join(unknown)}; it has: "
                                f"{', '.join(existing)} (or {ALL!r}, {LATEST!r})")
    return chosen, None


def _lookup(name: str, by_name: dict, steps: list[int], final: Candidate | None):
    if name == FINAL:
        return final
    if name == LATEST:
        return by_name[f"checkpoint-{steps[-1]}"] if steps else None
    from booth.dreambooth.checkpoints import checkpoint_name, checkpoint_step

    step = checkpoint_step(name)
    return by_name.get(checkpoint_name(step)) if step is not None else None


def compare_checkpoints(ctx: ToolContext, run: str, names: list[str], prompts: list[str],
                        render: Render, score: bool) -> dict:
    """Render `prompts` from each model `names` stands for and compare them."""
    from booth.dreambooth.sampling import write_json
    from booth.tools.scores import comparison_table, scorer, write_scores

    candidates, note = resolve_candidates(ctx, run, names)
    scoring = scorer(ctx, run, run_base_model(ctx, run)) if score else None
    folder = output_folder(ctx, run, "-compare")
    rows, results, status = [], [], "complete"
    for candidate in candidates:
        if ctx.stop_requested.is_set():
            status = "interrupted"
            break
        ctx.console.print(f"[bold]{candidate.name}[/]", highlight=False)
        result = _render(ctx, run, candidate, prompts, folder / candidate.name, render)
        results.append(result)
        rows.append(_row(candidate, result, prompts, folder / candidate.name, scoring))
        if result.status == "interrupted":
            status = "interrupted"
            break
    best, rule = _best(rows, scoring)
    grid = _grid(folder, rows, results, prompts, render, run, best)
    folder.mkdir(parents=True, exist_ok=True)  # stopped before the first: still a record
    write_scores(folder, {"prompts": prompts, "checkpoints": rows, "best_checkpoint": best,
                          "rule": rule})
    write_json(folder / "samples.json", {  # what `booth ls` reads of a sample set
        "prompts": prompts, "status": status, "seed": render.seed,
        "compared": [c.name for c in candidates], "images": [
            str(p.relative_to(folder)) for r in results for p in r.images]})
    if rows and scoring is not None and not isinstance(scoring, str):
        ctx.console.print(comparison_table(rows, best, rule))
    out = {"folder": str(folder), "model": f"run {run}: " + ", ".join(c.name for c in candidates),
           "compared": rows, "best_checkpoint": best, "rule": rule,
           "grid": str(grid) if grid else None, "status": status,
           **settings_of(results[-1] if results else None, render),
           "hint": "grid.png has one row per checkpoint, every row from the same seeds. "
                   "Offer the user to sample or resume from best_checkpoint."}
    out["seconds"] = round(sum(r.seconds for r in results), 2)
    if status == "interrupted":
        out["hint"] = (f"stopped after {len(rows)} of {len(candidates)} checkpoints; the "
                       "best is among those only. " + out["hint"])
    if isinstance(scoring, str):
        out["scores"] = {"skipped": scoring}
    if note:
        out["note"] = note
    return out


def _render(ctx: ToolContext, run: str, candidate: Candidate, prompts: list[str],
            folder: Path, render: Render):
    import time

    from booth.dreambooth import trainer

    started = time.monotonic()
    pipeline = trainer.load_run_pipeline(ctx.workspace.existing_run(run), candidate.checkpoint)
    title = f"run {run} ({candidate.name})"
    try:
        return render_prompts(ctx, run, pipeline, prompts, folder, render, title,
                              time.monotonic() - started)
    finally:
        del pipeline
        _free_memory()  # the next checkpoint's pipeline must not meet this one on the GPU


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(candidate: Candidate, result, prompts: list[str], folder: Path, scoring) -> dict:
    from booth.tools.scores import write_scores

    row = {"checkpoint": candidate.name, "step": candidate.step, "folder": str(folder)}
    if scoring is None or isinstance(scoring, str) or not result.images:
        return row
    scores = scoring.score(result.by_prompt(prompts))
    if "skipped" in scores:
        return {**row, "skipped": scores["skipped"]}
    write_scores(folder, scores)
    row.update({k: scores[k] for k in ("dino", "clip_i", "clip_t") if k in scores})
    for key, value in scores.get("prior", {}).items():
        if key != "prompt":
            row[f"prior_{key}"] = value
    return row


def _best(rows: list[dict], scoring) -> tuple[str | None, str]:
    from booth.dreambooth.evaluation import best_checkpoint

    if scoring is None:
        return None, "not scored (score=false): judge grid.png by eye"
    if isinstance(scoring, str):
        return None, "not scored: judge grid.png by eye"
    return best_checkpoint(rows)


def _grid(folder: Path, rows: list[dict], results: list, prompts: list[str], render: Render,
          run: str, best: str | None) -> Path | None:
    """One row per checkpoint: its images of every prompt side by side, labelled with its
    name and scores; the prompts on top."""
    from booth.dreambooth.grids import labelled_grid

    per_prompt = render.num_images_per_prompt
    cells = {(index, row * per_prompt + col): path
             for index, result in enumerate(results)
             for (row, col), path in result.cells.items()}
    if not cells:
        return None
    labels = [_label(row) for row in rows]
    grid = folder / "grid.png"
    labelled_grid(cells, len(results), len(prompts) * per_prompt, row_labels=labels,
                  title=_title(run, prompts, per_prompt, best)).save(grid)
    return grid


def _label(row: dict) -> str:
    # Two lines fit a 64 px row: the name, then the two figures the best one is chosen by.
    figures = " ".join(f"{name} {row[key]:.3f}" for key, name in
                       (("dino", "DINO"), ("clip_t", "CLIP-T")) if row.get(key) is not None)
    return f"{row['checkpoint']} {figures}".strip()


def _title(run: str, prompts: list[str], per_prompt: int, best: str | None) -> str:
    if len(prompts) == 1:
        title = f"run {run}: {prompts[0]!r}"
    else:
        spans = [f"{i * per_prompt + 1}-{(i + 1) * per_prompt}: {p!r}"
                 for i, p in enumerate(prompts)]
        title = f"run {run}, columns " + "; ".join(spans)
    return f"{title}. Best: {best}" if best else title
