"""`booth doctor`: one command to run when something is off. Each line is a check, what it
found, and what to do about it.

The endpoint is probed the way `booth chat` calls it: booth's real tools offered, no forced
tool_choice (vLLM answers a forced choice through guided decoding even with its tool parser
off, so a forced probe would pass on the very misconfiguration it must catch), and the reply
read from the raw body. Only a structured `tool_calls` entry passes; a call written into the
text is what a server without its tool parser sends, and the check names the flag. No tool
is ever run. The base model is checked on disk only: nothing is downloaded.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import typer

from booth.commands import chat as chat_command
from booth.commands.checks import FAIL, OK, WARN, Check
from booth.commands.doctor_endpoint import endpoint_checks
from booth.commands.options import fail, tool_context

app = typer.Typer()

_MODEL_PARTS = ("unet", "vae", "text_encoder")  # each needs config.json and weights
_OTHER_PARTS = {"tokenizer": "*", "scheduler": "scheduler_config.json"}


def _chat_options(*names: str) -> list[inspect.Parameter]:
    """chat's own option declarations (the Endpoint panel, and `names`), so that doctor is
    reached exactly as chat is, with one definition of each option."""
    wanted = []
    for parameter in inspect.signature(chat_command.chat, eval_str=True).parameters.values():
        info = next(iter(getattr(parameter.annotation, "__metadata__", ())), None)
        panel = getattr(info, "rich_help_panel", None)
        if panel == chat_command._ENDPOINT or parameter.name in names:
            wanted.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return wanted


_ENDPOINT_OPTIONS = _chat_options("no_stream")


def with_endpoint_options(command):
    """`command(options=...)` offered chat's endpoint options; `options` holds them as
    `resolve_settings` takes them."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "options"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = {p.name: kwargs.pop(p.name, None) for p in _ENDPOINT_OPTIONS}
        options["stream"] = False if options.pop("no_stream") else None
        return command(*args, options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *_ENDPOINT_OPTIONS])
    wrapper.__annotations__ = {**{p.name: p.annotation for p in own + _ENDPOINT_OPTIONS}}
    return wrapper


_HELP = (
    "Check Python, torch and the GPU, the endpoint's tool calling, the base model and the "
    "disk, and say what to do about each problem.\n\n"
    "The endpoint check costs one short chat request with booth's tools (two when streaming: "
    "one plain, one streamed); no tool is run and nothing is downloaded.\n\n"
    "Exits 1 when a check that blocks training or chatting fails (endpoint unreachable, tool "
    "calls not parsed by the server, base model unusable); a missing GPU is only a warning."
)


@app.command(help=_HELP)
@with_endpoint_options
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as one JSON "
                                          "object")] = False,
    *, options: dict,
) -> None:
    """Run every check, print one line each (or JSON), exit 1 if a blocking one failed."""
    checks = run_checks(tool_context(), options)
    failed = any(check.status == FAIL for check in checks)
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]},
                              ensure_ascii=False, indent=2))
    else:
        for check in checks:
            typer.echo(check.line())
    if failed:
        raise typer.Exit(1)


def run_checks(ctx, options: dict) -> list[Check]:
    from booth.agent.model import EndpointError
    from booth.agent.settings import resolve_settings

    try:  # a usage error (an unknown provider, no key for Mistral's API) before any check
        settings = resolve_settings(**options)
    except EndpointError as error:
        raise fail(str(error), 2) from None
    checks = [_python(), *_machine(), *endpoint_checks(settings)]
    base = _base_model(ctx.base_model)
    checks += [base.check, _disk(ctx.workspace.root, base.weights)]
    return _masked(checks, settings.secrets())


def _masked(checks: list[Check], secrets: list[str]) -> list[Check]:
    """Checks with the key and any URL password masked: a server's error text may echo them,
    and chat never shows them either."""
    from booth.agent.masking import Masker

    mask = Masker(secrets)
    return [replace(c, **{k: mask(v) for k, v in asdict(c).items()
                                     if isinstance(v, str)}) for c in checks]


# --- Python, torch, GPU, libraries -----------------------------------------------------------


def _python() -> Check:
    # booth does not install on an older Python than it needs: this says which one runs it.
    return Check("python", OK, f"{'.'.join(map(str, sys.version_info[:3]))} ({sys.executable})")


def _machine() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", FAIL, "not installed", "install the torch wheel for your "
                      "machine (https://pytorch.org/get-started/locally/)")]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    checks = [Check("torch", OK, f"{torch.__version__} ({build})")]
    if not torch.cuda.is_available():
        fix = ("install a CUDA build of torch" if not torch.version.cuda
               else "check the NVIDIA driver (nvidia-smi)")
        checks.append(Check("gpu", WARN, "no CUDA GPU: training runs on the CPU, slowly",
                            fix))
    else:
        checks += _gpu(torch)
    return checks + _libraries(torch.cuda.is_available())


