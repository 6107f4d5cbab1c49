"""Operations: Prometheus metrics on an HTTP port and one JSON log line per call.

Why: an operator must see, without reading the ledger, whether the counters
are being answered, how fast, and why not (docs/SERVER.md, "Operations", says
what to alert on). Each server has its own `CollectorRegistry`, so several
servers in one process (the tests) do not mix their figures.

Metrics (all prefixed `medsettle_`):

| name | type | labels |
|---|---|---|
| `calls_total` | counter | method, code (gRPC status name) |
| `errors_total` | counter | method, error (medsettle.v1.ErrorCode name) |
| `settlements_total` | counter | outcome: settled, replayed, presettled, reversed |
| `call_latency_seconds` | histogram | method |
| `group_size` | histogram | (claims per writer group) |
| `commit_latency_seconds` | histogram | (one group's transaction, with its fsync) |
| `queue_depth` | gauge | (calls waiting for the writer) |
| `in_flight` | gauge | (calls admitted and not answered) |
| `store_failures_total` | counter | (commits that failed) |
| `admission_refused_total` | counter | (calls refused as OVERLOADED) |
| `serving` | gauge | 1 while health is SERVING |

The call log (logger `medsettle.calls`, INFO) is one JSON object per line:
`ts` (UTC, ISO 8601), `method`, `claim_id`, `facility_id`, `caller`
(the certificate's role and facility), `status` (gRPC status name), `error`
(ErrorCode name or ""), `latency_ms`. No person, diagnosis or amounts unless
`detail=True` (`--log-call-detail`), which adds `person_id`, `disease_code`
and `total_amount` for a claim.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import time
from typing import Optional

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

call_log = logging.getLogger("medsettle.calls")

#: What the handler knows of its call (claim, facility, error), read by `Metrics.instrument`.
CALL: contextvars.ContextVar = contextvars.ContextVar("medsettle_call")


def note(**fields) -> None:
    """Adds fields to the current call's log line (a no-op outside an instrumented call)."""
    d = CALL.get(None)
    if d is not None:
        d.update(fields)


class Metrics:
    """One server's metrics and call log."""

    def __init__(self, *, detail: bool = False, registry: Optional[CollectorRegistry] = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.detail = detail
        self.calls = Counter("medsettle_calls", "Calls answered, by method and gRPC status", ["method", "code"],
                             registry=r)
        self.errors = Counter("medsettle_errors", "Failed calls by method and medsettle error code",
                              ["method", "error"], registry=r)
        self.settlements = Counter("medsettle_settlements", "Claims settled, replayed, pre-settled, reversed",
                                   ["outcome"], registry=r)
        self.latency = Histogram("medsettle_call_latency_seconds", "Call latency in the server, by method",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.group_size = Histogram("medsettle_group_size", "Calls per writer group", buckets=GROUP_BUCKETS,
                                    registry=r)
        self.commit_latency = Histogram("medsettle_commit_latency_seconds", "One group's transaction (with fsync)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("medsettle_queue_depth", "Calls waiting for the writer", registry=r)
        self.in_flight = Gauge("medsettle_in_flight", "Calls admitted and not yet answered", registry=r)
        self.store_failures = Counter("medsettle_store_failures", "Commits that failed", registry=r)
        self.refused = Counter("medsettle_admission_refused", "Calls refused as OVERLOADED", registry=r)
        self.serving = Gauge("medsettle_serving", "1 while health is SERVING", registry=r)
        self.serving.set(1)
        self.http = None
        self.port = 0
        self._children: dict = {}  # (method, code) -> (calls child, latency child)

    def start_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serves /metrics on `port` (0: any free one); returns the bound port."""
        self.http, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self.http.server_port
        return self.port

    def stop_http(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -------------------------------------------------------------- per call

    def begin(self) -> tuple:
        """Starts a call's record: returns (token, fields, start)."""
        fields: dict = {}
        self.in_flight.inc()
        return CALL.set(fields), fields, time.perf_counter()

    def end(self, method: str, begun: tuple, code: grpc.StatusCode) -> float:
        token, fields, t0 = begun
        seconds = time.perf_counter() - t0
        CALL.reset(token)
        self.in_flight.dec()
        name = code.name
        children = self._children.get((method, name))
        if children is None:  # labels() costs a lock and a lookup: bind each pair once
            children = self._children[(method, name)] = (self.calls.labels(method, name),
                                                         self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)
        error = fields.get("error", "")
        if error:
            self.errors.labels(method, error).inc()
            if error == "STORE_FAILURE":
                self.store_failures.inc()
            elif error == "OVERLOADED":
                self.refused.inc()
        outcome = fields.pop("outcome", None)
        if outcome and code is grpc.StatusCode.OK:
            self.settlements.labels(outcome).inc()
        if call_log.isEnabledFor(logging.INFO):
            line = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "method": method,
                    "claim_id": fields.get("claim_id", ""), "facility_id": fields.get("facility_id", ""),
                    "caller": fields.get("caller", ""), "status": name, "error": error,
                    "latency_ms": round(seconds * 1000, 3)}
            if self.detail:
                for k in ("person_id", "disease_code", "total_amount"):
                    if k in fields:
                        line[k] = fields[k]
            call_log.info(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
        return seconds

    def observe_group(self, size: int, commit_seconds: float) -> None:
        self.group_size.observe(size)
        self.commit_latency.observe(commit_seconds)


def status_of(context, raised: Optional[BaseException]) -> grpc.StatusCode:
    """The gRPC status a handler ended with (aio: context.code() after an abort)."""
    if raised is None:
        return grpc.StatusCode.OK
    code = None
    try:
        code = context.code()
    except Exception:  # an older grpc without ServicerContext.code()
        pass
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    if isinstance(raised, Exception) and raised.__class__.__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
