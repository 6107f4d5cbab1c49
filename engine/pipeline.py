"""The threaded file pipeline of `settle` and `generate`: read ahead, work, write behind.

Arrow's readers and writers and the kernel release the GIL, so a reader thread
(`prefetch`), the main thread and a writer thread (`BackgroundWriter`) overlap
on the cores there are. `write_stream` is the writer half both commands share;
`batch_bounds` / `in_order` check the spec's order across streamed batches.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from . import _kernel
from .arrow_io import string_data, validity_bits
from .files import rebatch

_DONE = object()


def prefetch(items: Iterable, depth: int = 1) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead (Arrow's readers release the
    GIL, so reading the next batch overlaps the work on this one). Errors are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((True, x)):
                    return
            put((True, _DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))

    thread = threading.Thread(target=produce, name="medsettle-read", daemon=True)
    thread.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                raise x
            if x is _DONE:
                return
            yield x
    finally:
        stop.set()
        thread.join()


class BackgroundWriter:
    """Calls `write(x)` for each `submit(x)` on a background thread, at most `depth` queued;
    `close()` waits and re-raises the first error; `abort()` drops what is queued and waits
    for the write under way (so the file can be removed safely)."""

    def __init__(self, write: Callable, depth: int = 1):
        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="medsettle-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            x = self._q.get()
            if x is _DONE:
                return
            if self._error is None and not self._aborted:
                try:
                    self._write(x)
                except BaseException as e:  # noqa: BLE001 - re-raised by submit / close
                    self._error = e

    def submit(self, x) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(x)

    def close(self) -> None:
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._aborted = True
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(_DONE)
        self._thread.join()


def split(batch, size: int) -> Iterator:
    """`batch` in pieces of at most `size` rows (results row groups stay bounded)."""
    if batch.num_rows <= size:
        yield batch
        return
    for start in range(0, batch.num_rows, size):
        yield batch.slice(start, size)


def write_stream(items: Iterable, write: Callable, *, exact: Optional[int] = None, at_most: Optional[int] = None,
                 written: Optional[Callable[[int], None]] = None, transform: Optional[Callable] = None) -> int:
    """Write `items` (tables or batches) through a background writer thread while the next
    ones are made on this thread; returns the rows written.

    `transform(item) -> batch`, if given, runs on the writer thread just before the write (the
    command line's status_detail and summary, off the main thread, the pipeline's critical
    path; a thread of its own measured no better on 2 cores: 1M claims, 9 runs each, 1.17 vs
    1.18 CPU-s, wall within the noise). `exact`: regroup into batches of exactly that many rows
    (generate's row groups; not with `transform`); `at_most`: only split the larger ones
    (settle's, whose short tail batches keep the writer's last stretch short). `written(rows
    so far)` is called from the writer thread. On any error or interrupt, what is queued is
    dropped before the exception goes on."""
    if transform is not None and exact is not None:
        raise ValueError("write_stream: exact regrouping happens before a transform; give one of them")
    count = 0

    def write_one(x) -> None:
        nonlocal count
        for piece in (split(x, at_most) if at_most is not None else (x,)):
            write(piece)
            count += piece.num_rows
            if written is not None:
                written(count)

    def batches() -> Iterator:
        for x in items:
            if isinstance(x, pa.Table):
                yield from x.to_batches()
            else:
                yield x

    if transform is not None:
        writer = BackgroundWriter(lambda x: write_one(transform(x)))
        pieces: Iterable = items
    else:
        writer = BackgroundWriter(write_one)
        pieces = batches() if exact is None else rebatch(batches(), exact)
    try:
        for piece in pieces:
            writer.submit(piece)
    except BaseException:
        writer.abort()
        raise
    try:
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return count


# =========================================================================== order across batches


def batch_bounds(batch: pa.RecordBatch) -> Optional[tuple[tuple, tuple]]:
    """The smallest and largest (settle_time, claim_id bytes) of a batch; None if it has none.

    Rows with a null in either are error rows, which take no part in the order.
    """
    t = batch.column("settle_time").cast(pa.int64())
    if len(t) == 0:
        return None
    times = np.frombuffer(t.buffers()[1], dtype=np.int64, count=t.offset + len(t))[t.offset:]
    claim_id = batch.column("claim_id")
    offsets, data = string_data(claim_id)
    lo, hi = _kernel.time_bounds(times, *validity_bits(t), offsets, data, *validity_bits(claim_id))
    if lo < 0:
        return None
    return tuple((int(times[i]), bytes(data[offsets[i]:offsets[i + 1]])) for i in (lo, hi))


def with_bounds(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[pa.RecordBatch, Optional[tuple]]]:
    for b in batches:
        yield b, batch_bounds(b)


class OutOfOrder(Exception):
    """A streamed batch starts before the largest (settle_time, claim_id) of those before it."""


def in_order(batches: Iterable[tuple[pa.RecordBatch, Optional[tuple]]]) -> Iterator[pa.RecordBatch]:
    high = None
    for batch, bounds in batches:
        if bounds is not None:
            if high is not None and bounds[0] < high:
                raise OutOfOrder()
            high = bounds[1] if high is None or bounds[1] > high else high
        yield batch


# =========================================================================== progress


class Progress:
    """A small stderr progress bar (only drawn when enabled)."""

    def __init__(self, total: Optional[int], label: str, enabled: bool, stream=None):
        self.total = total
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0
        self.done = 0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        if self.total:
            frac = min(1.0, done / self.total)
            width = 30
            fill = int(frac * width)
            eta = (self.total - done) / rate if rate > 0 else 0.0
            line = (f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
                    f"{done:,}/{self.total:,}  {rate:,.0f}/s  ETA {eta:4.0f}s ")
        else:
            line = f"\r{self.label} {done:,}  {rate:,.0f}/s "
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()


LONG_INPUT = 200_000  # rows from which a terminal gets a progress bar unasked


def progress_enabled(flag: bool, rows: Optional[int] = None) -> bool:
    if flag:
        return True
    if rows is not None and rows < LONG_INPUT:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