def _gpu(torch) -> list[Check]:
    free, total = torch.cuda.mem_get_info(0)
    name = torch.cuda.get_device_name(0)
    more = f" (+{torch.cuda.device_count() - 1} more)" if torch.cuda.device_count() > 1 else ""
    memory = f"{total / 2**30:.1f} GB, {free / 2**30:.1f} GB free"
    fix = "" if free >= 8 * 2**30 else ("under 8 GB free: train with use_lora=true, or close "
                                        "what else uses the GPU (nvidia-smi)")
    checks = [Check("gpu", WARN if fix else OK, f"{name}{more}, {memory}", fix)]
    if torch.cuda.is_bf16_supported():
        checks.append(Check("bf16", OK, "supported: mixed_precision 'bf16' works"))
    else:
        checks.append(Check("bf16", WARN, "not supported on this GPU",
                            "use mixed_precision 'fp16'"))
    return checks


def _libraries(cuda: bool) -> list[Check]:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    missing = [name for name, v in found.items() if v is None]
    listed = ", ".join(f"{name} {v}" for name, v in found.items() if v)
    checks = [Check("libraries", FAIL, f"{', '.join(missing)} not installed ({listed})",
                    f"pip install {' '.join(missing)}") if missing
              else Check("libraries", OK, listed)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        checks.append(Check("8-bit adam", OK, "bitsandbytes installed"))
    elif cuda:
        checks.append(Check("8-bit adam", WARN, "bitsandbytes not installed: use_8bit_adam "
                            "falls back to plain AdamW", "pip install bitsandbytes"))
    return checks


# --- the base model and the disk -------------------------------------------------------------


@dataclass
class _Base:
    check: Check
    weights: dict[str, int]  # bytes of weights per component, when the model is usable


def _base_model(base_model: str) -> _Base:
    from booth.dreambooth.errors import UserError
    from booth.dreambooth.loading import resolve_base_model

    try:
        source = resolve_base_model(base_model)
    except UserError as error:
        return _Base(Check("base model", FAIL, str(error), "pass --base-model"), {})
    folder = Path(source)
    where = "local folder"
    if not folder.is_dir():
        folder, where = _hub_snapshot(source), "hub cache"
        if folder is None:  # the first run downloads it: not blocking, unless offline
            return _Base(Check("base model", WARN, f"{source} is not in the hub cache: the "
                               "first run downloads it (about 4 GB), offline it cannot load",
                               f"huggingface-cli download {source}, or pass a local folder "
                               "with --base-model"), {})
    problems, weights = _pipeline_parts(folder)
    if problems:
        return _Base(Check("base model", FAIL, f"{source} ({where}) cannot be loaded: "
                           f"{'; '.join(problems)}", "pass a complete diffusers SD-1.x "
                           "folder or hub id with --base-model"), {})
    size = sum(weights.values())
    return _Base(Check("base model", OK, f"{source} ({where}, {_size(size)} of weights)"),
                 weights)


def _hub_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def _pipeline_parts(folder: Path) -> tuple[list[str], dict[str, int]]:
    """What keeps `folder` from loading as an SD pipeline offline, and each component's weight
    bytes. The files are looked at, not loaded: a 4 GB model would take a while."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return [f"model_index.json unreadable ({error})"], {}
    if not isinstance(index, dict):
        return ["model_index.json holds no mapping"], {}
    problems, weights = [], {}
    for part in _MODEL_PARTS:
        files = _weight_files(folder / part)
        if part not in index or not (folder / part / "config.json").is_file():
            problems.append(f"no {part}/ with a config.json")
        elif not files:
            problems.append(f"no weights in {part}/ (*.safetensors or *.bin)")
        else:
            weights[part] = sum(f.stat().st_size for f in files)
    for part, pattern in _OTHER_PARTS.items():
        if part not in index or not any((folder / part).glob(pattern)):
            problems.append(f"no {part}/")
    return problems, weights


def _weight_files(folder: Path) -> list[Path]:
    """The weights from_pretrained would read: safetensors first, full precision first; a
    link into the hub cache whose blob is missing does not count."""
    for suffix in (".safetensors", ".bin"):
        files = [f for f in folder.glob(f"*{suffix}") if f.is_file()]
        full = [f for f in files if ".fp16." not in f.name]
        if full or files:
            return full or files
    return []


# A default run (TrainConfig: 400 steps, a checkpoint every 200) writes two checkpoints of the
# trained weights with AdamW's two moments (3x those weights) and a final pipeline.
_DEFAULT_CHECKPOINTS = 2
_CHECKPOINT_FACTOR = 3


def _disk(root: Path, weights: dict[str, int]) -> Check:
    where = root
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if not weights:
        return Check("disk", OK, f"{_size(free)} free at {where} (no estimate without a "
                     "usable base model)")
    trained = weights.get("unet", 0) + weights.get("text_encoder", 0)
    need = _DEFAULT_CHECKPOINTS * _CHECKPOINT_FACTOR * trained + sum(weights.values())
    detail = (f"{_size(free)} free at {where}; a default run writes about {_size(need)} "
              f"({_DEFAULT_CHECKPOINTS} checkpoints and the final model)")
    if free < need:
        return Check("disk", FAIL, detail, "free some space, set checkpoints_total_limit=1, "
                     "or train with use_lora=true (small checkpoints)")
    return Check("disk", OK, detail)


def _size(count: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if count >= scale / 10:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.0f} KB"
