"""Admission control and health: refuse what cannot be served in time, fast,
with a code clients retry; say NOT_SERVING while the store cannot commit.

Why: past saturation gRPC's core refuses the calls the event loop has not
taken yet as CANCELLED (issue 15: 57 % CANCELLED at twice saturation, accepted
ones waited 1.0-1.6 s; docs/SERVER.md "Overload" shows where in gRPC).
CANCELLED is not retried by standard retry policies, and a counter is better
served by an immediate "retry in 50 ms" than an answer after seconds. So every
state-changing call passes `Admission.enter` first, in the handler, before its
request is read (server/gate.py):

* more than `max_in_flight` calls admitted and not yet answered, or
* the recent latency of answered calls (an exponentially weighted mean over
  about the last 50 calls) above `latency_budget_s` while more than
  `min_in_flight` calls are in flight,

and the call is answered RESOURCE_EXHAUSTED / OVERLOADED at once, with retry
advice in the message and the `grpc-retry-pushback-ms` trailer (which gRPC's
own retry policy honours). Nothing of a refused call was read or stored.

Health (`HealthWatch`): a store failure (a commit that failed) turns health
NOT_SERVING at once; a probe then writes and fsyncs a small file next to the
store every `interval` seconds, and health is SERVING again once it succeeds
(and the next commit's outcome keeps it so).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Optional

import grpc

from ._proto import settlement_pb2 as pb
from .errors import DETAILS_KEY, CallError
from .limits import MAX_IN_FLIGHT

E = pb.ErrorCode
log = logging.getLogger("medsettle.server.admission")

PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: Weight of the newest latency in the mean (about the last 50 calls count).
EWMA_ALPHA = 0.02
#: Distinct refusal answers kept made (the texts vary with the latency and the advice).
ANSWERS_KEPT = 256


class Admission:
    """Counts calls in flight and their recent latency; refuses beyond the bounds."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT, latency_budget_s: float = 0.25, *, min_in_flight: int = 16,
                 clock: Callable[[], float] = time.monotonic):
        self.max_in_flight = max_in_flight
        self.latency_budget_s = latency_budget_s
        self.min_in_flight = min_in_flight
        self.clock = clock
        self.in_flight = 0
        self.latency = 0.0  # EWMA of answered calls' latency, seconds
        self.refused = 0
        self._answers: dict = {}  # (why, retry ms) -> CallError with its answer

    def enter(self) -> Optional[CallError]:
        """None when the call is admitted (then call `leave` when answered), else the error."""
        n = self.in_flight
        if n >= self.max_in_flight:
            return self._refuse(f"{n} calls are in flight (limit {self.max_in_flight})")
        if self.latency > self.latency_budget_s and n > self.min_in_flight:
            return self._refuse(f"calls are taking {self.latency * 1000:.0f} ms (budget "
                                f"{self.latency_budget_s * 1000:.0f} ms)")
        self.in_flight = n + 1
        return None

    def leave(self, seconds: float) -> None:
        self.in_flight -= 1
        self.latency += EWMA_ALPHA * (seconds - self.latency)

    def retry_after_ms(self) -> int:
        """Advice: about the time the calls in flight need to drain, 20 ms to 2 s."""
        return int(min(2000, max(20, self.latency * 1000 * 2)))

    def _refuse(self, why: str) -> CallError:
        """The refusal, with its answer (status message, trailers) made once per distinct text:
        under overload the event loop refuses thousands of calls a second, and each one it
        answers more slowly is one more left in gRPC's queue (docs/SERVER.md "Overload")."""
        self.refused += 1
        ms = self.retry_after_ms()
        key = (why, ms)
        err = self._answers.get(key)
        if err is None:
            err = CallError(E.OVERLOADED, f"the server is at capacity ({why}); nothing was recorded: retry after "
                            f"{ms} ms with backoff")
            err.retry_ms = ms
            err.answer = (err.status_message(), ((DETAILS_KEY, err.trailer()), (PUSHBACK_KEY, str(ms))))
            if len(self._answers) >= ANSWERS_KEPT:
                self._answers.clear()
            self._answers[key] = err
        return err

    def idle(self) -> bool:
        """Decay the latency when nothing is in flight (a burst's latency must not keep refusing
        the calls that come after it); call now and then."""
        if self.in_flight == 0:
            self.latency *= 0.5
        return self.in_flight == 0


async def abort_overloaded(context, err: CallError) -> None:
    """Ends a call refused by admission: RESOURCE_EXHAUSTED, detail and retry pushback."""
    answer = getattr(err, "answer", None)
    if answer is None:
        answer = (err.status_message(), ((DETAILS_KEY, err.trailer()),
                                         (PUSHBACK_KEY, str(getattr(err, "retry_ms", 100)))))
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, answer[0], trailing_metadata=answer[1])


def probe_directory(path: str) -> None:
    """Writes and fsyncs 4 KiB next to the store, then removes it; raises OSError when the
    disk cannot take it (full, read-only, gone)."""
    probe = os.path.join(os.path.dirname(os.path.abspath(path)) or ".", f".{os.path.basename(path)}.probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


class HealthWatch:
    """NOT_SERVING while the store cannot commit. `set_status(bool)` is a coroutine function
    that publishes the status (the health servicer's services)."""

    def __init__(self, set_status, probe: Callable[[], None], *, interval: float = 1.0):
        self.set_status = set_status
        self.probe = probe
        self.interval = interval
        self.serving = True
        self.failures = 0
        self._task: Optional[asyncio.Task] = None
        self.draining = False

    async def store_failed(self, why: str = "") -> None:
        """A commit failed: NOT_SERVING until a probe succeeds."""
        self.failures += 1
        if self.serving:
            log.error("store cannot commit (%s): health NOT_SERVING until it can", why or "commit failed")
            self.serving = False
            await self.set_status(False)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.serving and not self.draining:
            await asyncio.sleep(self.interval)
            try:
                await loop.run_in_executor(None, self.probe)
            except OSError as e:
                log.warning("store probe failed: %s", e)
                continue
            if self.draining:
                return
            self.serving = True
            log.info("store probe succeeded: health SERVING")
            await self.set_status(True)

    async def close(self) -> None:
        self.draining = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
