"""The big run of year-end clearing: generate a year of the seed regions, clear it, report figures.

    python benchmarks/clear_big.py --claims 10000000 --dir /tmp/clear10m
    python benchmarks/clear_big.py --claims 100000000 --dir /tmp/clear100m --ledger-fraction 0.1

Generates (once; reused when the files exist) `claims.parquet` (engine.generate, seed
2017, 0.5 % invalid rows) and `persons.parquet` of the year's seed regions, and a
ledger of `--ledger-fraction` of the claims as the counter would have settled them (on
the claims' own identities, 1 % of them then reversed), then runs
`medsettle clear` in a child process and prints, as JSON: time per phase, wall time,
the child's CPU seconds (user + system: on a shared machine the wall time
is at least half of it on two cores, and the CPU seconds move less with the load) and peak
RSS (os.wait4), disk used (peak of the output folder, the inputs), and
the counts. The machine is shared: say so next to the figures.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import load_policies, settle  # noqa: E402
from engine.generate import write_claims, write_persons  # noqa: E402
from engine.schema import CLAIMS_SCHEMA, LEDGER_SCHEMA, RESULTS_SCHEMA  # noqa: E402

SEED = 2017
INVALID_RATE = 0.005


def generate(folder: Path, n: int, year: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    claims, persons = folder / "claims.parquet", folder / "persons.parquet"
    policies = load_policies()
    if not claims.exists():
        t = time.perf_counter()
        write_claims(claims, policies, n, SEED, INVALID_RATE, year=year)
        print(f"generated {n:,} claims in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not persons.exists():
        write_persons(persons, policies, n, SEED, year=year)
    return claims, persons


def write_ledger(claims: Path, path: Path, fraction: float, reversed_share: float = 0.01) -> int:
    """A ledger (LEDGER_SCHEMA) of every row group's first `fraction` of claims, settled on
    their own columns, as the counter would have; `reversed_share` of them then reversed."""
    if path.exists():
        return pq.ParquetFile(path).metadata.num_rows
    policies = load_policies()
    f = pq.ParquetFile(claims)
    tmp = path.with_name("." + path.name + ".tmp")
    seq = 0
    rng = np.random.default_rng(1)
    with pq.ParquetWriter(tmp, LEDGER_SCHEMA, compression="zstd") as w:
        for g in range(f.num_row_groups):
            batch = f.read_row_group(g, columns=CLAIMS_SCHEMA.names)
            batch = batch.slice(0, int(batch.num_rows * fraction))
            res = settle(batch, policies).results
            ok = pc.equal(res.column("status"), "ok")
            batch, res = batch.filter(ok), res.filter(ok)
            n = batch.num_rows
            if not n:
                continue
            cols = {"seq": pa.array(np.arange(seq, seq + n, dtype=np.int64)), "kind": pa.array(["settle"] * n),
                    "recorded_at": pc.assume_timezone(batch.column("settle_time"), "Asia/Shanghai").cast(
                        pa.timestamp("us", tz="UTC")),
                    # ten facilities per region and level
                    "facility_id": pc.binary_join_element_wise(
                        batch.column("region"), batch.column("facility_level"),
                        pc.utf8_slice_codeunits(batch.column("claim_id"), -1), "-")}
            seq += n
            for fld in LEDGER_SCHEMA:
                if fld.name in cols:
                    continue
                if fld.name in CLAIMS_SCHEMA.names:
                    cols[fld.name] = batch.column(fld.name)
                elif fld.name in RESULTS_SCHEMA.names and fld.name != "claim_id":
                    cols[fld.name] = res.column(fld.name)
                else:
                    cols[fld.name] = pa.nulls(n, fld.type)
            w.write_table(pa.table([cols[x.name].cast(x.type) for x in LEDGER_SCHEMA], schema=LEDGER_SCHEMA))
            k = int(n * reversed_share)
            if k:
                pick = pa.array(np.sort(rng.choice(n, k, replace=False)))
                rev = {x.name: pa.nulls(k, x.type) for x in LEDGER_SCHEMA}
                rev.update(seq=pa.array(np.arange(seq, seq + k, dtype=np.int64)), kind=pa.array(["reverse"] * k),
                           recorded_at=cols["recorded_at"].take(pick), reason=pa.array(["cancelled"] * k),
                           **{c: batch.column(c).take(pick) for c in ("claim_id", "person_id", "region", "scheme")})
                seq += k
                w.write_table(pa.table([rev[x.name].cast(x.type) for x in LEDGER_SCHEMA], schema=LEDGER_SCHEMA))
    os.replace(tmp, path)
    return seq


def run_clear(claims: Path, persons: Path, ledger: Path | None, out: Path, year: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "engine.clearing.command", "clear", "--year", str(year), "--claims", str(claims),
           "--policies", str(ROOT / "engine" / "policies"), "--registry", str(persons), "--out", str(out), *extra]
    if ledger is not None:
        cmd += ["--ledger", str(ledger)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"clear failed with status {status}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "phases_s": summary["seconds"], "partition_steps_s": summary.get("partition_steps_seconds"),
            "settle_steps_worker_s": summary.get("settle_steps_worker_seconds"),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "disk_peak_gb": round(summary["disk_peak_bytes"] / 1e9, 2),
            "disk_final_gb": round(summary["disk_final_bytes"] / 1e9, 2), "counts": summary["counts"],
            "reconciliation": summary["reconciliation"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--claims", type=int, default=10_000_000)
    ap.add_argument("--year", type=int, default=2017, help="the seed regions' year (2017: five policies)")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--ledger-fraction", type=float, default=0.1)
    ap.add_argument("--bucket-rows", type=int)
    ap.add_argument("--memory-limit")
    args = ap.parse_args()
    claims, persons = generate(args.dir, args.claims, args.year)
    ledger = None
    if args.ledger_fraction > 0:
        ledger = args.dir / "ledger.parquet"
        t = time.perf_counter()
        write_ledger(claims, ledger, args.ledger_fraction)
        print(f"ledger ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    extra = ["--quiet"]
    if args.bucket_rows:
        extra += ["--bucket-rows", str(args.bucket_rows)]
    if args.memory_limit:
        extra += ["--memory-limit", args.memory_limit]
    out = args.dir / "out"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    figures = run_clear(claims, persons, ledger, out, args.year, extra)
    figures["inputs_gb"] = round(sum(p.stat().st_size for p in (claims, persons, *( [ledger] if ledger else [])))
                                 / 1e9, 2)
    figures["claims"] = args.claims
    figures["at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
