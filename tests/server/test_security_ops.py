"""Overload, health and deadlines through a live server (issue 15, part 4), and the
`serve` options of part 5. Writer as a thread, so the tests can slow or break it."""
from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from srv_helpers import (T, ThreadedServer, claim_row, persons_pb, rpc_error, settle_request, start_subprocess_server,
                         write_policies)

from server._proto import settlement_pb2 as pb
from server.admission import PUSHBACK_KEY
from server.errors import error_from_rpc
from server.facilities import Facility, write_facilities_parquet

pytestmark = pytest.mark.service
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def thread_srv(ps, tmp_path, request):
    kw = getattr(request, "param", {})
    s = ThreadedServer(ps, tmp_path / "store.db", writer="thread", **kw)
    s.registry.UpsertPersons(iter(persons_pb()), timeout=30)
    yield s
    s.stop()


def req(cid, pid="p-plain"):
    return settle_request(claim_row(cid, pid, T(2024, 3, 1, 10)))


def health_of(s) -> int:
    return health_pb2_grpc.HealthStub(s.channel).Check(
        health_pb2.HealthCheckRequest(service="medsettle.v1.Settlement"), timeout=5).status


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_health_not_serving_while_the_store_cannot_commit(thread_srv):
    s = thread_srv
    store = s.srv.store
    real_group, real_probe = store.group, s.srv._probe
    disk_full = OSError(28, "No space left on device")

    @contextlib.contextmanager
    def failing_group():
        with real_group() as g:
            def commit(entries, accumulators):
                raise disk_full
            g.commit = commit
            yield g

    def failing_probe():
        raise disk_full

    assert health_of(s) == SERVING
    store.group, s.srv._probe = failing_group, failing_probe
    code, d = rpc_error(s.stub.Settle, req("H-1"), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE and d.reason == "STORE_FAILURE"
    assert wait_for(lambda: health_of(s) == NOT_SERVING)
    time.sleep(1.5)  # the probe keeps failing: still NOT_SERVING
    assert health_of(s) == NOT_SERVING
    store.group, s.srv._probe = real_group, real_probe  # space freed
    assert wait_for(lambda: health_of(s) == SERVING)
    assert s.stub.Settle(req("H-1"), timeout=10).ledger_seq == 1  # nothing was recorded before
    text = s.srv.metrics.render().decode()
    assert "medsettle_store_failures_total 1.0" in text and "medsettle_serving 1.0" in text


@pytest.mark.parametrize("thread_srv", [{"max_in_flight": 4}], indirect=True)
def test_overload_refused_at_once_with_retry_advice(thread_srv):
    s = thread_srv
    gw = s.srv.writer.writer
    real = gw.process

    def slow(items):
        time.sleep(0.2)
        return real(items)

    gw.process = slow
    futures = [(time.monotonic(), s.stub.Settle.future(req(f"O-{i}", pid=("p-plain", "p-poor", "p-kid")[i % 3]),
                                                        timeout=30)) for i in range(40)]
    refused, ok, refused_ms = 0, 0, []
    for t0, f in futures:
        try:
            f.result()
            ok += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            md = dict(e.trailing_metadata())
            assert int(md[PUSHBACK_KEY]) >= 20 and "retry after" in e.details()
            refused += 1
    assert ok >= 4 and refused >= 20 and ok + refused == 40
    gw.process = real
    assert s.srv.store.max_seq() == ok  # a refused call recorded nothing
    # refused calls are answered without waiting for the writer
    t0 = time.monotonic()
    gw.process = slow
    blockers = [s.stub.Settle.future(req(f"Q-{i}"), timeout=30) for i in range(4)]
    time.sleep(0.05)
    t1 = time.monotonic()
    code, _ = rpc_error(s.stub.Settle, req("Q-x", pid="p-kid"), timeout=10)
    refused_ms = (time.monotonic() - t1) * 1000
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused_ms < 100, refused_ms
    for b in blockers:
        b.result()
    gw.process = real
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("thread_srv", [{"max_in_flight": 10**6, "max_concurrent_rpcs": 4}], indirect=True)
def test_grpc_core_refuses_calls_beyond_its_concurrency_limit(thread_srv):
    """maximum_concurrent_rpcs: with Python's admission out of the way, the calls beyond 4 in
    flight are refused RESOURCE_EXHAUSTED by gRPC itself (never CANCELLED, nothing recorded)
    at once, and the 4 admitted ones are settled."""
    s = thread_srv
    gw = s.srv.writer.writer
    real = gw.process
    gw.process = lambda items: (time.sleep(0.3), real(items))[1]
    blockers = [s.stub.Settle.future(req(f"M-{i}", pid=("p-plain", "p-poor", "p-kid")[i % 3]), timeout=30)
                for i in range(4)]
    time.sleep(0.1)  # the four are in flight (held by the writer)
    refused_ms = []
    for i in range(10):
        t1 = time.monotonic()
        code, _ = rpc_error(s.stub.Settle, req(f"N-{i}", pid="p-kid"), timeout=10)
        refused_ms.append((time.monotonic() - t1) * 1000)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
    assert max(refused_ms) < 100, refused_ms
    assert [b.result().ledger_seq > 0 for b in blockers] == [True] * 4
    gw.process = real
    assert s.srv.store.max_seq() == 4  # the refused calls recorded nothing
    assert s.stub.Settle(req("N-0", pid="p-kid"), timeout=10).ledger_seq == 5  # and the limit frees up


def test_serve_options_of_grpc_limits():
    """`serve --max-in-flight/--max-concurrent-rpcs/--core-pending` reach Server; the defaults are
    limits.py's (grpc.aio's limit below admission's in-flight bound: the cheaper refusal first)."""
    import argparse

    from server.app import add_arguments
    from server.limits import CORE_PENDING, MAX_CONCURRENT_RPCS, MAX_IN_FLIGHT

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--store", "x.db"])
    assert (a.max_in_flight, a.max_concurrent_rpcs, a.core_pending) == (MAX_IN_FLIGHT, MAX_CONCURRENT_RPCS,
                                                                         CORE_PENDING) == (2000, 256, 0)
    a = p.parse_args(["--store", "x.db", "--max-concurrent-rpcs", "8", "--core-pending", "64", "--max-in-flight", "9"])
    assert (a.max_in_flight, a.max_concurrent_rpcs, a.core_pending) == (9, 8, 64)


def test_default_limits_of_a_server(thread_srv):
    """A Server with the defaults: grpc.aio's maximum_concurrent_rpcs set (its refusals cost the
    event loop least) and admission's in-flight bound above it."""
    from server.limits import MAX_CONCURRENT_RPCS, MAX_IN_FLIGHT

    assert thread_srv.srv.max_concurrent_rpcs == MAX_CONCURRENT_RPCS < MAX_IN_FLIGHT
    assert thread_srv.srv.admission.max_in_flight == MAX_IN_FLIGHT


@pytest.mark.parametrize("thread_srv", [{"max_in_flight": 8}], indirect=True)
def test_sustained_overload_is_refused_resource_exhausted_with_advice_never_cancelled(thread_srv):
    """Issue 15 part 4: an open loop of 600 Settle calls at 400/s against a server whose writer
    settles about 150/s (each group held 50 ms): every call that is not settled is answered
    RESOURCE_EXHAUSTED / OVERLOADED with "retry after" and the pushback trailer, promptly;
    none is CANCELLED (gRPC's core queue never fills: admission refuses as fast as calls come);
    a refused call recorded nothing."""
    s = thread_srv
    gw = s.srv.writer.writer
    real = gw.process
    gw.process = lambda items: (time.sleep(0.05), real(items))[1]
    pids = ("p-plain", "p-poor", "p-kid")
    n, rate = 600, 400.0
    calls = []
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        while time.monotonic() < due:
            time.sleep(max(0.0, min(0.002, due - time.monotonic())))
        sent = time.monotonic()
        f = s.stub.Settle.future(req(f"L-{i}", pid=pids[i % 3]), timeout=30)
        answered = []
        f.add_done_callback(lambda _f, a=answered: a.append(time.monotonic()))
        calls.append((sent, f, answered))
    codes, refused_ms = {}, []
    for sent, f, answered in calls:
        try:
            f.result()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                md = dict(e.trailing_metadata())
                d = error_from_rpc(e)
                assert d is not None and d.reason == "OVERLOADED", d
                assert "retry after" in e.details() and int(md[PUSHBACK_KEY]) >= 20, (e.details(), md)
                wait_for(lambda: answered)
                refused_ms.append((answered[0] - sent) * 1000)
        codes[code] = codes.get(code, 0) + 1
    gw.process = real
    ok, refused = codes.pop(grpc.StatusCode.OK, 0), codes.pop(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    assert codes == {}, codes  # no CANCELLED, nothing else
    assert ok >= 50 and refused >= 100 and ok + refused == n, (ok, refused)
    refused_ms.sort()
    assert refused_ms[len(refused_ms) // 2] < 100, refused_ms[len(refused_ms) // 2]
    assert s.srv.store.max_seq() == ok  # the refused calls recorded nothing


@pytest.mark.parametrize("thread_srv", [{"core_pending": 2}], indirect=True)
def test_grpc_core_backlog_refusals_are_cancelled(thread_srv):
    """What gRPC itself does when the event loop cannot take calls as fast as they come (grpcio
    1.85.4): beyond grpc.server.max_pending_requests calls not yet taken by the event loop it
    refuses calls at random, beyond the hard limit all, and the client gets CANCELLED "CANCELLED"
    at once (src/core/server/server.cc:687-691: FailCallCreation, then grpc_call_unref cancels the
    call: src/core/lib/surface/filter_stack_call.cc:275). Not RESOURCE_EXHAUSTED, and no handler of
    ours sees the call. docs/SERVER.md "Overload" relies on this; when a gRPC upgrade changes it,
    this test fails and the docs must change with it."""
    s = thread_srv
    hold = threading.Event()
    s.loop.call_soon_threadsafe(lambda: hold.wait(5))  # the event loop takes no call meanwhile
    futures = [s.stub.Settle.future(req(f"B-{i}", pid=("p-plain", "p-poor", "p-kid")[i % 3]), timeout=30)
               for i in range(30)]
    cancelled = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not cancelled:
        cancelled = [f for f in futures if f.done() and f.exception() is not None
                     and f.exception().code() == grpc.StatusCode.CANCELLED]
        time.sleep(0.01)
    hold.set()
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            if e.code() == grpc.StatusCode.CANCELLED:
                assert e.details() == "CANCELLED" and error_from_rpc(e) is None
    n_cancelled = codes.count(grpc.StatusCode.CANCELLED)
    assert cancelled and n_cancelled >= 20, codes  # beyond 2 x 2 waiting: all refused
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, codes
    assert s.srv.store.max_seq() == codes.count(grpc.StatusCode.OK)


def test_deadline_passed_in_the_writer_is_settled_and_answerable(thread_srv):
    """Semantics: a call admitted before its deadline is settled even when the caller gave up
    meanwhile; GetSettlement answers it and a retry is a replay (never a second payment)."""
    s = thread_srv
    gw = s.srv.writer.writer
    real = gw.process
    gw.process = lambda items: (time.sleep(0.5), real(items))[1]
    code, _ = rpc_error(s.stub.Settle, req("D-1"), timeout=0.2)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    gw.process = real
    assert wait_for(lambda: s.srv.store.max_seq() == 1)
    rec = s.stub.GetSettlement(pb.GetSettlementRequest(claim_id="D-1"), timeout=10)
    assert rec.state == pb.SETTLEMENT_STATE_SETTLED
    again = s.stub.Settle(req("D-1"), timeout=10)
    assert again.replayed and again.ledger_seq == rec.settlement.ledger_seq and s.srv.store.max_seq() == 1


def test_serve_command_facilities_and_metrics(tmp_path):
    from server._proto import settlement_pb2_grpc as pb_grpc

    bad = tmp_path / "bad.parquet"
    write_facilities_parquet([Facility("H1", "x", "000001", "000101", "secondary")], tmp_path / "ok.parquet")
    bad.write_bytes(b"not parquet")
    with pytest.raises(RuntimeError, match="facilities: .*not a readable Parquet"):
        start_subprocess_server(tmp_path / "a.db", extra=["--facilities", str(bad)])
    proc, port = start_subprocess_server(tmp_path / "b.db", policies=write_policies(tmp_path / "policies"),
                                         extra=["--facilities", str(tmp_path / "ok.parquet"), "--metrics-port",
                                                "0", "--log-level", "INFO"])
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        reg = pb_grpc.RegistryStub(ch)
        reg.UpsertPersons(iter(persons_pb()), timeout=30)
        assert reg.GetFacility(pb.GetFacilityRequest(facility_id="H1"), timeout=10).name == "x"
        stub = pb_grpc.SettlementStub(ch)
        code, d = rpc_error(stub.Settle, req("S-1"), timeout=10)  # facility F1 is not registered
        assert d.reason == "FACILITY_NOT_FOUND"
        ok = settle_request(claim_row("S-2", "p-plain", T(2024, 3, 1, 10)), facility_id="H1")
        assert stub.Settle(ok, timeout=10).result.status == "ok"
        ch.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "no TLS: every caller is trusted" in err
    assert '"method":"Settle"' in err and '"claim_id":"S-2"' in err and '"facility_id":"H1"' in err
    assert '"person_id"' not in err and '"total_amount"' not in err  # not unless asked
    assert "metrics on http://127.0.0.1:" in err


def test_tls_without_client_ca_needs_consent(tmp_path):
    from certs import PKI

    pki = PKI(tmp_path / "pki")
    args = ["--tls-cert", str(tmp_path / "pki" / "server.pem"), "--tls-key", str(tmp_path / "pki" / "server.key")]
    with pytest.raises(RuntimeError, match="without --tls-client-ca lets every caller"):
        start_subprocess_server(tmp_path / "a.db", extra=args)
    proc, port = start_subprocess_server(tmp_path / "b.db", extra=[*args, "--insecure-listen-all"])
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "TLS without client certificates: every caller is trusted" in err
    del pki
