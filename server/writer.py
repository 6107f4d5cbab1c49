"""The writer, whatever carries it: one paced group loop, two transports.

Every call that changes state reaches the writer as (kind, request bytes as
received). The writer reads them (`decode`), groups what is waiting and hands
each group to the `GroupWriter` (server/batcher.py), which settles and commits
it. The paced loop (`run_group_loop`) is the same for both transports; only
the `Inbox` it reads from and the way answers go back differ:

* `ThreadWriter`: the writer is a thread of the front-end process (a queue;
  answers set the callers' asyncio futures);
* `server.writer_proc.WriterProcess`: the writer is a process of its own (a
  socket pair; answers are frames), the default: the engine and gRPC then
  each have a GIL and a core.

Both implement the front-end's `Writer` interface: `await start()`,
`submit(kind, payload) -> future | CallError`, `await close()`, `stats`,
`on_death`.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from typing import Callable, Optional, Protocol

import grpc

from ._proto import settlement_pb2 as pb
from .batcher import FACILITIES, PRESETTLE, REVERSE, SETTLE, UPSERT, GroupWriter, Pending
from .core import Core
from .errors import CallError
from .runtime import profiled
from .store import PersonRow, Store

E = pb.ErrorCode
KINDS = (SETTLE, REVERSE, UPSERT, PRESETTLE, FACILITIES)


def decode(kind: int, payload: bytes, ref) -> Pending:
    """The writer's reading of a request: SETTLE / PRESETTLE a SettleRequest, REVERSE a
    ReverseRequest, UPSERT a JSON list of registry rows. A request that cannot be read
    becomes a Pending whose payload is its INVALID_ARGUMENT error (answered as such)."""
    try:
        if kind == UPSERT:
            return Pending(UPSERT, [PersonRow(*r) for r in json.loads(payload)], ref)
        if kind == FACILITIES:  # JSON records, read by GroupWriter._upsert_facilities
            return Pending(FACILITIES, payload, ref)
        if kind == REVERSE:
            return Pending(REVERSE, pb.ReverseRequest.FromString(payload), ref)
        if kind in (SETTLE, PRESETTLE):
            return Pending(kind, pb.SettleRequest.FromString(payload).claim, ref)
        raise ValueError(f"unknown request kind {kind}")
    except Exception as e:  # noqa: BLE001 (malformed request bytes)
        return Pending(kind, CallError(E.INVALID_VALUE, f"the request cannot be parsed: {e}",
                                       grpc_code=grpc.StatusCode.INVALID_ARGUMENT), ref)


def encode_upsert(rows) -> bytes:
    return json.dumps([list(r) for r in rows]).encode()


class Inbox(Protocol):
    """Where the loop takes its calls from."""

    closed: bool  # no call will come after those already waiting

    def get(self, timeout: Optional[float], limit: int) -> list:
        """Up to `limit` waiting calls. timeout None: wait until one is there (or closed);
        0: what is there now; > 0: wait up to that long for `limit` calls."""


def run_group_loop(gw: GroupWriter, inbox: Inbox, deliver: Callable[[list], None], *, max_batch: int,
                   min_interval: float) -> None:
    """The paced group loop: take what is waiting, at most one group per `min_interval`
    (unless `max_batch` calls are waiting), settle and commit it, deliver the answers.
    Returns once the inbox is closed and everything taken is answered."""
    last_start = 0.0
    while True:
        items: list = []
        if not gw.has_deferred:
            items = inbox.get(None, max_batch)
            if not items and inbox.closed:
                return
        if min_interval and not inbox.closed:
            deadline = last_start + min_interval
            while len(items) < max_batch and not inbox.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                items += inbox.get(left, max_batch - len(items))
        if len(items) < max_batch:
            items += inbox.get(0, max_batch - len(items))
        last_start = time.monotonic()
        answers = gw.process(items)
        if answers:
            deliver(answers)


class Writer(Protocol):
    """The front-end's handle on the writer."""

    stats: dict
    on_death: Optional[Callable[[], None]]

    async def start(self) -> None: ...
    def submit(self, kind: int, payload: bytes):
        """A future of the answer (bytes, an int, or a CallError), or a CallError at once."""
    async def close(self, timeout: float = 60.0) -> None: ...


# --------------------------------------------------------------------------- in-process transport


class QueueInbox:
    """Calls queued by the event loop thread for the writer thread."""

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque = deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, item: Pending) -> None:
        with self._cv:
            self._queue.append(item)
            if len(self._queue) == 1:
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify()

    def get(self, timeout: Optional[float], limit: int) -> list:
        q = self._queue
        with self._cv:
            if timeout is None:
                while not q and not self.closed:
                    self._cv.wait()
            elif timeout > 0 and len(q) < limit and not self.closed:
                self._cv.wait(timeout)
            n = min(len(q), limit)
            return [q.popleft() for _ in range(n)]


class ThreadWriter:
    """The writer as a thread of this process."""

    def __init__(self, store: Store, core: Core, *, max_batch: int = 1024, max_pending: int = 20_000,
                 min_interval: float = 0.0, person_cache: int = 200_000, on_death=None):
        self.writer = GroupWriter(store, core, person_cache=person_cache)
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.min_interval = min_interval
        self.on_death = on_death
        self._inbox = QueueInbox()
        self._accepting = False
        self._thread: Optional[threading.Thread] = None

    @property
    def stats(self) -> dict:
        return self.writer.stats

    async def start(self) -> None:
        self.writer.store.start_background()
        self._thread = threading.Thread(target=self._run, name="medsettle-writer", daemon=True)
        self._thread.start()
        self._accepting = True

    def submit(self, kind: int, payload: bytes):
        if not self._accepting:
            return CallError(E.SHUTTING_DOWN, "the server is shutting down; retry on another instance or later")
        if len(self._inbox) >= self.max_pending:
            return CallError(E.OVERLOADED, f"{len(self._inbox)} settlements are waiting; retry with backoff")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.put(decode(kind, payload, (loop, fut)))
        return fut

    async def close(self, timeout: float = 60.0) -> None:
        """Settles what is queued, then stops the thread."""
        self._accepting = False
        self._inbox.close()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    def _run(self) -> None:
        with profiled("writer"):
            run_group_loop(self.writer, self._inbox, _deliver, max_batch=self.max_batch,
                           min_interval=self.min_interval)


def _deliver(answers: list) -> None:
    by_loop: dict = {}
    for it, value in answers:
        loop, fut = it.ref
        by_loop.setdefault(loop, []).append((fut, value))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pairs)
        except RuntimeError:  # loop closed
            pass


def _resolve(pairs: list) -> None:
    for fut, value in pairs:
        if not fut.done():
            fut.set_result(value)
