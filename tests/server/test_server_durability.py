"""Crash and shutdown: SIGKILL in the middle of a load, SIGTERM drain (server as a subprocess)."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time

import grpc
import pyarrow.parquet as pq
import pytest

from srv_helpers import (PERSONS, T, claim_row, engine_results, norm, pb, settle_request, start_subprocess_server,
                         write_policies, policy_set)
from server._proto import settlement_pb2_grpc as pb_grpc
from server.client import result_dict
from server.registry import Person, date_to_days, persons_table
from server.store import SQLiteStore

pytestmark = pytest.mark.service

LOAD_PERSONS = [(f"L{i:03d}", "000001", "resident", T(1940 + i, 1 + i % 12, 1).date(),
                 [("low_income", None, None)] if i % 7 == 0 else []) for i in range(60)]
ALL_PERSONS = PERSONS + LOAD_PERSONS


def write_registry(path):
    persons = [Person(pid, region, scheme, date_to_days(birth),
                      tuple((n, None if lo is None else date_to_days(lo), None if hi is None else date_to_days(hi))
                            for n, lo, hi in spells))
               for pid, region, scheme, birth, spells in ALL_PERSONS]
    pq.write_table(persons_table(persons), path)
    return path


def load_claims(n: int, seed: int) -> list:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pid = f"L{rng.randrange(60):03d}"
        vt = rng.choice(["inpatient", "chronic", "outpatient"])
        rows.append(claim_row(f"k{seed}-{i:05d}", pid, T(2024, 1 + i * 11 // n, 1 + i % 28, 10), vt,
                              "primary" if vt == "outpatient" else "secondary",
                              in_scope=rng.choice([500_00, 3_000_00, 12_000_00, 45_000_00])))
    return rows


def run_load(port: int, rows: list, acked: dict, stop: threading.Event, workers: int = 12):
    """Workers send the rows (each row once), recording acknowledged responses; they stop at
    the first transport error or when told."""
    it = iter(rows)
    lock = threading.Lock()

    def work():
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SettlementStub(ch)
        while not stop.is_set():
            with lock:
                row = next(it, None)
            if row is None:
                break
            try:
                resp = stub.Settle(settle_request(row), timeout=10)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED):
                    break
                raise
            with lock:
                acked[row["claim_id"]] = resp
        ch.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    return threads


def ledger_rows(store_path):
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    rows = conn.execute("SELECT seq, kind, claim_id, claim, response FROM ledger ORDER BY seq").fetchall()
    conn.close()
    return rows


def check_store(store_path, ps, rows_by_id):
    """Every ledger settlement once; accumulators = fold of the ledger = the engine over the ledger order."""
    store = SQLiteStore(str(store_path))
    try:
        fold = store.fold_ledger()
        assert store.stored_accumulators() == fold
    finally:
        store.close()
    led = ledger_rows(store_path)
    ids = [r[2] for r in led if r[1] == "settle"]
    assert len(ids) == len(set(ids))
    assert [r[0] for r in led] == list(range(1, len(led) + 1))
    ordered = [rows_by_id[cid] for cid in ids]
    want, want_acc = engine_results(ps, ordered, persons=ALL_PERSONS, chunks=True)
    got = [result_dict(pb.SettleResponse.FromString(r[4]).result) for r in led if r[1] == "settle"]
    assert norm(got) == norm(want)
    assert fold == want_acc
    return {r[2]: pb.SettleResponse.FromString(r[4]) for r in led if r[1] == "settle"}


def _wait_for_acks(acked: dict, n: int, timeout: float = 30) -> None:
    """Until the load has `n` acknowledged settlements (or the timeout passes)."""
    deadline = time.time() + timeout
    while len(acked) < n and time.time() < deadline:
        time.sleep(0.01)


def _stop_load(stop: threading.Event, threads) -> None:
    stop.set()
    for t in threads:
        t.join(30)


def test_sigkill_mid_load_then_restart(tmp_path):
    ps = policy_set()
    policies = write_policies(tmp_path / "policies")
    registry = write_registry(tmp_path / "persons.parquet")
    store = tmp_path / "store.db"
    rows = load_claims(3000, seed=1)
    by_id = {r["claim_id"]: r for r in rows}
    proc, port = start_subprocess_server(store, policies=policies, registry=registry)
    acked: dict = {}
    stop = threading.Event()
    try:
        threads = run_load(port, rows, acked, stop)
        _wait_for_acks(acked, 300)
        assert len(acked) >= 300, "the load did not get going"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _stop_load(stop, threads)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_acked = len(acked)
    assert n_acked < len(rows), "the server was killed after the load ended"

    # restart on the same store: every acknowledged settlement is there, exactly once, as acknowledged
    stored = check_store(store, ps, by_id)
    assert set(acked) <= set(stored)
    for cid, resp in acked.items():
        assert stored[cid] == resp
    proc, port = start_subprocess_server(store, policies=policies, registry=registry)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SettlementStub(ch)
        for cid in list(acked)[:50]:
            rec = stub.GetSettlement(pb.GetSettlementRequest(claim_id=cid))
            assert rec.settlement == acked[cid] and rec.state == pb.SETTLEMENT_STATE_SETTLED
        # clients retry what they sent: acknowledged ones replay, the rest settle (or replay if committed unacked)
        sent = rows[: n_acked + 200]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as ex:
            resps = list(ex.map(lambda row: stub.Settle(settle_request(row), timeout=30), sent))
        for row, resp in zip(sent, resps):
            if row["claim_id"] in acked:
                assert resp.replayed
                resp.replayed = False
                assert resp == acked[row["claim_id"]]
            elif row["claim_id"] in stored:
                assert resp.replayed
        ch.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in out
    final = check_store(store, ps, by_id)
    assert set(final) == {r["claim_id"] for r in sent} | set(stored)


def test_sigterm_drains_in_flight_calls(tmp_path):
    policies = write_policies(tmp_path / "policies")
    registry = write_registry(tmp_path / "persons.parquet")
    store = tmp_path / "store.db"
    rows = load_claims(4000, seed=2)
    proc, port = start_subprocess_server(store, policies=policies, registry=registry,
                                         extra=["--drain-seconds", "5"])
    acked: dict = {}
    stop = threading.Event()
    try:
        threads = run_load(port, rows, acked, stop, workers=16)
        _wait_for_acks(acked, 200)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.time() - t0
        _stop_load(stop, threads)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert took < 10
    assert "listening on 127.0.0.1:" in out and "stopped" in out
    # every acknowledged settlement is in the store; nothing half-done
    ps = policy_set()
    stored = check_store(store, ps, {r["claim_id"]: r for r in rows})
    assert set(acked) <= set(stored)
    for cid, resp in acked.items():
        assert stored[cid] == resp


def _children(pid: int) -> list:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _writer_pid(pid: int) -> int:
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            cmd = f.read()
        if b"resource_tracker" not in cmd:
            return child
    raise AssertionError("no writer process")


def test_writer_process_death_stops_the_server(tmp_path):
    """If the writer dies, waiting calls get UNAVAILABLE, the server exits 1, and a restart finds
    a consistent store with every acknowledged settlement."""
    policies = write_policies(tmp_path / "policies")
    registry = write_registry(tmp_path / "persons.parquet")
    store = tmp_path / "store.db"
    rows = load_claims(3000, seed=3)
    proc, port = start_subprocess_server(store, policies=policies, registry=registry)
    acked: dict = {}
    stop = threading.Event()
    try:
        threads = run_load(port, rows, acked, stop, workers=8)
        _wait_for_acks(acked, 200)
        os.kill(_writer_pid(proc.pid), signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        _stop_load(stop, threads)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "writer process died" in err
    stored = check_store(store, policy_set(), {r["claim_id"]: r for r in rows})
    assert set(acked) <= set(stored)
