"""Known secrets (the API key, a password in the URL) replaced by *** in what booth shows.

The transcript writer masks what it writes; this masks what reaches the terminal: the
endpoint's messages and streamed text (`Masker`), and everything a console prints
(`MaskingFile`, installed by `ChatUI.hide`).
"""

from __future__ import annotations

from typing import Any


class Masker:
    """Replaces known secrets by *** in text shown piece by piece: it holds back the tail
    that could be the start of a secret until the next piece (or `flush`) decides."""

    def __init__(self, secrets: list[str]):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._held = ""

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def feed(self, text: str) -> str:
        if not self.secrets:
            return text
        text = self(self._held + text)
        keep = max(len(s) for s in self.secrets) - 1
        cut = len(text)
        for size in range(1, min(keep, len(text)) + 1):  # the longest tail a secret starts
            if any(s.startswith(text[-size:]) for s in self.secrets):
                cut = len(text) - size
        self._held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class MaskingFile:
    """A console's file with secrets masked in every write (rich writes whole lines, so a
    secret is only missed if a table folds it over two lines)."""

    def __init__(self, file: Any, secrets: list[str]):
        self._file, self._mask = file, Masker(secrets)

    def write(self, text: str) -> int:
        return self._file.write(self._mask(text))

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, getvalue...
        return getattr(self._file, name)
