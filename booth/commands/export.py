"""`booth export`: a run's weights as the files A1111, ComfyUI and kohya's scripts load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from booth.commands.options import fail, tool_context

app = typer.Typer()


@app.command("export")
def export(
    run: Annotated[str, typer.Argument(
        help="A run name in the workspace, or the path of a run folder (with a '/').")],
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="Export this checkpoint ('latest', 'checkpoint-<step>' or "
        "'<step>') instead of the final model.")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="single-file (full fine-tunes), kohya-lora (LoRA runs) or diffusers.",
        show_default="single-file; kohya-lora for a LoRA run")] = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="fp16, fp32 or bf16.", show_default="the run's export_dtype")] = None,
) -> None:
    """Write a run's model (or a checkpoint) as one file for A1111, ComfyUI, kohya."""
    # The file goes to runs/<name>/export/, replacing an older export of the same name in one
    # rename; the path written and its size are printed.
    from booth.dreambooth.errors import UserError
    from booth.tools import ToolError

    try:
        run_dir = _run_folder(run)
        from booth.dreambooth.export import export_run

        written = export_run(run_dir, checkpoint, fmt, dtype)
    except (ToolError, UserError) as error:
        raise fail(str(error), 2) from None
    typer.echo(f"{written} ({_size(written)})")


def _run_folder(run: str) -> Path:
    """A name is looked up in the workspace (and checked as one); a path is taken as it is."""
    from booth.tools import ToolError

    if "/" in run or run.startswith("."):
        folder = Path(run).expanduser()
        if not (folder / "run.yaml").is_file():
            raise ToolError(f"{run} is not a run folder (no run.yaml)")
        return folder.resolve()
    return tool_context().workspace.existing_run(run)


def _size(path: Path) -> str:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    for unit in ("B", "kB", "MB"):
        if total < 1024:
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return f"{total:.2f} GB"
