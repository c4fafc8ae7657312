"""Shared pieces of the cost lines shown when the user approves a call."""

from __future__ import annotations


def device_kind() -> str:
    """'cuda', 'mps' or 'cpu': what the tools will run on (imports torch)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def duration(seconds: float) -> str:
    """A rough duration as a person says it: '40 s', '12 min', '2.5 h'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
