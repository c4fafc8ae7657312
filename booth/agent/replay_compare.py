"""How a replayed tool result is compared with the recorded one.

What legitimately changes between runs is taken out first: fields that measure the run
(seconds, speed, dates), timestamps in names, and the places the session ran in (its
workspace, base model and folder become placeholders, so a replay elsewhere compares paths
relative to them); floats are compared with a small relative tolerance.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

# Result fields that measure the run rather than describe what it made.
_VOLATILE_KEY = re.compile(r"second|elapsed|time|speed|per_s|duration|created|date", re.I)
_TIMESTAMP = re.compile(r"\d{8}-\d{6}|\d{4}-\d\d-\d\dT[\d:.+-]+")
_FLOAT_TOLERANCE = 1e-6  # relative: a loss printed by another BLAS build may differ in its tail


@dataclass
class Comparison:
    call_id: str
    tool: str
    matches: bool
    differences: list[str] = field(default_factory=list)
    result: Any = None  # the new result, for whoever replays (the demo prints sample paths)
    not_run: bool = False  # the call ran in the recording, but not in the replay


def normalise(value: Any, replacements: dict[str, str]) -> Any:
    """A result with what legitimately changes between runs taken out."""
    if isinstance(value, dict):
        return {k: normalise(v, replacements) for k, v in value.items()
                if not _VOLATILE_KEY.search(k)}
    if isinstance(value, list):
        return [normalise(v, replacements) for v in value]
    if isinstance(value, str):
        for place, placeholder in replacements.items():
            value = value.replace(place, placeholder)
        return _TIMESTAMP.sub("<time>", value)
    return value


def differences(recorded: Any, new: Any, where: str = "") -> list[str]:
    """Human-readable differences between two normalised results."""
    label = where or "result"
    if isinstance(recorded, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(recorded) | set(new)):
            path = f"{where}.{key}" if where else key
            if key not in new:
                found.append(f"{path}: missing now")
            elif key not in recorded:
                found.append(f"{path}: not in the recording")
            else:
                found += differences(recorded[key], new[key], path)
        return found
    if isinstance(recorded, list) and isinstance(new, list) and len(recorded) == len(new):
        return [d for i, (a, b) in enumerate(zip(recorded, new, strict=True))
                for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(recorded, float) and isinstance(new, float):
        if math.isclose(recorded, new, rel_tol=_FLOAT_TOLERANCE, abs_tol=1e-12):
            return []
    if recorded == new:
        return []
    return [f"{label}: recorded {_short(recorded)}, now {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:79] + "…"


def compare(recorded: dict | None, new: dict, old_places: dict[str, str],
            new_places: dict[str, str]) -> Comparison:
    """Compare a new tool_result event with the recorded one for the same call."""
    comparison = Comparison(new["call_id"], new["tool"], matches=False,
                            result=new.get("result"))
    if recorded is None:
        comparison.differences = ["the recorded session has no result for this call"]
        return comparison
    before = normalise({k: recorded.get(k) for k in ("ok", "result", "error")}, old_places)
    after = normalise({k: new.get(k) for k in ("ok", "result", "error")}, new_places)
    comparison.differences = differences(before, after)
    comparison.matches = not comparison.differences
    return comparison
