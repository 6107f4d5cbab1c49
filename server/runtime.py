"""Process-level tuning shared by the front-end and the writer process."""
from __future__ import annotations

import cProfile
import gc
import os


def tune_gc() -> None:
    """Fewer, cheaper garbage collections: what is loaded at start (policies, modules) is frozen
    out of the collector's view, and the young generation is collected every 20,000 allocations
    instead of 700 (each collection is a pause every in-flight call waits out)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


class profiled:
    """Development aid: with MEDSETTLE_PROFILE=path, cProfile the block into path.<name>."""

    def __init__(self, name: str):
        self.path = os.environ.get("MEDSETTLE_PROFILE")
        self.name = name
        self.prof = None

    def __enter__(self):
        if self.path:
            self.prof = cProfile.Profile()
            self.prof.enable()
        return self

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.disable()
            self.prof.dump_stats(f"{self.path}.{self.name}")
        return False
