"""Where booth keeps what it makes, and the guard that keeps names inside it.

    <workspace>/datasets/<name>/      prepared images + manifest.json
    <workspace>/priors/<key>/         generated class images + priors.json
    <workspace>/runs/<name>/          run.yaml, metrics.jsonl, logs/, checkpoints/, validation/,
                                      loss.png, final model
    <workspace>/samples/<name>/       sampled PNGs and a grid
    <workspace>/transcripts/          one JSONL file per chat session
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from booth.schema import pattern
from booth.tools.registry import ToolError

DEFAULT_WORKSPACE = "booth-workspace"
# No '..' anywhere: the name must never climb out of its folder.
NAME_PATTERN = pattern(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                       "1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                       "digit, with no '..'")
_NAME_RE = re.compile(NAME_PATTERN[1:-1])  # fullmatch: `$` would let a trailing newline in


def check_name(name: str, what: str = "name") -> str:
    """A dataset or run name the model or user chose; never a path."""
    if not _NAME_RE.fullmatch(name):
        raise ToolError(
            f"{what} {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no slashes, no '..')"
        )
    return name


def check_links(path: Path, folder: Path, label: str) -> None:
    """Refuse (ToolError) when `path` is a link leading out of `folder`, or holds a link leading
    out of `path` itself (checkpoints/, final/, an image...), or a link loop. Links that stay
    inside are fine. A dangling link counts by where it points: writing would create that."""
    if path.is_symlink():
        _refuse_outward(path, Path(os.path.realpath(folder)), label, f"{folder.name}/")
    if not path.is_dir():
        return
    top = Path(os.path.realpath(path))
    for parent, dirs, files in os.walk(path):  # links to folders are listed, never entered
        for name in dirs + files:
            entry = Path(parent, name)
            if entry.is_symlink():
                inner = f"{label}/{entry.relative_to(path).as_posix()}"
                _refuse_outward(entry, top, inner, f"{label}/")


def _refuse_outward(link: Path, inside: Path, label: str, where: str) -> None:
    real = Path(os.path.realpath(link))
    target = os.readlink(link)
    if real.is_symlink():  # realpath stops where the links go round in a circle
        raise ToolError(f"{label} is a symbolic link loop ({target}); remove it")
    if real == inside or inside in real.parents:
        return
    missing = "" if os.path.lexists(real) else ", which does not exist"
    raise ToolError(
        f"{label} is a symbolic link to {real}{missing}, outside {where}: booth writes and "
        f"deletes there, so it does not follow such links. Move the folder into {inside} "
        "instead, or link the whole folder (e.g. runs/) to another disk")


def remove_inside(path: Path, folder: Path) -> None:
    """Delete `path`, a folder booth made under `folder`: never a link, never elsewhere."""
    real_folder = Path(os.path.realpath(folder))
    if path.is_symlink() or Path(os.path.realpath(path)).parent != real_folder:
        raise ToolError(f"refusing to delete {path}: it is not a folder directly in {folder}")
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_option(cls, value: str | os.PathLike | None) -> Workspace:
        chosen = value or os.environ.get("BOOTH_WORKSPACE") or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().resolve())

    def _child(self, kind: str, name: str, what: str) -> Path:
        # check_name forbids separators and '..', so the name cannot leave `kind`; the folder
        # itself may be a link elsewhere (runs/ on a bigger disk), which is the user's choice.
        # A link at the entry, or inside it, is not: tools write and delete through these
        # paths, so one leading out (or nowhere) is refused before anything is touched.
        path = self.root / kind / check_name(name, what)
        check_links(path, self.root / kind, f"{kind}/{name}")
        return path

    def dataset_dir(self, name: str) -> Path:
        return self._child("datasets", name, "dataset name")

    def priors_dir(self, key: str) -> Path:
        return self._child("priors", key, "prior set")

    def run_dir(self, name: str) -> Path:
        return self._child("runs", name, "run name")

    def existing_run(self, name: str) -> Path:
        """The folder of training run `name`, which must exist (it holds run.yaml)."""
        folder = self.run_dir(name)
        if not (folder / "run.yaml").is_file():
            known = ", ".join(self.names("runs")) or "none yet"
            raise ToolError(f"no training run {name!r} (runs in the workspace: {known})")
        return folder

    def samples_dir(self, name: str) -> Path:
        return self._child("samples", name, "sample set")

    @property
    def transcripts_dir(self) -> Path:
        return self.root / "transcripts"

    def names(self, kind: str) -> list[str]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        # Hidden folders are work in progress (.tmp-* while a dataset is swapped in).
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# Run statuses, as `describe_workspace` reports them.
COMPLETED = "completed"
INTERRUPTED = "interrupted"
TRAINING_OR_CRASHED = "training or crashed"
NO_FINAL_MODEL = "no final model"


def describe_workspace(workspace: Workspace) -> dict:
    """What exists in the workspace, as plain data (`booth ls --json`, the system prompt).

    Every file is read defensively: a missing or broken one leaves its field None (or an
    `error` naming the file), never an exception. The engine is imported here, not at the
    top: its checkpoint and config readers are cheap, and booth.tools must stay so.
    """
    def each(kind: str, describe) -> list[dict]:
        try:
            names = workspace.names(kind)
        except OSError:  # not readable: shown as empty rather than stopping a chat
            return []
        return [describe(workspace.root / kind / name) for name in names]

    return {
        "workspace": str(workspace.root),
        "datasets": each("datasets", _dataset),
        "prior_sets": each("priors", _prior_set),
        "runs": each("runs", _run),
        "sample_sets": each("samples", _sample_set),
        "sessions": _sessions(workspace.transcripts_dir),
    }


def _read_json(path: Path):
    """The parsed file, or None when missing or broken."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None


