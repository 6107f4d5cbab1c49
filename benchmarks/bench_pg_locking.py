"""Per-key serialisation on PostgreSQL: advisory locks per key (the server's mode) against
SERIALIZABLE transactions with retry, measured with two writers on the same hot persons.

    python benchmarks/bench_pg_locking.py [--persons 20] [--duration 10] [--group 8]

Starts a throw-away cluster (tests/server/pg.py, fsync on), registers the persons, and runs
two processes, each a GroupWriter on its own connection settling groups of `--group` claims
of the `--persons` persons back to back for `--duration` seconds, once per mode. Reports
settlements/s, the groups re-run (conflicts), group latency, and checks afterwards that the
accumulators equal the fold of the ledger and that no claim was settled twice.
"""
from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "server"))

import engine  # noqa: E402
import pg  # noqa: E402
from server.batcher import SETTLE, GroupWriter, Pending  # noqa: E402
from server.client import claim_pb  # noqa: E402
from server.core import Core  # noqa: E402
from server.registry import Person, person_to_row  # noqa: E402
from server.store.postgres import PostgresStore  # noqa: E402


def claims(worker: int, n: int, persons: int):
    for i in range(n):
        row = {"claim_id": f"w{worker}-{i}", "person_id": f"hot{(i * 7 + worker) % persons}",
               "settle_time": dt.datetime(2023, 1, 1) + dt.timedelta(seconds=i * 50 + worker),
               "visit_type": "inpatient", "facility_level": "secondary", "locality": "county",
               "total_amount": 300_00, "in_scope_amount": 300_00}
        yield claim_pb(row, facility_id="H1")


def worker(args):
    url, mode, w, persons, duration, group = args
    store = PostgresStore(url, isolation=mode, pool_size=1)
    gw = GroupWriter(store, Core(engine.load_policies(None)), person_cache=0)
    it = claims(w, 10_000_000, persons)
    times, settled = [], 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        items = [Pending(SETTLE, next(it)) for _ in range(group)]
        t = time.perf_counter()
        answers = gw.process(items)
        times.append(time.perf_counter() - t)
        settled += sum(isinstance(a, bytes) for _, a in answers)
    store.close()
    return settled, gw.stats["conflicts"], gw.stats["commit_failures"], times


def run(cluster, mode: str, persons: int, duration: float, group: int) -> dict:
    url = cluster.socket_url(cluster.create_database())
    s = PostgresStore(url)
    s.upsert_persons([person_to_row(Person(f"hot{i}", "140600", "resident", 0, ())) for i in range(persons)])
    s.close()
    with mp.get_context("spawn").Pool(2) as pool:
        parts = pool.map(worker, [(url, mode, w, persons, duration, group) for w in range(2)])
    s = PostgresStore(url)
    assert s.fold_ledger() == s.stored_accumulators(), "accumulators drifted from the ledger"
    entries = [e for part in s.iter_ledger() for e in part]
    assert len({e.claim_id for e in entries}) == len(entries)
    s.close()
    t = np.array([x for p in parts for x in p[3]]) * 1e3
    return {"mode": mode, "settled_per_s": sum(p[0] for p in parts) / duration,
            "groups": len(t), "reruns": sum(p[1] for p in parts), "failed_groups": sum(p[2] for p in parts),
            "group_p50_ms": float(np.percentile(t, 50)), "group_p99_ms": float(np.percentile(t, 99))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=20)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args(argv)
    cluster = pg.start_cluster(fsync=True)
    try:
        for mode in ("locks", "serializable"):
            r = run(cluster, mode, args.persons, args.duration, args.group)
            print(f"{mode:>12}: {r['settled_per_s']:7.0f} settlements/s, {r['groups']} groups, {r['reruns']} re-run "
                  f"(conflicts), {r['failed_groups']} failed, group p50 {r['group_p50_ms']:.1f} ms "
                  f"p99 {r['group_p99_ms']:.1f} ms")
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
