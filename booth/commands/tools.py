"""The tools without the model: `booth tools`, `booth call` and `booth tiny-model`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from booth.commands.options import fail, tool_context

app = typer.Typer()

@app.command("tiny-model")
def tiny_model(
    folder: Annotated[Path, typer.Argument(help="Where to write the pipeline folder.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    with_evaluators: Annotated[bool, typer.Option(
        "--with-evaluators", help="Also write tiny random CLIP and DINO models in "
        "DIR/evaluators, which sample scores its images with.")] = False,
) -> None:
    """Write a tiny random Stable Diffusion 1.x (diffusers format, ~9 MB) for offline trials."""
    from booth.dreambooth.evaluation import EVALUATORS_DIR
    from booth.dreambooth.tiny import save_tiny_evaluators, save_tiny_model

    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise fail(f"{folder} exists and is not an empty folder; choose a new folder")
    path = save_tiny_model(folder, seed=seed)
    if with_evaluators:
        save_tiny_evaluators(path / EVALUATORS_DIR, seed=seed)
    typer.echo(str(path.resolve()))


@app.command("tools")
def list_tools(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the exact tool schemas sent to the model.")
    ] = False,
) -> None:
    """List the tools the model can call (and that `booth call` runs)."""
    from booth.tools import TOOLS

    if as_json:
        typer.echo(json.dumps([t.openai_spec() for t in TOOLS.values()], indent=2))
        return
    from rich.console import Console

    console = Console()
    for spec in TOOLS.values():
        console.print(parameters_table(spec))


def parameters_table(spec):
    """One tool as a person reads it: what it does, then each parameter's type, default and
    bounds, all read from the schema the model gets."""
    from rich.table import Table
    from rich.text import Text

    table = Table("parameter (* = required)", "type", "default", "allowed",
                  title=f"[bold]{spec.name}[/]: {spec.description.splitlines()[0]}",
                  title_justify="left")
    required = set(spec.parameters["required"])
    for name, schema in spec.parameters["properties"].items():
        kind, allowed = schema.get("type", "?"), _allowed(schema)
        if kind == "array":
            item = schema.get("items", {})
            kind = f"list of {item.get('type', '?')}"
            allowed = ", ".join(filter(None, [allowed, _allowed(item, "each ")]))
        default = json.dumps(schema["default"]) if "default" in schema else ""
        table.add_row(name + ("*" if name in required else ""), kind, Text(default),
                      Text(allowed))  # patterns are full of brackets: text, not markup
    return table


def _allowed(schema: dict[str, Any], prefix: str = "") -> str:
    """The bounds of a JSON schema in words: `64 to 1024, multiple of 8`, `1 to 16 items`."""
    parts = [f"> {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema else "",
             _range(schema.get("minimum"), schema.get("maximum")),
             _range(schema.get("minLength"), schema.get("maxLength"), " characters"),
             _range(schema.get("minItems"), schema.get("maxItems"), " items")]
    if "multipleOf" in schema:
        parts.append(f"multiple of {schema['multipleOf']}")
    if "enum" in schema:
        parts.append(" | ".join(map(str, schema["enum"])))
    text = ", ".join(p for p in parts if p)
    return prefix + text if text else ""


def _range(low, high, unit: str = "") -> str:
    if low is not None and high is not None:
        return f"{low} to {high}{unit}"
    if low is not None:
        return f">= {low}{unit}"
    return f"<= {high}{unit}" if high is not None else ""


@app.command("call")
def call_tool(
    name: Annotated[str, typer.Argument(help="Tool name (see `booth tools`).")],
    arguments: Annotated[
        list[str] | None,
        typer.Argument(
            help="A JSON object ('{\"dataset\": \"rex\"}'), or key=value pairs "
            "(values read as JSON when they parse, else as text); a first @FILE reads them "
            "from a YAML/JSON file (e.g. @runs/rex-1/args.yaml), and pairs after it override.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the call and print what it would cost, as the approval "
        "prompt shows it, without running it.")] = False,
) -> None:
    """Run one tool directly, validated exactly as a model's call would be.

    The tool's JSON result is the only thing written to stdout; progress goes to stderr.
    """
    from booth.tools import ToolArgumentError, ToolError, get_tool
    from booth.tools.registry import parse_words

    context = tool_context()
    try:
        spec = get_tool(name)
        parsed = parse_words(arguments or [], spec.parameters)
        if dry_run:
            return _dry_run(spec, context, parsed)
        with context.interruptible():
            result = spec.run(context, parsed)
    except ToolError as error:
        # 2: the call was invalid and nothing ran; 1: the tool ran and failed.
        raise fail(str(error), code=2 if isinstance(error, ToolArgumentError) else 1) from None
    except KeyboardInterrupt:  # the second Ctrl-C
        raise fail("aborted; finished checkpoints are kept and resumable", code=130) from None
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, every process ran it
        typer.echo(json.dumps(result, indent=2, default=str))
    if context.terminated.is_set():
        hint = result.get("hint", "") if isinstance(result, dict) else ""
        ending = signal.Signals(context.exit_code - 128).name
        raise fail(f"terminated ({ending}): {name} stopped at a safe point. {hint}".strip(),
                   code=context.exit_code)


def _dry_run(spec, context, arguments: dict) -> None:
    """The validated call and its cost line; nothing runs."""
    from booth.agent.approval import cost_line

    validated = spec.validate(arguments)
    cost = cost_line(spec, context, validated)
    context.console.print(f"cost: {cost or 'no estimate for this tool'}", highlight=False)
    typer.echo(json.dumps({"tool": spec.name, "arguments": validated, "cost": cost}, indent=2,
                          default=str))
