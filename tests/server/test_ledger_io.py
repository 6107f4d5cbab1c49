"""`medsettle ledger export` and `medsettle accumulators import` on both backends:
the export round-trips through a batch re-settlement, the import continues a batch
run in real time, both all or nothing."""
from __future__ import annotations

import argparse
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
from engine.schema import CLAIMS_SCHEMA, LEDGER_SCHEMA, RESULTS_SCHEMA
from srv_helpers import PERSONS, T, claim_row, engine_results, engine_table, norm, pb, result_dict
from test_group_writer import person_rows, reverse, run, settle
from server import commands, ledger_io
from server.batcher import GroupWriter
from server.core import Core


def cli(*argv) -> int:
    p = argparse.ArgumentParser(prog="medsettle")
    sub = p.add_subparsers(required=True)
    commands.register_ledger(sub)
    commands.register_accumulators(sub)
    args = p.parse_args(argv)
    return args.func(args)


def year_claims(year=2024, months=range(1, 13), tag="y") -> list:
    rows = []
    for m in months:
        for i, (pid, *_rest) in enumerate(PERSONS):
            vt = ("inpatient", "chronic", "outpatient")[(m + i) % 3]
            rows.append(claim_row(f"{tag}{year}-{m:02d}-{i}", pid, T(year, m, 3 + i, 10), vt,
                                  in_scope=(1 + (m * 7 + i) % 9) * 25_000_00, over_limit=(m % 2) * 100))
    return sorted(rows, key=lambda r: (r["settle_time"], r["claim_id"].encode()))


@pytest.fixture
def gw(store, ps):
    store.upsert_persons(person_rows())
    return GroupWriter(store, Core(ps, verify=True))


def test_export_round_trips_through_a_batch_resettlement(gw, store, store_factory, ps, tmp_path):
    offered = year_claims() + year_claims(2025, range(1, 3))
    answers = []
    for k in range(0, len(offered), 9):
        answers += run(gw, *[settle(r, facility="H7") for r in offered[k:k + 9]])
    rows = [r for r, a in zip(offered, answers) if isinstance(a, bytes)]
    assert len(offered) > len(rows) > 60  # some claims are refused (no rule for the visit): not in the ledger
    last = rows[-1]["claim_id"]  # the newest claim of its person: reversing it changes no other result
    run(gw, reverse(last, facility="H7", reason="entered twice"))
    out = tmp_path / "ledger.parquet"
    assert cli("ledger", "export", "--store", store_factory.target, "-o", str(out)) == 0
    t = pq.read_table(out)
    assert t.schema.equals(LEDGER_SCHEMA)
    assert t.num_rows == len(rows) + 1
    assert t.column("seq").to_pylist() == sorted(t.column("seq").to_pylist())
    d = t.to_pylist()
    rev = [r for r in d if r["kind"] == "reverse"]
    assert len(rev) == 1 and rev[0]["claim_id"] == last and rev[0]["reason"] == "entered twice"
    assert rev[0]["status"] is None and rev[0]["settle_time"] is None and rev[0]["facility_id"] == "H7"
    # the settled claims, as settled (registry basis included), re-settled in one batch: equal results
    reversed_ids = {r["claim_id"] for r in rev}
    kept = t.filter(pa.compute.and_(pa.compute.equal(t.column("kind"), "settle"),
                                    pa.compute.invert(pa.compute.is_in(t.column("claim_id"),
                                                                       pa.array(sorted(reversed_ids))))))
    claims = kept.select(CLAIMS_SCHEMA.names).cast(CLAIMS_SCHEMA)
    want_claims = engine_table([r for r in rows if r["claim_id"] != last])
    assert claims.sort_by("claim_id").equals(want_claims.sort_by("claim_id"))
    again = engine.settle(claims, ps).results
    got = kept.select(RESULTS_SCHEMA.names).to_pylist()
    assert norm(sorted(again.to_pylist(), key=lambda r: r["claim_id"])) == norm(sorted(got, key=lambda r: r["claim_id"]))
    # deltas of the export fold to the stored accumulators
    assert sum(r["delta_compliant_total"] for r in d) == sum(v[1] for v in store.stored_accumulators().values())
    # --year: the entries of one accumulator year only
    out25 = tmp_path / "l2025.parquet"
    assert cli("ledger", "export", "--store", store_factory.target, "--year", "2025", "-o", str(out25)) == 0
    n2025 = sum(r["settle_time"].year == 2025 for r in rows)
    assert pq.read_table(out25).num_rows == n2025 + 1  # the reversal is of a 2025 claim


