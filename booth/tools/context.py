"""What every tool receives besides its arguments."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from booth.dreambooth.config import DEFAULT_BASE_MODEL
from booth.tools.workspace import Workspace


class Terminated(BaseException):
    """SIGTERM (a `kill`, a closing terminal, a job scheduler): booth is to exit (status 143)
    once the running tool has stopped at a safe point. A BaseException, so that no
    `except Exception` on the way can swallow it."""


EXIT_TERMINATED = 128 + signal.SIGTERM


@contextmanager
def terminate_raises() -> Iterator[None]:
    """While a session waits (for the model, at a prompt), SIGTERM raises Terminated, so the
    session can say where it is saved before it exits; a running tool is stopped gently by
    `ToolContext.interruptible` instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _free_gpu_memory() -> float | None:
    """Bytes free on the CUDA card the tools use, or None without one (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.mem_get_info()[0])


def _load_inference_pipeline(base_model: str):
    from booth.dreambooth.loading import load_inference_pipeline

    return load_inference_pipeline(base_model)


@dataclass
class ToolContext:
    workspace: Workspace
    base_model: str = DEFAULT_BASE_MODEL
    # Progress bars and messages: stderr, so `booth call` keeps stdout for the JSON result.
    console: Console = field(default_factory=lambda: Console(stderr=True))
    # Set by the first Ctrl-C or by SIGTERM: long tools stop at a safe point (training saves
    # a checkpoint) and return normally, reporting that they were interrupted.
    stop_requested: threading.Event = field(default_factory=threading.Event)
    # Set by SIGTERM as well: once the tool has stopped, booth exits (EXIT_TERMINATED).
    terminated: threading.Event = field(default_factory=threading.Event)
    # base model -> a pipeline to generate images with (class images, samples of the base
    # model). A test passes a counting or pre-built one here.
    load_pipeline: Callable[[str], Any] = _load_inference_pipeline
    # Bytes free on the GPU now (None: no GPU): what memory plans compare with. The one
    # place a stand-in for CUDA is right, in tests on machines without a GPU.
    free_gpu_memory: Callable[[], float | None] = _free_gpu_memory

    @classmethod
    def from_options(cls, workspace: str | None = None, base_model: str | None = None,
                     console: Console | None = None) -> ToolContext:
        base_model = base_model or os.environ.get("BOOTH_BASE_MODEL") or DEFAULT_BASE_MODEL
        return cls(
            workspace=Workspace.from_option(workspace),
            base_model=absolute_if_local(base_model),
            console=console or Console(stderr=True),
        )

    @contextmanager
    def interruptible(self, abort: type[BaseException] = KeyboardInterrupt,
                      again: str = "abort") -> Iterator[None]:
        """While a tool runs: the first Ctrl-C sets `stop_requested` (the tool stops at a safe
        point and returns), the second raises `abort`. SIGTERM stops the tool the same way
        and sets `terminated`, for the caller to exit once the tool has returned; a second
        signal of either kind raises `abort`. Signals reach the main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if self.stop_requested.is_set():
                raise abort
            self.stop_requested.set()
            if signum == signal.SIGTERM:
                self.terminated.set()
                what = "Terminated (SIGTERM): stopping at the next safe point, then exiting"
            else:
                what = f"Stopping at the next safe point (Ctrl-C again to {again})"
            # The tool's console draws the progress bar, so the line lands above it.
            self.console.print(f"[yellow]{what}...[/]")

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def absolute_if_local(base_model: str) -> str:
    """A local model folder as an absolute path (what runs record must work from any
    directory); a hub id as it is."""
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model
