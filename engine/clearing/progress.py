"""A progress bar per phase, on stderr: redrawn in place on a terminal, a line per tenth otherwise."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """`with Progress("settle", total) as bar: bar.advance(1)`; `stream=None` is silent."""

    def __init__(self, phase: str, total: int, stream: Optional[TextIO] = sys.stderr, unit: str = ""):
        self.phase, self.total, self.stream, self.unit = phase, max(int(total), 0), stream, unit
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last_tenth = -1

    def __enter__(self) -> "Progress":
        self._draw()
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.stream is None:
            return
        if kind is None:
            self.done = self.total
            self._draw(final=True)
        elif self._tty:
            self.stream.write("\n")
        self.stream.flush()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def _draw(self, final: bool = False) -> None:
        if self.stream is None:
            return
        frac = self.done / self.total if self.total else 1.0
        tenth = int(frac * 10)
        if not self._tty and not final and tenth == self._last_tenth:
            return
        self._last_tenth = tenth
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"{self.phase:<10} [{bar}] {self.done}/{self.total}{self.unit} {self.seconds:6.1f} s"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        elif final or tenth < 10:
            self.stream.write(line + "\n")
        self.stream.flush()
