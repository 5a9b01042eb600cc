"""Progress display: a rich bar (images/s, ETA) for the CLI; nothing when quiet."""

from __future__ import annotations

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
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        return Text(f"{speed:.1f} img/s" if speed else "-- img/s", style="cyan")


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

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

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

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