def _count(value) -> int | None:
    return len(value) if isinstance(value, list) else None


def _dataset(folder: Path) -> dict:
    manifest = _read_json(folder / "manifest.json")
    images = _count(manifest.get("images")) if isinstance(manifest, dict) else None
    if images is None:
        return {"name": folder.name, "images": None, "rejected": None, "instance_prompt": None,
                "class_prompt": None, "resolution": None,
                "error": "manifest.json missing or unreadable"}
    return {"name": folder.name, "images": images,
            "rejected": _count(manifest.get("rejected")) or 0,
            **{key: manifest.get(key) for key in ("instance_prompt", "class_prompt",
                                                   "resolution")},
            "error": None}


def _prior_set(folder: Path) -> dict:
    from booth.dreambooth.priors import existing_images, read_prior_set

    info = read_prior_set(folder)
    key = info.get("key") if isinstance(info, dict) else None
    readable = isinstance(key, dict)
    return {"name": folder.name, "images": len(existing_images(folder)),
            "prompt": key.get("prompt") if readable else None,
            "resolution": key.get("resolution") if readable else None,
            "error": None if readable else "priors.json missing or unreadable"}


def _run(folder: Path) -> dict:
    from booth.dreambooth.checkpoints import last_loss, list_checkpoints
    from booth.dreambooth.models import final_model_path

    try:
        checkpoints = list_checkpoints(folder)
    except OSError:
        checkpoints = []
    config = _run_config(folder / "run.yaml")
    final = final_model_path(folder)
    try:
        loss = last_loss(folder / "metrics.jsonl")
    except (OSError, ValueError):  # not UTF-8: a damaged file, not one the trainer wrote
        loss = None
    latest = checkpoints[-1] if checkpoints else None
    # "steps": those kept in the latest complete checkpoint, where a resume starts from.
    return {
        "name": folder.name,
        "config": config,
        "steps": latest[0] if latest else 0,
        "max_train_steps": config.get("max_train_steps") if config else None,
        "checkpoints": [step for step, _ in checkpoints],
        "last_loss": loss,
        "status": _run_status(folder, config, final, latest),
        "final_model": str(final) if final else None,
    }


def _run_status(folder: Path, config: dict | None, final: Path | None,
                latest: tuple[int, Path] | None) -> str:
    """How the run stands, from what the trainer leaves on disk: the final model once it
    completed; a checkpoint at the last step when stopped (Ctrl-C saves one after the last
    metrics line); metric lines written after the last checkpoint (or none yet) when the
    process is still going, or was killed."""
    from booth.dreambooth.checkpoints import STATE_FILE

    if final is not None:
        return COMPLETED
    if latest is None:
        return TRAINING_OR_CRASHED
    step, checkpoint_dir = latest
    wanted = config.get("max_train_steps") if config else None
    if isinstance(wanted, int) and step >= wanted:
        return NO_FINAL_MODEL  # killed while exporting: resume_checkpoint finishes it
    try:
        metrics = (folder / "metrics.jsonl").stat().st_mtime_ns
        checkpoint = (checkpoint_dir / STATE_FILE).stat().st_mtime_ns
    except OSError:
        return INTERRUPTED
    return TRAINING_OR_CRASHED if metrics > checkpoint else INTERRUPTED


def _run_config(path: Path) -> dict | None:
    """The run's settings worth showing, or None when run.yaml is missing or broken."""
    from booth.dreambooth.config import SUMMARY_FIELDS, ConfigError, load_config

    try:
        config = load_config(path)
    except (ConfigError, TypeError):  # unreadable, not YAML, unknown or odd fields
        return None
    return {name: getattr(config, name) for name in SUMMARY_FIELDS}


def _sample_set(folder: Path) -> dict:
    info = _read_json(folder / "samples.json")
    info = info if isinstance(info, dict) else {}
    grid = folder / "grid.png"
    # A checkpoint comparison keeps each checkpoint's images one folder down.
    images = [*folder.glob("[0-9]*.png"), *folder.glob("*/[0-9]*.png")]
    return {"name": folder.name, "images": len(images),
            "prompts": info.get("prompts") if isinstance(info.get("prompts"), list) else None,
            "status": info.get("status"), "grid": str(grid) if grid.is_file() else None}


def _sessions(folder: Path) -> list[dict]:
    """The transcripts, oldest first (their names start with the date)."""
    from datetime import datetime

    try:
        files = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
    except OSError:
        return []
    sessions = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted while listing
        modified = datetime.fromtimestamp(stat.st_mtime).isoformat(timespec="seconds")
        sessions.append({"name": path.stem, "path": str(path), "bytes": stat.st_size,
                         "modified": modified})
    return sessions
