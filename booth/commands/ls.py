"""`booth ls`: what the workspace holds, as tables for people or one JSON object for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from booth.commands.options import tool_context

app = typer.Typer()


@app.command("ls")
def list_workspace(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print everything as one JSON object (the same data as the tables).")
    ] = False,
) -> None:
    """Show the datasets, prior sets, runs, sample sets and sessions in the workspace."""
    from booth.tools.workspace import describe_workspace

    state = describe_workspace(tool_context().workspace)
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]workspace:[/] {state['workspace']}", soft_wrap=True)
    for title, table in _tables(state):
        if table.row_count:
            console.print(table)
        else:
            console.print(f"[bold]{title}:[/] none yet")


def _tables(state: dict):
    from rich.table import Table
    from rich.text import Text

    datasets = Table("name", "images", "rejected", "instance prompt", "resolution",
                     title="Datasets", title_justify="left")
    for d in state["datasets"]:
        if d.get("error"):
            datasets.add_row(Text(d["name"]), "", "", Text(d["error"], style="red"), "")
        else:
            datasets.add_row(Text(d["name"]), str(d["images"]), str(d["rejected"]),
                             Text(_text(d["instance_prompt"])), _text(d["resolution"]))
    priors = Table("name", "images", "prompt", "resolution", title="Prior sets",
                   title_justify="left")
    for p in state["prior_sets"]:
        prompt = Text(p["error"], style="red") if p.get("error") else Text(_text(p["prompt"]))
        priors.add_row(Text(p["name"]), str(p["images"]), prompt, _text(p.get("resolution")))
    yield "Datasets", datasets
    yield "Prior sets", priors
    yield "Runs", _runs_table(state["runs"])
    samples = Table("name", "images", "prompts", "grid", title="Sample sets",
                    title_justify="left")
    for s in state["sample_sets"]:
        samples.add_row(Text(s["name"]), str(s["images"]),
                        Text("\n".join(map(str, s["prompts"] or []))),
                        "grid.png" if s["grid"] else "")
    yield "Sample sets", samples
    sessions = Table("transcript", "size", "modified", title="Sessions (transcripts/)",
                     title_justify="left")
    for s in state["sessions"]:
        sessions.add_row(Text(Path(s["path"]).name), _size(s["bytes"]), s["modified"])
    yield "Sessions", sessions


def _runs_table(runs: list[dict]):
    from rich.table import Table
    from rich.text import Text

    table = Table("name", "steps saved", "checkpoints", "last loss", "status", "final model",
                  title="Runs", title_justify="left")
    for r in runs:
        steps = f"{r['steps']} / {r['max_train_steps'] if r['max_train_steps'] else '?'}"
        loss = f"{r['last_loss']:.4g}" if r["last_loss"] is not None else ""
        style = "green" if r["final_model"] else "yellow"
        final = Text(Path(r["final_model"]).name + "/" if r["final_model"] else "")
        if r["config"] is None:
            final.append(" (run.yaml unreadable)", style="red")
        table.add_row(Text(r["name"]), steps, ", ".join(map(str, r["checkpoints"])) or "none",
                      loss, Text(r["status"], style=style), final)
    return table


def _size(count: int) -> str:
    return f"{count} B" if count < 1024 else f"{count / 1024:.1f} kB"


def _text(value) -> str:
    return "" if value is None else str(value)
