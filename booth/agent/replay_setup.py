"""Where a replay runs, and how it stops a call where the recording stopped it.

A transcript's header records the session's workspace, base model and working folder. A
replay uses those by default, because the recorded calls name things relative to them (a
dataset in that workspace, `images_dir: "photos/rex"` relative to that folder); the global
options --workspace / --base-model (or their environment variables) override them. The
replay runs from the recorded working folder when it still exists, as the session did.

A call that the user stopped with Ctrl-C in the recording is stopped again at the same step:
`RecordedStop` stands in for the context's `stop_requested` event during a replay.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class ReplaySetupError(Exception):
    """The recorded places cannot be used and no replacement was given; the message says
    which flag gives one."""


@dataclass
class ReplayPlaces:
    workspace: str | None  # None: the usual default (as a chat would pick it)
    base_model: str | None
    cwd: Path | None  # the folder to run from; None: the current one
    lines: list[str] = field(default_factory=list)  # what the replay tells the user
    # The recorded workspace, already holding what the recorded session made: calls that
    # create a run of the same name are refused there, which shows as differences.
    into_recorded: bool = False


def choose_places(header: dict, workspace: str | None, base_model: str | None) -> ReplayPlaces:
    """The workspace, base model and folder a replay of the session in `header` runs with;
    `workspace` / `base_model` are what the user gave (None: not given)."""
    places = ReplayPlaces(None, None, None)
    _choose_workspace(places, header.get("workspace"), workspace)
    _choose_base_model(places, header.get("base_model"), base_model)
    _choose_cwd(places, header.get("cwd"))
    return places


def _choose_workspace(places: ReplayPlaces, recorded: str | None, given: str | None) -> None:
    if given:
        places.workspace = given
        places.lines.append(f"workspace: {Path(given).expanduser().resolve()} (given)")
        return
    if not recorded:
        places.lines.append("workspace: the default (the transcript records none)")
        return
    folder = Path(recorded)
    if folder.is_dir():
        places.into_recorded = any(folder.iterdir())
        places.lines.append(f"workspace: {folder} (recorded; --workspace to use another)")
    elif not folder.exists() and folder.parent.is_dir():
        places.lines.append(f"workspace: {folder} (recorded; it is gone, so the replay "
                            "starts it afresh)")
    else:
        raise ReplaySetupError(f"the recorded workspace {folder} cannot be used (it is not a "
                               "folder, and neither is its parent); give one with --workspace")
    places.workspace = recorded


def _choose_base_model(places: ReplayPlaces, recorded: str | None, given: str | None) -> None:
    if given:
        places.base_model = given
        places.lines.append(f"base model: {given} (given)")
    elif not recorded:
        places.lines.append("base model: the default (the transcript records none)")
    elif os.path.isabs(recorded) and not Path(recorded).exists():
        # A local folder is recorded as an absolute path; a hub id never is.
        raise ReplaySetupError(
            f"the recorded base model {recorded} no longer exists; give one with --base-model "
            "(the same model, or the results cannot match)")
    else:
        places.base_model = recorded
        places.lines.append(f"base model: {recorded} (recorded; --base-model to use another)")


def _choose_cwd(places: ReplayPlaces, recorded: str | None) -> None:
    if not recorded:
        return
    if Path(recorded).is_dir():
        places.cwd = Path(recorded)
        places.lines.append(f"working folder: {recorded} (recorded: relative paths in the "
                            "calls, such as images_dir, mean what they meant there)")
    else:
        places.lines.append(f"the recorded working folder {recorded} is gone: relative paths "
                            f"in the calls are taken from the current folder {os.getcwd()}")


@contextlib.contextmanager
def working_folder(folder: Path | None) -> Iterator[None]:
    """Run in `folder` (when given), and come back whatever happens."""
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


# -- the recorded Ctrl-C ---------------------------------------------------------------------
def recorded_stops(events: list[dict]) -> dict[str, dict]:
    """call id -> the recorded result of each call a Ctrl-C (or SIGTERM) stopped mid-way."""
    asked = {e["call_id"] for e in events if e["type"] == "interrupted" and e.get("call_id")}
    return {e["call_id"]: e.get("result") or {} for e in events
            if e["type"] == "tool_result" and e["call_id"] in asked}


class RecordedStop:
    """`ToolContext.stop_requested` during a replay. A real Ctrl-C still sets it; and while a
    call the recording stopped at step N runs, it becomes set once that run's metrics.jsonl
    (written after every optimizer step, before training polls for a stop) reaches step N.
    Only lines written after `stop_at` count: a run left by an earlier session never does."""

    def __init__(self):
        self._event = threading.Event()
        self._target: tuple[Path, int, tuple | None] | None = None

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        if not self._event.is_set() and self._target and _reached(*self._target):
            self._event.set()
        return self._event.is_set()

    def stop_at(self, metrics: Path | None, step: int | None = None) -> None:
        """Stop the next call once `metrics` reaches `step`; None: let it run to its end."""
        self._target = None if metrics is None else (metrics, int(step), _stamp(metrics))


def _stamp(path: Path) -> tuple | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _reached(metrics: Path, step: int, armed: tuple | None) -> bool:
    now = _stamp(metrics)
    if now is None or now == armed:
        return False
    with open(metrics, "rb") as file:
        file.seek(max(0, now[0] - 4096))
        lines = file.read().splitlines()
    try:
        return int(json.loads(lines[-1])["step"]) >= step
    except (IndexError, ValueError, KeyError, TypeError):
        return False
