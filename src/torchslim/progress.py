"""Progress of long-running work: a Rich bar with ETA on a terminal, one summary line per stage otherwise.

The library is silent unless asked: ``progress=None`` arguments follow the process setting, which is ``"off"``
until something turns it on (the ``torchslim`` command does, for the length of one command, unless ``--quiet``).
``progress=True`` asks for progress in any case (a bar on an interactive stderr, else lines), ``False`` never.

Modes:

- ``"bar"``: Rich progress bars on stderr with elapsed time and ETA; nested tasks share one live display.
- ``"lines"``: one plain line on stderr per epoch, batch or stage (``train: epoch 3/30: loss 0.1234 ...``),
  for logs and CI where a bar would be noise.
- ``"off"``: nothing.
- ``"auto"``: ``"bar"`` on an interactive stderr outside CI (``$CI`` unset), else ``"lines"``.

Under torchrun only rank 0 reports. Reporting never touches a random number generator or a tensor, so results
do not depend on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from torchslim.errors import ConfigError

__all__ = ["MODES", "Task", "configure", "current_mode", "label", "reporting", "resolve", "say", "task"]

MODES = ("auto", "bar", "lines", "off")

_mode: contextvars.ContextVar[str] = contextvars.ContextVar("torchslim_progress_mode", default="off")
_stream: contextvars.ContextVar[IO[str] | None] = contextvars.ContextVar("torchslim_progress_stream", default=None)
_label: contextvars.ContextVar[str | None] = contextvars.ContextVar("torchslim_progress_label", default=None)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"progress mode = {mode!r} is invalid: expected one of {', '.join(MODES)}")
    return mode


def configure(mode: str) -> None:
    """Set the process-wide progress mode that ``progress=None`` arguments follow (the default is ``"off"``).

    Args:
        mode: one of :data:`MODES`.

    Raises:
        ConfigError: an unknown mode.
    """
    _mode.set(_check_mode(mode))


@contextlib.contextmanager
def reporting(mode: str = "auto", stream: IO[str] | None = None) -> Iterator[None]:
    """Report progress in ``mode`` inside the block (the CLI wraps each command in one), then restore the setting.

    Args:
        mode: one of :data:`MODES`.
        stream: where bars and lines go (default: ``sys.stderr`` at the time of writing).

    Raises:
        ConfigError: an unknown mode.
    """
    mode_token = _mode.set(_check_mode(mode))
    stream_token = _stream.set(stream)
    try:
        yield
    finally:
        _stream.reset(stream_token)
        _mode.reset(mode_token)


def current_mode() -> str:
    """The process setting (one of :data:`MODES`), as ``progress=None`` sees it."""
    return _mode.get()


def _out() -> IO[str]:
    return _stream.get() or sys.stderr


def resolve(progress: bool | str | None = None) -> str:
    """The mode a call with ``progress`` reports in: ``"bar"``, ``"lines"`` or ``"off"``.

    Args:
        progress: None (follow the process setting), True (``"auto"``), False (``"off"``) or a mode name.

    Returns:
        ``"bar"``, ``"lines"`` or ``"off"`` (always ``"off"`` on torchrun ranks other than 0).

    Raises:
        ConfigError: an unknown mode name.
    """
    if progress is None:
        mode = _mode.get()
    elif isinstance(progress, bool):
        mode = "auto" if progress else "off"
    else:
        mode = _check_mode(progress)
    if mode == "off":
        return "off"
    from torchslim.distributed import is_main_process

    if not is_main_process():
        return "off"
    if mode == "auto":
        interactive = bool(getattr(_out(), "isatty", lambda: False)()) and not os.environ.get("CI")
        return "bar" if interactive else "lines"
    return mode


@contextlib.contextmanager
def label(name: str) -> Iterator[None]:
    """Name the tasks started inside the block that have no name of their own (``distill``, ``qat`` ...)."""
    token = _label.set(name)
    try:
        yield
    finally:
        _label.reset(token)


def default_label(fallback: str) -> str:
    """The name set by the innermost :func:`label` block, else ``fallback``."""
    return _label.get() or fallback


def format_seconds(seconds: float) -> str:
    """``"<1 s"``, ``"42 s"``, ``"3 min 05 s"`` or ``"1 h 02 min"``."""
    if seconds < 0.5:
        return "<1 s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def say(text: str, *, progress: bool | str | None = None) -> None:
    """Write one line of progress (a finished stage) unless reporting is off; above the bars while they show.

    Args:
        text: the line, without a newline.
        progress: as in :func:`resolve`.
    """
    mode = resolve(progress)
    if mode == "off":
        return
    if mode == "bar" and _Live.progress is not None:
        _Live.progress.console.print(text, markup=False, highlight=False)
        return
    stream = _out()
    stream.write(text + "\n")
    stream.flush()


class _Live:
    """The one Rich display that every bar task of the process shares (Rich allows one live display at a time)."""

    progress: Any = None
    users = 0

    @classmethod
    def acquire(cls) -> Any:
        if cls.progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            stream = _stream.get()
            console = Console(file=stream, force_terminal=True) if stream is not None else Console(stderr=True)
            cls.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            cls.progress.start()
        cls.users += 1
        return cls.progress

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users <= 0 and cls.progress is not None:
            cls.progress.stop()
            cls.progress, cls.users = None, 0


class Task:
    """One piece of work of ``total`` units: a bar (``"bar"``), summary lines (``"lines"``) or nothing (``"off"``).

    Use it as a context manager (from :func:`task`); :meth:`advance` after each unit, :meth:`line` for a summary
    line (printed in ``"lines"`` mode, above the bar in ``"bar"`` mode when ``also_bar``), :meth:`eta` for the
    estimated seconds left.
    """

    def __init__(self, description: str, total: float | None, mode: str, done: float = 0) -> None:
        self.description = description
        self.total = total
        self.mode = mode
        self.completed = float(done)
        self._done_before = float(done)
        self.started = time.perf_counter()
        self._bar = None
        self._id = None

    def __enter__(self) -> Task:
        self.started = time.perf_counter()
        if self.mode == "bar":
            self._bar = _Live.acquire()
            self._id = self._bar.add_task(self.description, total=self.total, completed=self.completed, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.refresh()  # draw the final state: a short task may end before the refresh thread's first tick
            self._bar.remove_task(self._id)
            self._bar = None
            _Live.release()

    @property
    def enabled(self) -> bool:
        """False when reporting is off (callers may skip building their summary text)."""
        return self.mode != "off"

    def elapsed(self) -> float:
        """Seconds since the task started."""
        return time.perf_counter() - self.started

    def eta(self) -> float | None:
        """Seconds left at the average rate so far, or None before the first unit or without a total."""
        progressed = self.completed - self._done_before
        if not self.total or progressed <= 0:
            return None
        return self.elapsed() * max(0.0, self.total - self.completed) / progressed

    def advance(self, amount: float = 1, *, description: str | None = None, info: str | None = None) -> None:
        """Count ``amount`` more units done; optionally change the bar's description or the text after it."""
        self.completed += amount
        if self._bar is not None:
            fields: dict[str, Any] = {} if info is None else {"info": info}
            if description is not None:
                fields["description"] = description
            self._bar.update(self._id, advance=amount, **fields)

    def update(self, *, completed: float | None = None, description: str | None = None,
               info: str | None = None) -> None:
        """Set the units done (e.g. seconds of a time budget) or the bar's texts without advancing."""
        if completed is not None:
            self.completed = completed
        if self._bar is not None:
            fields: dict[str, Any] = {} if info is None else {"info": info}
            if description is not None:
                fields["description"] = description
            self._bar.update(self._id, completed=completed, **fields)

    def line(self, text: str, *, also_bar: bool = False, eta: bool = True) -> None:
        """Write ``"description: text (elapsed; ETA ...)"`` in ``"lines"`` mode (``"bar"``: only with ``also_bar``).

        Args:
            text: what this unit or stage did.
            also_bar: print it above the bars too (for rare, important stages).
            eta: append the elapsed time and, with a total, the estimated time left.
        """
        if self.mode == "off" or (self.mode == "bar" and not also_bar):
            return
        timing = ""
        if eta:
            left = self.eta()
            timing = f" ({format_seconds(self.elapsed())}" + (
                f"; ETA {format_seconds(left)})" if left is not None and self.completed < self.total else ")")
        say(f"{self.description}: {text}{timing}", progress=self.mode)


def task(description: str, total: float | None = None, *, progress: bool | str | None = None,
         done: float = 0) -> Task:
    """A :class:`Task` in the mode ``progress`` resolves to; use it in a ``with`` block.

    Args:
        description: the name shown before the bar and each line, e.g. ``"train"``, ``"bn-inversion"``.
        total: units of work (steps, batches, seconds), or None when unknown (no ETA).
        progress: as in :func:`resolve`.
        done: units already done before this run (a resumed training run); not counted in the ETA's rate.

    Returns:
        The task (not started until entered).
    """
    return Task(description, total, resolve(progress), done)
