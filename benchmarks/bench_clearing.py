"""Benchmarks of year-end clearing (pytest-benchmark records, not timed tests).

    python -m pytest benchmarks/bench_clearing.py                          # 200,000 claims
    MEDSETTLE_BENCH_CLEAR_SIZE=10000000 python -m pytest benchmarks/bench_clearing.py

The year 2017 of the seed regions (five policies) is generated once per session
(engine.generate, seed 2017, 0.5 % invalid rows) with its registry and a ledger of
a tenth of the claims (benchmarks/clear_big.py), then measured:

* `clear`: `engine.clearing.clear` end to end (partition, settle, reconcile, accounts,
  report with charts); the time of each phase, peak RSS of the process so far and the
  disk used go to extra_info;
* `settle_bucket`: one bucket's re-settlement (registry basis + engine call), the
  per-claim part of the settle phase;
* `one_call` (the simplest alternative): the year read whole, the registry's basis,
  one `engine.settle` call, the results written: no partition, no reconciliation,
  accounts or report, and memory growing with the year;
* `floor`: the claims read and a table of the results' size written (Parquet, LZ4):
  the I/O any clearing pays.

For 100 M claims use benchmarks/clear_big.py (a child process, peak RSS measured).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from clear_big import generate, write_ledger  # noqa: E402
from engine import load_policies  # noqa: E402
from engine.clearing import clear  # noqa: E402

YEAR = 2017


def _size() -> int:
    return int(os.environ.get("MEDSETTLE_BENCH_CLEAR_SIZE", "200000").replace("_", ""))


@pytest.fixture(scope="session")
def year(tmp_path_factory):
    d = tmp_path_factory.mktemp("clear-bench")
    claims, persons = generate(d, _size(), YEAR)
    ledger = d / "ledger.parquet"
    write_ledger(claims, ledger, 0.1)
    return d, claims, persons, ledger


def _rate(benchmark, n: int):
    """Claims per second of the mean round; None under --benchmark-disable (nothing was timed)."""
    return round(n / benchmark.stats.stats.mean) if benchmark.stats is not None else None


def test_clear(benchmark, year):
    d, claims, persons, ledger = year
    policies = load_policies()
    out = d / "out"
    summaries = []

    def run():
        shutil.rmtree(out, ignore_errors=True)
        summaries.append(clear(YEAR, claims, policies, out, persons, ledger, stream=None,
                               bucket_rows=max(50_000, _size() // 4)))

    benchmark.pedantic(run, rounds=2, iterations=1)
    s = summaries[-1]
    n = s["counts"]["claims"]
    benchmark.extra_info.update(claims=n, claims_per_s=_rate(benchmark, n),
                                phases_s=s["seconds"], peak_rss_bytes=s["peak_rss_bytes"],
                                disk_peak_bytes=s["disk_peak_bytes"])
    assert n > 0 and s["reconciliation"]["matched_exactly"] > 0


def test_settle_bucket(benchmark, year):
    import pyarrow.parquet as pq

    from engine.registry import read_persons
    from engine.settle import compiled
    from engine.clearing.resettle import settle_bucket

    _, claims_path, persons_path, _ = year
    claims = pq.read_table(claims_path)
    import pyarrow as pa

    claims = claims.append_column("facility_id", pa.nulls(claims.num_rows, pa.string())) \
        .append_column("ord", pa.array(range(claims.num_rows), pa.int64()))
    persons = read_persons(persons_path)
    policies = compiled(load_policies())
    result = benchmark.pedantic(settle_bucket, args=(claims, persons, policies), rounds=3, iterations=1)
    assert result.num_rows == claims.num_rows
    benchmark.extra_info.update(claims=claims.num_rows,
                                claims_per_s=_rate(benchmark, claims.num_rows))


def _one_call(claims_path, persons_path, out):
    import pyarrow.parquet as pq

    from engine import settle
    from engine.files import write_table
    from engine.registry import as_of, read_persons

    claims = pq.read_table(claims_path)
    results = settle(as_of(claims, read_persons(persons_path)).claims, load_policies()).results
    write_table(results, out)
    return results.num_rows


def test_one_call(benchmark, year):
    d, claims, persons, _ = year
    n = benchmark.pedantic(_one_call, args=(claims, persons, d / "one-call.parquet"), rounds=2, iterations=1)
    benchmark.extra_info.update(claims=n, claims_per_s=_rate(benchmark, n))


def test_floor(benchmark, year):
    import pyarrow.parquet as pq

    from engine.files import write_table

    d, claims, _, _ = year
    sized = d / "one-call.parquet"  # the results of test_one_call, or the claims themselves

    def run():
        table = pq.read_table(claims)
        write_table(pq.read_table(sized) if sized.exists() else table, d / "floor.parquet")
        return table.num_rows

    n = benchmark.pedantic(run, rounds=2, iterations=1)
    benchmark.extra_info.update(claims=n, claims_per_s=_rate(benchmark, n))
