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
from dataclasses import dataclass
from pathlib import Path

from booth.tools.registry import ToolError

DEFAULT_WORKSPACE = "booth-workspace"
# No '..' anywhere: the name must never climb out of its folder.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN[1:-1])  # fullmatch: `$` would let a trailing newline in


def check_name(name: str, what: str = "name") -> str:
    """A dataset or run name the model or user chose; never a path."""
    if not _NAME_RE.fullmatch(name):
        raise ToolError(
            f"{what} {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no slashes, no '..')"
        )
    return name


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
        return self.root / kind / check_name(name, what)

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