def test_a_failed_export_leaves_nothing(gw, store, store_factory, tmp_path, monkeypatch):
    run(gw, *[settle(r) for r in year_claims(months=range(1, 4))])
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "ledger.parquet"
    out.write_bytes(b"an older export")
    calls = {"n": 0}
    real = ledger_io.ledger_row

    def flaky(e):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full")
        return real(e)

    monkeypatch.setattr(ledger_io, "ledger_row", flaky)
    monkeypatch.setattr(ledger_io, "EXPORT_BATCH", 4)
    with pytest.raises(OSError):
        ledger_io.write_whole(str(out), ledger_io.ledger_batches(store, batch=4), LEDGER_SCHEMA)
    assert os.listdir(folder) == ["ledger.parquet"] and out.read_bytes() == b"an older export"
    assert cli("ledger", "export", "--store", store_factory.target, "-o", str(tmp_path / "no" / "l.parquet")) == 2


def test_import_continues_a_batch_run(gw, store, store_factory, ps, tmp_path):
    """January-June settled in batch, carried in, July-December in real time: the results and
    the closing accumulators of settling the whole year in one batch."""
    rows = year_claims()
    first = [r for r in rows if r["settle_time"].month <= 6]
    second = [r for r in rows if r["settle_time"].month > 6]
    res = engine.settle(engine_table(first), ps)
    carry = tmp_path / "acc.parquet"
    pq.write_table(res.accumulators, carry)
    assert cli("accumulators", "import", "--store", store_factory.target, str(carry)) == 0
    got = []
    for k in range(0, len(second), 8):
        got += run(gw, *[settle(r) for r in second[k:k + 8]])
    want, want_acc = engine_results(ps, rows)
    want_second = [w for w in want if w["claim_id"] in {r["claim_id"] for r in second}]
    assert norm([result_dict(pb.SettleResponse.FromString(a).result) for a in got]) == norm(want_second)
    assert store.stored_accumulators() == want_acc == store.fold_ledger()
    # again: refused whole (every key now has settlements), nothing changes
    assert cli("accumulators", "import", "--store", store_factory.target, str(carry)) == 1
    assert store.stored_accumulators() == want_acc


def test_import_is_refused_whole(store, store_factory, ps, tmp_path, gw):
    res = engine.settle(engine_table(year_claims(months=[1])), ps)
    acc = res.accumulators
    # one key already settled in real time: nothing of the file is imported
    run(gw, settle(claim_row("rt-1", "p-plain", T(2024, 2, 1))))
    carry = tmp_path / "acc.parquet"
    pq.write_table(acc, carry)
    before = store.stored_accumulators()
    assert cli("accumulators", "import", "--store", store_factory.target, str(carry)) == 1
    assert store.stored_accumulators() == before and list(store.iter_carried()) == []
    # malformed tables name the row and column; a key twice is refused
    bad = acc.set_column(acc.schema.get_field_index("admissions"), "admissions",
                         pa.array([-1] + acc.column("admissions").to_pylist()[1:], pa.int64()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    assert cli("accumulators", "import", "--store", store_factory.target, str(tmp_path / "bad.parquet")) == 2
    pq.write_table(acc.drop(["layers"]), tmp_path / "nolayers.parquet")
    assert cli("accumulators", "import", "--store", store_factory.target, str(tmp_path / "nolayers.parquet")) == 2
    others = acc.filter(pa.compute.not_equal(acc.column("person_id"), "p-plain"))
    pq.write_table(pa.concat_tables([others, others.slice(0, 1)]), tmp_path / "twice.parquet")
    assert cli("accumulators", "import", "--store", store_factory.target, str(tmp_path / "twice.parquet")) == 1
    assert list(store.iter_carried()) == []
    pq.write_table(others, tmp_path / "ok.parquet")
    assert cli("accumulators", "import", "--store", store_factory.target, str(tmp_path / "ok.parquet")) == 0
    assert len(list(store.iter_carried())) == others.num_rows


def test_export_beside_a_running_server_import_refused(tmp_path, ps):
    """An SQLite store held by a server (its exclusive lock) can be exported, not imported into."""
    from server.store import SQLiteStore

    path = str(tmp_path / "s.db")
    live = SQLiteStore(path, exclusive=True)
    live.upsert_persons(person_rows())
    run(GroupWriter(live, Core(ps)), settle(claim_row("e1", "p-plain", T(2024, 3, 3))))
    try:
        assert cli("ledger", "export", "--store", path, "-o", str(tmp_path / "l.parquet")) == 0
        assert pq.read_table(tmp_path / "l.parquet").column("claim_id").to_pylist() == ["e1"]
        pq.write_table(engine.settle(engine_table(year_claims(months=[1])), ps).accumulators, tmp_path / "a.parquet")
        assert cli("accumulators", "import", "--store", path, str(tmp_path / "a.parquet")) == 2
        assert list(live.iter_carried()) == []
    finally:
        live.close()
    assert cli("ledger", "export", "--store", str(tmp_path / "none.db"), "-o", str(tmp_path / "x.parquet")) == 2
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "x.parquet").exists()
