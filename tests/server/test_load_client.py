"""The C load client of benchmarks/ (loadgen.c): it sends real settlements, reports each
call's gRPC status, and keeps to its schedule; the server figures in the README rest on it."""
from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("medsettle_bench_server", REPO / "benchmarks" / "bench_server.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def loadgen(bench, tmp_path_factory):
    exe = bench.build_loadgen(tmp_path_factory.mktemp("loadgen"))
    if exe is None:
        pytest.skip("benchmarks/loadgen.c does not build here: needs libnghttp2's headers "
                    "(Debian: apt-get install libnghttp2-dev); .ci/run installs them")
    return exe


def test_open_loop_settles_every_claim_once(bench, loadgen, tmp_path):
    client = bench.CClient(loadgen)
    res = bench.run(rates=(400,), duration=1.0, saturation=False, workdir=str(tmp_path), client=client,
                    log=lambda *_: None)
    r = res["rates"][0]
    assert res["client"] == "c"
    assert (r["requests"], r["ok"], r["errors"]) == (400, 400, 0)
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 5000
    with sqlite3.connect(tmp_path / "store.db") as db:
        # 1,000 warm-up settlements, then the 400 measured ones: each in the ledger once
        (rows, distinct), = db.execute("SELECT COUNT(*), COUNT(DISTINCT claim_id) FROM ledger").fetchall()
    assert rows == distinct == 1400


def test_schedule_and_statuses_are_recorded(bench, loadgen, tmp_path):
    registry = tmp_path / "persons.parquet"
    bench.write_registry(registry, 300, seed=11)
    good = bench.make_payloads(200, seed=11, tag="lg")
    bad = [b"\xff\xff\xff"] * 100  # not a SettleRequest: the server answers with an error status
    payloads = [p for pair in zip(good[:100], bad) for p in pair] + good[100:]
    proc, port = bench.start_server(tmp_path / "store.db", registry)
    try:
        out, cpu = bench.CClient(loadgen).run(f"127.0.0.1:{port}", payloads, rate=500.0)
    finally:
        bench.stop_server(proc)
    assert len(out) == 300 and cpu > 0
    # open loop: request i is due at i / rate, whatever the answers
    assert np.array_equal(out["due_ns"], (np.arange(300) * 1e9 / 500.0).astype(np.int64))
    assert (out["done_ns"] >= out["due_ns"]).all()
    is_bad = np.zeros(300, dtype=bool)
    is_bad[1:200:2] = True
    assert (out["grpc_status"][~is_bad] == 0).all() and (out["http_status"] == 200).all()
    assert (out["grpc_status"][is_bad] > 0).all()
    lat, ok = bench._latencies(out)
    assert ok.sum() == 200 and not np.isnan(lat).any()


def test_closed_loop_holds_calls_in_flight(bench, loadgen, tmp_path):
    registry = tmp_path / "persons.parquet"
    bench.write_registry(registry, 600, seed=12)
    payloads = bench.make_payloads(600, seed=12, tag="cl")
    proc, port = bench.start_server(tmp_path / "store.db", registry)
    try:
        r = bench.CClient(loadgen).saturation(f"127.0.0.1:{port}", payloads, concurrency=8, duration=0.2)
    finally:
        bench.stop_server(proc)
    assert (r["requests"], r["ok"], r["errors"], r["concurrency"]) == (600, 600, 0, 8)
    assert r["achieved_per_s"] > 0


def test_disk_baseline_times_every_commit(bench, tmp_path):
    r = bench.run_disk_baseline(0.5, commits_per_s=100, rows=2, folder=str(tmp_path), log=lambda *_: None)
    assert r["commits"] == 50
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    assert 0 <= r["over_50ms"] <= 50
    assert list(tmp_path.iterdir()) == []  # its database is removed


def test_refusal_texts_are_reported(bench, loadgen, tmp_path, monkeypatch):
    """LOADGEN_MESSAGES=1: every error's grpc-message comes back by call, and
    bench_overload.refusal_texts counts them by status and text (how docs/SERVER.md tells
    admission's refusals, with advice, from gRPC's own)."""
    spec = importlib.util.spec_from_file_location("medsettle_bench_overload", REPO / "benchmarks" / "bench_overload.py")
    overload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overload)
    registry = tmp_path / "persons.parquet"
    bench.write_registry(registry, 40, seed=11)
    good = bench.make_payloads(20, seed=11, tag="msg")
    payloads = [p for pair in zip(good, [b"\xff\xff\xff"] * 20) for p in pair]
    monkeypatch.setenv("LOADGEN_MESSAGES", "1")
    proc, port = bench.start_server(tmp_path / "store.db", registry)
    try:
        client = bench.CClient(loadgen)
        out, _ = client.run(f"127.0.0.1:{port}", payloads, rate=500.0)
    finally:
        bench.stop_server(proc)
    texts = overload.refusal_texts(client.last_stderr, out["grpc_status"])
    assert sum(texts.values()) == 20 and len(texts) == 1, texts
    (key,) = texts
    assert key.startswith("INVALID_ARGUMENT: INVALID_REQUEST: "), key
    assert not any(ch.isdigit() for ch in key), key  # digits folded, so texts group
