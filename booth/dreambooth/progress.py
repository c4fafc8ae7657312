"""The progress bar of image generation (class images, samples): count, speed, time left."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def image_progress(console, label: str, total: int, done: int = 0
                   ) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`. `done` images already exist (reused) and do not count for speed.
    Without a console nothing is drawn."""
    if console is None:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), _seconds_per_image(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                   speed_estimate_period=3600)
    with bar:
        task = bar.add_task(label, total=total, completed=done, reused=done)
        yield lambda n: bar.advance(task, n)


def _seconds_per_image():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SecondsPerImage(ProgressColumn):
        def render(self, task):
            # Over the whole run, not rich's 30 s window: one batch can take longer than that.
            made = task.completed - task.fields.get("reused", 0)
            elapsed = task.finished_time or task.elapsed
            if not made or not elapsed:
                return Text("- s/img", style="cyan")
            return Text(f"{elapsed / made:.2f} s/img", style="cyan")

    return SecondsPerImage()
