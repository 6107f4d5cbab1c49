"""Admission control and health (server/admission.py), without sockets."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from server._proto import settlement_pb2 as pb
from server.admission import PUSHBACK_KEY, Admission, HealthWatch, abort_overloaded, probe_directory
from server.errors import DETAILS_KEY, error_from_rpc

E = pb.ErrorCode


def test_refuses_beyond_in_flight_bound():
    a = Admission(max_in_flight=3, latency_budget_s=1.0)
    assert [a.enter() for _ in range(3)] == [None] * 3
    err = a.enter()
    assert err.code == E.OVERLOADED and err.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in err.message and 20 <= err.retry_ms <= 2000
    assert a.in_flight == 3 and a.refused == 1  # a refused call is not counted in flight
    a.leave(0.01)
    assert a.enter() is None


def test_refuses_beyond_latency_budget_only_under_load():
    a = Admission(max_in_flight=1000, latency_budget_s=0.1, min_in_flight=4)
    for _ in range(500):  # answers take 0.5 s: the mean passes the budget
        assert a.enter() is None
        a.leave(0.5)
    assert a.latency > 0.1
    assert all(a.enter() is None for _ in range(5))  # few in flight: still admitted (a lone slow call)
    err = a.enter()
    assert err is not None and "budget 100 ms" in err.message and err.retry_ms == a.retry_after_ms() > 900
    for _ in range(5):
        a.leave(0.001)
    while a.latency > 0.1:  # idle: the burst's latency decays
        assert a.idle()
    assert a.enter() is None


class Ctx:
    def __init__(self):
        self.aborted = None

    async def abort(self, code, message, trailing_metadata=()):
        self.aborted = (code, message, dict(trailing_metadata))
        raise RuntimeError("aborted")


def test_abort_overloaded_carries_detail_and_pushback():
    a = Admission(max_in_flight=0)
    err = a.enter()
    ctx = Ctx()
    with pytest.raises(RuntimeError):
        asyncio.run(abort_overloaded(ctx, err))
    code, message, md = ctx.aborted
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith("OVERLOADED: ")
    assert int(md[PUSHBACK_KEY]) == err.retry_ms

    class Exc(grpc.RpcError):
        def trailing_metadata(self):
            return [(DETAILS_KEY, md[DETAILS_KEY])]

    assert error_from_rpc(Exc()).reason == "OVERLOADED"


def test_probe_directory(tmp_path):
    probe_directory(str(tmp_path / "store.db"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        probe_directory(str(tmp_path / "gone" / "store.db"))


def test_health_not_serving_until_the_probe_succeeds():
    states = []
    ok = [False]

    async def set_status(serving):
        states.append(serving)

    def probe():
        if not ok[0]:
            raise OSError(28, "No space left on device")

    async def run():
        w = HealthWatch(set_status, probe, interval=0.01)
        await w.store_failed("disk full")
        await w.store_failed("disk full")  # once NOT_SERVING, not again
        await asyncio.sleep(0.05)
        assert states == [False] and not w.serving
        ok[0] = True
        for _ in range(100):
            await asyncio.sleep(0.01)
            if w.serving:
                break
        assert states == [False, True] and w.failures == 2
        await w.close()

    asyncio.run(run())
