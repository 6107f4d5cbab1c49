"""A progress bar per phase: the command line's bar (`engine.pipeline.Progress`) as a `with` block."""
from __future__ import annotations

import sys
from typing import Optional, TextIO

from ..pipeline import Progress


class PhaseProgress(Progress):
    """`with PhaseProgress("settle", buckets, stream) as bar: bar.advance()`; `stream=None` is silent.

    The bar is full when the block ends well; the phase names are padded so that the
    bars of successive phases line up."""

    def __init__(self, phase: str, total: int, stream: Optional[TextIO] = sys.stderr):
        super().__init__(max(int(total), 0), f"{phase:<9}", stream is not None, stream)

    def __enter__(self) -> "PhaseProgress":
        self.update(0, force=True)
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.done = self.total
        self.close()

    def advance(self, n: int = 1) -> None:
        self.update(min(self.total, self.done + n))
