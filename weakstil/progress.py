"""One progress display for every long step: rich bars in a terminal, plain lines everywhere else.

``progress(enabled)`` returns a context manager with two methods, the subset of rich's ``Progress``
that weakstil uses::

    with progress(True) as bar:
        slides = bar.add_task("extract", total=len(paths), unit="slides")
        tiles = bar.add_task("tiles", unit="tiles")        # total unknown
        bar.update(tiles, advance=256)
        bar.update(slides, advance=1, stats="3 done, 0 skipped, 0 failed")

In a terminal each task is a bar with its count, its rate in its unit (``tiles/s``, ``slides/s`` or
``s/slide`` when slower than one a second), elapsed time and the ``stats`` text. When stderr is not a
terminal (CI, ``> log``, ``nohup``) the display writes one plain line per finished item of a task
with a total (a slide, a fold) and otherwise at most one line every ~10 s per task, plus a closing
line; never a carriage return, never a line over :data:`MAX_LINE` characters. A ``rate`` field given
to ``update`` replaces the computed rate (e.g. the runner's rate over the slides it actually ran).

Ground floor: imports nothing from weakstil; rich is imported inside the functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Self

MAX_LINE = 300  # characters; the longest line the plain display writes
PLAIN_INTERVAL_S = 10.0  # seconds between plain lines of a task that is not finishing items


def rate_text(n: float, seconds: float, unit: str = "it") -> str:
    """``"12 tiles/s"``, ``"1.5 slides/s"``, or ``"2.5 s/slide"`` below one per second; ``""`` unknown."""
    if n <= 0 or seconds <= 0:
        return ""
    per_s = n / seconds
    if per_s >= 10:
        return f"{per_s:,.0f} {unit}/s"
    if per_s >= 1:
        return f"{per_s:.1f} {unit}/s"
    singular = unit[:-1] if unit.endswith("s") and len(unit) > 1 else unit
    return f"{seconds / n:.1f} s/{singular}"


def progress(enabled: bool = True, *, console: Any = None, interval_s: float = PLAIN_INTERVAL_S,
             clock: Callable[[], float] = time.monotonic) -> Any:
    """The display for this run: off, rich bars (``console`` is a terminal) or plain lines.

    ``console`` defaults to a rich Console on stderr; tests pass one writing to a buffer.
    """
    if not enabled:
        return NullProgress()
    from rich.console import Console

    console = console if console is not None else Console(stderr=True)
    if console.is_terminal and not console.is_dumb_terminal:
        return RichProgress(console)
    return PlainProgress(console.file, interval_s=interval_s, clock=clock)


class NullProgress:
    """Accepts every call and shows nothing (``--quiet``, worker processes)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, *, total: float | None = None, unit: str = "it",
                 **fields: Any) -> int:
        return 0

    def update(self, task: int, *, advance: float = 0, description: str | None = None,
               **fields: Any) -> None:
        return None


class RichProgress(NullProgress):
    """rich bars: description, bar, count, rate, elapsed, remaining, stats."""

    def __init__(self, console: Any) -> None:
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
            def render(self, task: Any) -> Text:
                given = task.fields.get("rate")
                if given:
                    return Text(str(given))
                unit = task.fields.get("unit", "it")
                speed = task.speed
                if speed is not None:
                    return Text(rate_text(speed, 1.0, unit))
                return Text(rate_text(task.completed, task.elapsed or 0.0, unit) or f"– {unit}/s")

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[stats]}"), console=console)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def add_task(self, description: str, *, total: float | None = None, unit: str = "it",
                 **fields: Any) -> int:
        fields.setdefault("stats", "")
        return self._progress.add_task(description, total=total, unit=unit, **fields)

    def update(self, task: int, *, advance: float = 0, description: str | None = None,
               **fields: Any) -> None:
        self._progress.update(task, advance=advance or None, description=description, **fields)


@dataclass
class _PlainTask:
    description: str
    total: float | None
    unit: str
    started: float
    last_line: float
    completed: float = 0.0
    fields: dict = field(default_factory=dict)
    dirty: bool = False  # changed since its last line


class PlainProgress(NullProgress):
    """Plain lines for logs: one per finished item of a task with a total, else one per interval."""

    def __init__(self, file: IO[str], *, interval_s: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._file = file
        self._interval_s = float(interval_s)
        self._clock = clock
        self._tasks: list[_PlainTask] = []

    def __exit__(self, *exc: object) -> None:
        for task in self._tasks:
            if task.dirty:
                self._write(task)

    def add_task(self, description: str, *, total: float | None = None, unit: str = "it",
                 **fields: Any) -> int:
        now = self._clock()
        self._tasks.append(_PlainTask(description, total, unit, now, now, fields=dict(fields)))
        return len(self._tasks) - 1

    def update(self, task: int, *, advance: float = 0, description: str | None = None,
               **fields: Any) -> None:
        t = self._tasks[task]
        t.completed += advance or 0
        if description is not None:
            t.description = description
        t.fields.update(fields)
        t.dirty = True
        finished_item = bool(advance) and t.total is not None
        if finished_item or self._clock() - t.last_line >= self._interval_s:
            self._write(t)

    def line(self, t: _PlainTask) -> str:
        """One line for task ``t``: ``desc: 3/10 slides, 1.5 slides/s, 12 s, stats``."""
        elapsed = self._clock() - t.started
        count = f"{t.completed:,.0f}/{t.total:,.0f}" if t.total is not None else f"{t.completed:,.0f}"
        parts = [f"{t.description}: {count} {t.unit}",
                 str(t.fields.get("rate") or rate_text(t.completed, elapsed, t.unit)),
                 f"{elapsed:.0f} s", str(t.fields.get("stats") or "")]
        text = ", ".join(p for p in parts if p)
        text = " ".join(text.split())  # no \r, \n or tab runs inside a line
        return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"

    def _write(self, t: _PlainTask) -> None:
        self._file.write(self.line(t) + "\n")
        self._file.flush()
        t.last_line = self._clock()
        t.dirty = False
