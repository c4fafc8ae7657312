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
    """SIGTERM (a `kill`, a job scheduler) or SIGHUP (the terminal closed): booth is to exit,
    with 128 + the signal's number, once the running tool has stopped at a safe point. A
    BaseException, so that no `except Exception` on the way can swallow it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.exit_code = 128 + signum
        self.signal_name = signal.Signals(signum).name


EXIT_TERMINATED = 128 + signal.SIGTERM
# Both end booth gently; SIGHUP is missing on Windows.
ENDING_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None),
                                   getattr(signal, "SIGHUP", None)) if s is not None)


def _terminals() -> list[int]:
    """stdout and stderr where they are a terminal. Asked before any hang-up: a terminal
    that hung up no longer says it is one."""
    found = []
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                found.append(fd)
        except OSError:
            continue
    return found


def _hung_up(signum: int, terminals: list[int]) -> None:
    """After SIGHUP the terminal is gone and every write to it fails (EIO): point its file
    descriptors at /dev/null, so the tool can still stop cleanly, save and be recorded."""
    if signum != getattr(signal, "SIGHUP", None) or not terminals:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in terminals:
        os.dup2(null, fd)
    os.close(null)


@contextmanager
def _handling(signals: tuple[int, ...], handler) -> Iterator[None]:
    """`handler(signum, terminals)` for `signals` while the block runs, the previous handlers
    back after it. Signals reach the main thread only: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    terminals = _terminals()

    def on_signal(signum, frame):
        _hung_up(signum, terminals)
        handler(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def terminate_raises():
    """While a session waits (for the model, at a prompt), SIGTERM or SIGHUP raises
    Terminated, so the session can record its end and say where it is saved before it exits;
    a running tool is stopped gently by `ToolContext.interruptible` instead."""

    def on_terminate(signum):
        raise Terminated(signum)

    return _handling(ENDING_SIGNALS, on_terminate)


def _free_gpu_memory() -> float | None:
    """Bytes free on the CUDA card the tools use, or None without one (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.mem_get_info()[0])


def _used_gpu_memory() -> float | None:
    """Bytes others hold on the CUDA card (all in use but this process's own cache), or
    None without one: with the LLM server the only other tenant, what it could free."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return float(max(0, total - free - torch.cuda.memory_reserved()))


def _load_inference_pipeline(base_model: str, precision: str | None = None):
    from booth.dreambooth.loading import load_inference_pipeline

    return load_inference_pipeline(base_model, precision)


@dataclass
class ToolContext:
    workspace: Workspace
    base_model: str = DEFAULT_BASE_MODEL
    # Progress bars and messages: stderr, so `booth call` keeps stdout for the JSON result.
    console: Console = field(default_factory=lambda: Console(stderr=True))
    # Set by the first Ctrl-C or by SIGTERM: long tools stop at a safe point (training saves
    # a checkpoint) and return normally, reporting that they were interrupted.
    stop_requested: threading.Event = field(default_factory=threading.Event)
    # Set by SIGTERM or SIGHUP as well: once the tool has stopped, booth exits with
    # `exit_code` (128 + the signal).
    terminated: threading.Event = field(default_factory=threading.Event)
    exit_code: int = EXIT_TERMINATED
    # (base model, precision=None) -> a pipeline to generate images with (class images,
    # samples of the base model). A test passes a counting or pre-built one here.
    load_pipeline: Callable[[str], Any] = _load_inference_pipeline
    # Bytes free on the GPU now (None: no GPU): what memory plans compare with. The one
    # place a stand-in for CUDA is right, in tests on machines without a GPU.
    free_gpu_memory: Callable[[], float | None] = _free_gpu_memory
    used_gpu_memory: Callable[[], float | None] = _used_gpu_memory
    # Bytes the LLM server would free while a GPU tool runs (None: it will not, or nobody
    # knows); set by `booth chat` from booth.agent.gpu_share.
    server_gives_back: Callable[[], float | None] = lambda: None
    # A folder with clip/ and dino/ that sample scores images with (None: look for them, see
    # booth.dreambooth.evaluation.find_evaluators).
    eval_models: str | None = None

    @classmethod
    def from_options(cls, workspace: str | None = None, base_model: str | None = None,
                     console: Console | None = None,
                     eval_models: str | None = None) -> ToolContext:
        base_model = base_model or os.environ.get("BOOTH_BASE_MODEL") or DEFAULT_BASE_MODEL
        eval_models = eval_models or os.environ.get("BOOTH_EVAL_MODELS")
        return cls(
            workspace=Workspace.from_option(workspace),
            base_model=absolute_if_local(base_model),
            console=console or Console(stderr=True),
            eval_models=absolute_if_local(eval_models) if eval_models else None,
        )

    def interruptible(self, abort: type[BaseException] = KeyboardInterrupt,
                      again: str = "abort"):
        """While a tool runs: the first Ctrl-C sets `stop_requested` (the tool stops at a safe
        point and returns), the second raises `abort`. SIGTERM and SIGHUP stop the tool the
        same way and set `terminated`, for the caller to exit once the tool has returned; a
        second signal of any kind raises `abort`."""

        def on_signal(signum):
            if self.stop_requested.is_set():
                raise abort
            self.stop_requested.set()
            if signum in ENDING_SIGNALS:
                self.terminated.set()
                self.exit_code = 128 + signum
                what = (f"Terminated ({signal.Signals(signum).name}): stopping at the next "
                        "safe point, then exiting")
            else:
                what = f"Stopping at the next safe point (Ctrl-C again to {again})"
            # The tool's console draws the progress bar, so the line lands above it.
            self.console.print(f"[yellow]{what}...[/]")

        return _handling((signal.SIGINT, *ENDING_SIGNALS), on_signal)


def absolute_if_local(base_model: str) -> str:
    """A local model folder as an absolute path (what runs record must work from any
    directory); a hub id as it is."""
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model
