"""The engine's user errors: one family, caught in one place where tools run.

Anything raised as a `UserError` is something the person (or the model) can act on; its
message is complete and is shown as it is, without a traceback. Every other exception is a
bug and keeps its traceback: that is why no caller catches `ValueError` or `OSError` broadly
to turn them into messages.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError):
    """A config value is out of range or inconsistent; the message names the field."""


class ModelLoadError(UserError):
    """The base model cannot be found or loaded; the message says what to do."""


class TrainingError(UserError):
    """Training cannot start or go on (existing run, diverged loss); the message says why."""


class CheckpointError(UserError):
    """No checkpoint matches what was asked; the message lists the ones there are."""


class PriorSetError(UserError):
    """A class-image folder holds images made with other settings."""


class DatasetError(UserError):
    """The photo folders themselves cannot be used (not the individual photos: those are
    rejected one by one with a reason)."""
