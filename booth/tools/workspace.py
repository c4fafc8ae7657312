"""Where booth keeps what it makes, and the guard that keeps names inside it.

    <workspace>/datasets/<name>/      prepared images + manifest.json
    <workspace>/priors/<key>/         generated class images + priors.json
    <workspace>/runs/<name>/          run.yaml, metrics.jsonl, logs/, checkpoints/, final model
    <workspace>/samples/<name>/       sampled PNGs and a grid
    <workspace>/transcripts/          one JSONL file per chat session
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from booth.tools.registry import ToolError

DEFAULT_WORKSPACE = "booth-workspace"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN[1:-1])  # fullmatch: `$` would let a trailing newline in


def check_name(name: str, what: str = "name") -> str:
    """A dataset or run name the model or user chose; never a path."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
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

