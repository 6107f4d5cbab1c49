"""Several server instances on one PostgreSQL database (real processes, real sockets):
two instances settling and reversing for the same 20 persons at once, an instance
SIGKILLed while the other goes on, PostgreSQL stopped in the middle of a load."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from srv_helpers import REPO, T, claim_row, engine_results, norm, pb, policy_set, settle_request, write_policies
from test_server_durability import ALL_PERSONS, write_registry
from server._proto import settlement_pb2_grpc as pb_grpc
from server.client import result_dict
from server.errors import error_from_rpc
from server.store import open_store

pytestmark = [pytest.mark.service, pytest.mark.postgres]

PERSONS20 = [f"L{i:03d}" for i in range(20)]


def start_instance(url: str, folder, name: str, policies, registry=None) -> tuple[subprocess.Popen, int]:
    port_file = folder / f"{name}.port"
    cmd = [sys.executable, "-m", "server", "--store", url, "--port", "0", "--port-file", str(port_file),
           "--log-level", "WARNING", "--policies", str(policies)]
    if registry is not None:
        cmd += ["--registry", str(registry)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # the logs go to a file: a pipe nobody reads would fill and stall the instance
    log = open(folder / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    proc.log_path = folder / f"{name}.log"
    deadline = time.time() + 60
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"instance {name} exited {proc.returncode}: {proc.log_path.read_text()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"instance {name} did not start")
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def stop_instance(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def claims(n: int, seed: int, persons=PERSONS20) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        vt = rng.choice(["inpatient", "chronic", "outpatient"])
        out.append(claim_row(f"m{seed}-{i:05d}", rng.choice(persons), T(2024, 1 + i * 11 // n, 1 + i % 28, 10), vt,
                             "primary" if vt == "outpatient" else "secondary",
                             in_scope=rng.choice([500_00, 3_000_00, 12_000_00, 45_000_00])))
    return out


def check_ledger(url: str, ps, by_id: dict, no_reversal_persons) -> dict:
    """Accumulators = fold of the ledger; every claim settled at most once; for persons
    without reversals, the results in ledger order are the engine's, claim after claim."""
    store = open_store(url)
    try:
        assert store.fold_ledger() == store.stored_accumulators()
        entries = [e for part in store.iter_ledger() for e in part]
    finally:
        store.close()
    settled = [e for e in entries if e.kind == "settle"]
    assert len({e.claim_id for e in settled}) == len(settled)
    reversed_ = {e.claim_id for e in entries if e.kind == "reverse"}
    for pid in no_reversal_persons:
        mine = [e for e in settled if e.person_id == pid]
        assert not reversed_ & {e.claim_id for e in mine}
        if not mine:
            continue
        want, _ = engine_results(ps, [by_id[e.claim_id] for e in mine], persons=ALL_PERSONS, chunks=True)
        got = [result_dict(pb.SettleResponse.FromString(e.response).result) for e in mine]
        assert norm(got) == norm(want), pid
    return {e.claim_id: pb.SettleResponse.FromString(e.response) for e in settled}, reversed_


@pytest.fixture
def setup(tmp_path, pg_url):
    policies = write_policies(tmp_path / "policies")
    registry = write_registry(tmp_path / "persons.parquet")
    return pg_url, policies, registry


def test_two_instances_settle_and_reverse_the_same_persons(setup, tmp_path):
    url, policies, registry = setup
    ps = policy_set()
    a, port_a = start_instance(url, tmp_path, "a", policies, registry)
    b, port_b = start_instance(url, tmp_path, "b", policies, registry)  # same file: skipped
    rows = claims(800, seed=3)
    by_id = {r["claim_id"]: r for r in rows}
    reversible = set(PERSONS20[10:])  # the first 10 persons are never reversed: checked against the engine
    acked, reversed_ok, replays = {}, set(), []
    lock = threading.Lock()
    it = iter(rows)
    try:
        stubs = [pb_grpc.SettlementStub(grpc.insecure_channel(f"127.0.0.1:{p}")) for p in (port_a, port_b)]

        def work(w):
            rng = random.Random(w)
            while True:
                with lock:
                    row = next(it, None)
                if row is None:
                    return
                k = rng.randrange(2)
                resp = stubs[k].Settle(settle_request(row), timeout=30)
                acked[row["claim_id"]] = resp
                if rng.random() < 0.15:  # the client retries on the other instance: the stored answer
                    again = stubs[1 - k].Settle(settle_request(row), timeout=30)
                    replays.append((resp, again))
                if row["person_id"] in reversible and rng.random() < 0.25:
                    rv = stubs[1 - k].Reverse(pb.ReverseRequest(claim_id=row["claim_id"], facility_id="F1",
                                                                reason="test"), timeout=30)
                    assert not rv.already_reversed
                    reversed_ok.add(row["claim_id"])

        # the same claims sent to both instances at the same moment: settled once
        twins = claims(30, seed=4, persons=PERSONS20[:10])
        with ThreadPoolExecutor(2) as ex:
            pairs = [ex.map(lambda k, r=r: stubs[k].Settle(settle_request(r), timeout=30), (0, 1)) for r in twins]
            pairs = [list(p) for p in pairs]
        for x, y in pairs:
            assert x.ledger_seq == y.ledger_seq and x.result == y.result and (x.replayed != y.replayed)
        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        stop_instance(a)
        stop_instance(b)
    assert a.returncode == 0 and b.returncode == 0
    assert len(acked) == len(rows) and replays and reversed_ok
    for first, again in replays:
        assert again.replayed and again.ledger_seq == first.ledger_seq and again.result == first.result
    by_id.update({r["claim_id"]: r for r in twins})
    stored, reversed_ = check_ledger(url, ps, by_id, PERSONS20[:10])
    assert reversed_ == reversed_ok
    assert set(acked) | {r["claim_id"] for r in twins} == set(stored)
    for cid, resp in acked.items():
        assert stored[cid] == resp


