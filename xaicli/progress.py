"""Progress display: a rich bar (images/s, ETA) for the CLI; nothing when quiet."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """images/s, or seconds per image when that reads better (slower than one image a second)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        return Text(rate_text(speed), style="cyan")


def rate_text(speed: float | None) -> str:
    if not speed:
        return "-- img/s"
    return f"{speed:.1f} img/s" if speed >= 1 else f"{1 / speed:.1f} s/img"


class InnerProgress:
    """Moves the bar inside a long batch: the inner loops of its methods (ops.Chunker.on_chunk)
    report how far they are, and the bar shows that fraction of the batch's images.

    The first loop a method announces is its outermost one (SmoothGrad's samples, not the IG path
    inside each sample); loops nested in it are ignored. Updates at most every MIN_INTERVAL s.
    """

    MIN_INTERVAL = 0.25

    def __init__(self, progress, images: int, methods: int):
        self.progress, self.images, self.methods = progress, images, max(1, methods)
        self.index, self.loop, self.last = 0, None, 0.0

    def method(self, i: int) -> None:
        self.index, self.loop = i, None

    def chunk(self, key, done: int, n: int) -> None:
        if self.loop is None:
            self.loop = key
        if key != self.loop or n <= 0:
            return
        now = time.monotonic()
        if now - self.last < self.MIN_INTERVAL:
            return
        self.last = now
        self.progress.partial(self.images * (self.index + done / n) / self.methods)


class RichProgress:
    def __init__(self, console: Console, description: str = "explaining"):
        self.console = console
        self.description = description
        self._p: Progress | None = None
        self._task = None

    def start(self, total: int) -> None:
        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task(self.description, total=total)
        self._done = 0

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._done += n
            self._p.update(self._task, completed=self._done)

    def partial(self, images: float) -> None:
        """Inside a batch: `images` (a fraction of the batch) beyond the finished ones."""
        if self._p is not None:
            self._p.update(self._task, completed=self._done + images)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


class TqdmProgress:
    """The same interface on tqdm, for the Python API (notebooks, scripts) outside the CLI."""

    def __init__(self, description: str = "explaining"):
        self.description = description
        self._bar = None

    def start(self, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=self.description, unit="img")
        self._done = 0

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._done += n
            self._bar.update(self._done - self._bar.n)

    def partial(self, images: float) -> None:
        if self._bar is not None:
            self._bar.update(round(self._done + images, 2) - self._bar.n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
