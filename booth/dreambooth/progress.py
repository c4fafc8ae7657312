"""The engine's progress bars (training, class images, samples, photos): one builder, so each
shows the same label, bar and count, plus the columns that matter for what it measures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Seconds per unit this machine measured for the work about to run ("training": per step,
# "images": per image), set by the tool that knows (see `expected_pace`).
_PACE: ContextVar[dict[str, float] | None] = ContextVar("booth_expected_pace", default=None)


@contextmanager
def expected_pace(**seconds_per_unit: float | None) -> Iterator[None]:
    """Bars made inside show a time left from these measured paces until they have measured
    their own (rich needs a few updates first, and a first step can take minutes)."""
    known = {kind: pace for kind, pace in seconds_per_unit.items() if pace}
    token = _PACE.set({**(_PACE.get() or {}), **known})
    try:
        yield
    finally:
        _PACE.reset(token)


def progress_bar(console, label: str, *columns, transient: bool = False,
                 disable: bool = False, speed_estimate_period: float = 30.0):
    """A rich Progress: label, bar, "done/total", then `columns`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *columns,
                    console=console, transient=transient, disable=disable,
                    speed_estimate_period=speed_estimate_period)


def training_progress(console, total: int, completed: int, disable: bool = False):
    """The training bar with loss, steps/s and time left; returns (progress, task id)."""
    from rich.progress import ProgressColumn, TextColumn
    from rich.text import Text

    class StepsPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} steps/s" if task.speed else "-- steps/s")

    progress = progress_bar(console, "[bold]training", TextColumn("loss {task.fields[loss]}"),
                            StepsPerSecond(), _time_left("training"), disable=disable)
    task = progress.add_task("training", total=total, completed=completed, loss="--")
    return progress, task


@contextmanager
def image_progress(console, label: str, total: int, done: int = 0
                   ) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`. `done` images already exist (reused) and do not count for speed.
    Without a console nothing is drawn."""
    if console is None:
        yield lambda n: None
        return
    from rich.progress import TimeElapsedColumn

    # Over the whole run, not rich's 30 s window: one batch can take longer than that.
    bar = progress_bar(console, label, _seconds_per_image(), TimeElapsedColumn(),
                       _time_left("images"), speed_estimate_period=3600)
    with bar:
        task = bar.add_task(label, total=total, completed=done, reused=done)
        yield lambda n: bar.advance(task, n)


def _seconds_per_image():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SecondsPerImage(ProgressColumn):
        def render(self, task):
            made = task.completed - task.fields.get("reused", 0)
            elapsed = task.finished_time or task.elapsed
            if not made or not elapsed:
                return Text("- s/img", style="cyan")
            return Text(f"{elapsed / made:.2f} s/img", style="cyan")

    return SecondsPerImage()


def _time_left(kind: str):
    """rich's time remaining once the bar has measured its speed; before, `~h:mm:ss` from the
    pace this machine measured for `kind` of work (nothing if it measured none)."""
    from rich.progress import ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    pace = (_PACE.get() or {}).get(kind)

    class TimeLeft(ProgressColumn):
        own = TimeRemainingColumn()

        def render(self, task):
            if task.speed is None and pace and task.total is not None and not task.finished:
                left = int((task.total - task.completed) * pace)
                clock = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
                return Text(f"~{clock}", style="progress.remaining")
            return self.own.render(task)

    return TimeLeft()