def test_sigkilled_instance_while_the_other_goes_on(setup, tmp_path):
    url, policies, registry = setup
    ps = policy_set()
    a, port_a = start_instance(url, tmp_path, "a", policies, registry)
    b, port_b = start_instance(url, tmp_path, "b", policies, registry)
    rows = claims(1200, seed=5)
    by_id = {r["claim_id"]: r for r in rows}
    acked, failed_on_a = {}, []
    lock = threading.Lock()
    it = iter(rows)
    a_dead = threading.Event()
    try:
        stubs = [pb_grpc.SettlementStub(grpc.insecure_channel(f"127.0.0.1:{p}")) for p in (port_a, port_b)]

        def work(w):
            while True:
                with lock:
                    row = next(it, None)
                if row is None:
                    return
                k = 1 if a_dead.is_set() else w % 2
                try:
                    acked[row["claim_id"]] = stubs[k].Settle(settle_request(row), timeout=30)
                except grpc.RpcError as e:
                    assert k == 0 and e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
                    failed_on_a.append(row)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(acked) < 300 and time.time() < deadline:
            time.sleep(0.01)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        a_dead.set()
        for t in threads:
            t.join(120)
        assert len(acked) + len(failed_on_a) == len(rows) and len(acked) < len(rows) - 0
        # the clients retry what failed on the other instance: settled, or replayed if A committed it
        for row in failed_on_a:
            r = stubs[1].Settle(settle_request(row), timeout=30)
            acked[row["claim_id"]] = r
        # B went on settling persons A had locked: nothing waits on a dead instance
        extra = claims(40, seed=6)
        for row in extra:
            acked[row["claim_id"]] = stubs[1].Settle(settle_request(row), timeout=30)
            by_id[row["claim_id"]] = row
    finally:
        if a.poll() is None:
            a.kill()
        stop_instance(b)
    stored, _ = check_ledger(url, ps, by_id, PERSONS20)
    assert set(stored) == set(acked)
    for cid, resp in acked.items():
        resp.replayed = False
        assert stored[cid] == resp


def test_postgresql_stopped_mid_load(setup, tmp_path, pg_cluster):
    url, policies, registry = setup
    ps = policy_set()
    a, port_a = start_instance(url, tmp_path, "a", policies, registry)
    b, port_b = start_instance(url, tmp_path, "b", policies, registry)
    rows = claims(900, seed=7)
    by_id = {r["claim_id"]: r for r in rows}
    acked, errors = {}, []
    lock = threading.Lock()
    it = iter(rows)
    try:
        chans = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in (port_a, port_b)]
        stubs = [pb_grpc.SettlementStub(c) for c in chans]

        def work(w):
            while True:
                with lock:
                    row = next(it, None)
                if row is None:
                    return
                deadline = time.time() + 60
                while True:  # a counter retries with backoff until the database is back
                    try:
                        acked[row["claim_id"]] = stubs[w % 2].Settle(settle_request(row), timeout=30)
                        break
                    except grpc.RpcError as e:
                        errors.append((e.code(), error_from_rpc(e)))
                        assert time.time() < deadline, "the instances did not recover"
                        time.sleep(0.2)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        t0 = time.time()
        while len(acked) < 250 and time.time() - t0 < 30:
            time.sleep(0.01)
        pg_cluster.stop("fast")
        down_at = len(acked)
        time.sleep(2.0)
        assert len(acked) <= down_at + 16  # in flight at the moment it stopped, at most
        # reads fail the same way while it is down
        with pytest.raises(grpc.RpcError) as read_err:
            stubs[0].GetSettlement(pb.GetSettlementRequest(claim_id=rows[0]["claim_id"]), timeout=30)
        assert read_err.value.code() == grpc.StatusCode.UNAVAILABLE
        pg_cluster.start()
        for t in threads:
            t.join(120)
        # both instances still serve (no restart): reads and writes
        assert stubs[0].GetSettlement(pb.GetSettlementRequest(claim_id=rows[0]["claim_id"]), timeout=30).claim_id
    finally:
        if not (pg_cluster.data / "postmaster.pid").exists():
            pg_cluster.start()
        stop_instance(a)
        stop_instance(b)
    assert a.returncode == 0 and b.returncode == 0
    assert len(acked) == len(rows)
    assert errors and all(code == grpc.StatusCode.UNAVAILABLE for code, _ in errors)
    details = [d for _, d in errors if d is not None]
    assert details and all(d.code == pb.STORE_FAILURE and "retry" in d.message for d in details)
    stored, _ = check_ledger(url, ps, by_id, PERSONS20)
    assert set(stored) == set(acked)
    for cid, resp in acked.items():
        resp.replayed = False
        assert stored[cid] == resp
