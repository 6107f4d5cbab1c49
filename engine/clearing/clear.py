"""Year-end clearing (issue 17): partition, then per bucket settle + reconcile + account, then report.

`clear(...)` runs the phases in order and writes, under `out`:

    results/bucket-NNNNN.parquet          every claim of the year re-settled (CLEARED_SCHEMA)
    reconciliation/claims.parquet/        differences with the counter's ledger (with --ledger),
    reconciliation/persons.parquet/         a folder of part files each (one per bucket)
    accounts/persons.parquet/             the per person annual summary, part files
    accounts/*.parquet                    fund, critical-illness and facility accounts
    report.html, charts/*.png             the report
    summary.json                          counts, key figures, time per phase, peak RSS, disk used
    work/                                 the partitioned inputs (removed at the end unless keep_work)

A killed run resumes (`resume=True`) from the partition and the buckets already done.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import time

import duckdb
from pathlib import Path
from typing import Callable, Optional

from ..model import PolicySet
from ..policy import load_policies
from ..settle import compiled
from .accounts import key_figures, register_layers, write_accounts
from .files import write_json
from .partition import BUCKET_ROWS, ClearingError, dataset_files, fingerprint, from_manifest, load_manifest, partition
from .progress import PhaseProgress
from .reconcile import combine
from .report import write_report
from .resettle import Outputs, resettle

MEMORY_LIMIT = "2GB"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def year_policies(policies: PolicySet, year: int, where: str) -> None:
    if not any(p.year == year for p in policies.policies):
        years = sorted({p.year for p in policies.policies})
        raise ClearingError(f"{where}: no policy for year {year} (the folder has {years})")


def connect(work: Path, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that spills to `work`/duckdb.tmp beyond `memory_limit`."""
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": threads,
                                 "temp_directory": str(work / "duckdb.tmp"),
                                 "preserve_insertion_order": False})
    con.execute("SET enable_progress_bar = false")
    return con


def prepare(out: Path, claims, registry, ledger, year: int, use_claim_identities: bool, bucket_rows: int,
            resume: bool, stream, timings: dict, counts: dict):
    """The partition phase (or the finished one of an earlier run when resuming)."""
    files = dataset_files(claims)
    registry_files = None
    if not use_claim_identities:
        if registry is None:
            raise ClearingError("--registry is required (or --use-claim-identities to settle on the claims' own "
                                "region, scheme, age and identities)")
        registry_files = dataset_files(registry)
    ledger_files = dataset_files(ledger) if ledger is not None else None
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    key = fingerprint(files, registry_files, ledger_files, year, use_claim_identities, bucket_rows)
    manifest = load_manifest(work)
    t = time.perf_counter()
    if resume and manifest is not None and manifest.get("key") == key:
        part = from_manifest(work, manifest)
        counts["partition_reused"] = True
    else:
        if resume and manifest is not None:
            raise ClearingError(f"{out}: --resume, but the run there was made from other inputs or options; "
                                "use a new --out, or run without --resume to start afresh")
        shutil.rmtree(work / "buckets", ignore_errors=True)
        part = partition(files, registry_files, ledger_files, work, year, bucket_rows, key, stream)
        counts["partition_reused"] = False
    timings["partition"] = round(time.perf_counter() - t, 3)
    counts.update(claims=part.rows, other_years=part.other_years, buckets=part.buckets)
    return part


def settle_year(part, out: Path, policy_set: PolicySet, year: int, use_registry: bool, resume: bool,
                memory_limit: str, threads: int, stream, timings: dict, counts: dict,
                after_bucket: Optional[Callable[[int], None]] = None):
    """The settle phase (every bucket settled, reconciled, accounted) and the accounts' totals;
    returns (DuckDB connection, key figures, reconciliation figures, tables written)."""
    con = connect(out / "work", memory_limit, threads)
    register_layers(con, policy_set)
    t = time.perf_counter()
    # one DuckDB thread per bucket worker: the workers are the parallelism, and DuckDB's own
    # threads on top of them oversubscribed the cores (10 M claims: settle phase 17-18 s with
    # one thread, 23-28 s with two, alternated in one session)
    con.execute("SET threads = 1")
    done, parts = resettle(part, Outputs(out, out / "work"), compiled(policy_set), use_registry, year, con,
                           resume, stream, after_bucket)
    con.execute(f"SET threads = {int(threads)}")
    timings["settle"] = round(time.perf_counter() - t, 3)
    counts.update(settled=done["settled"], skipped=done["skipped"])
    t = time.perf_counter()
    with PhaseProgress("accounts", 2, stream) as bar:
        tables = write_accounts(con, out, parts)
        bar.advance()
        figures = key_figures(con, out, parts)
        bar.advance()
    timings["accounts"] = round(time.perf_counter() - t, 3)
    counts["duplicates"] = figures["statuses"].get("DUPLICATE_CLAIM", 0)
    recon = combine([p["reconciliation"] for p in parts]) if part.has_ledger else None
    if recon is not None:
        tables["reconciliation_claims"] = recon["claim_rows"]
        tables["reconciliation_persons"] = recon["person_rows"]
    return con, figures, recon, tables, done["seconds"]


def clear(year: int, claims, policies, out, registry=None, ledger=None, *, use_claim_identities: bool = False,
          resume: bool = False, bucket_rows: int = BUCKET_ROWS, memory_limit: str = MEMORY_LIMIT,
          threads: int = 2, keep_work: bool = False, charts: bool = True, stream=sys.stderr,
          after_bucket: Optional[Callable[[int], None]] = None) -> dict:
    """Clear `year`; returns the summary (also written to out/summary.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy_set = policies if isinstance(policies, PolicySet) else load_policies(policies)
    year_policies(policy_set, year, str(policies if not isinstance(policies, PolicySet) else "policies"))
    timings: dict = {}
    counts: dict = {}
    part = prepare(out, claims, registry, ledger, year, use_claim_identities, bucket_rows, resume, stream,
                   timings, counts)
    partition_steps = (load_manifest(out / "work") or {}).get("seconds")
    con, figures, recon, tables, steps = settle_year(part, out, policy_set, year, not use_claim_identities, resume,
                                                     memory_limit, threads, stream, timings, counts, after_bucket)
    disk_peak = disk_bytes(out)
    t = time.perf_counter()
    with PhaseProgress("report", 1, stream) as bar:
        note = (f"Year {year}: {part.rows:,} claims re-settled with "
                + ("the claims' own identities" if use_claim_identities else "the registry's basis as of each claim")
                + f" under {policy_set.source or 'the policy set'}"
                + (f"; {part.other_years:,} claims of other years not cleared" if part.other_years else "")
                + ("; reconciled with the ledger" if part.has_ledger else "; no ledger given"))
        write_report(con, out, f"Year-end clearing {year}", figures, recon, note, charts)
        bar.advance()
    timings["report"] = round(time.perf_counter() - t, 3)
    con.close()
    disk_peak = max(disk_peak, disk_bytes(out))
    if not keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    summary = {"year": year, "counts": counts, "reconciliation": recon, "figures": figures, "tables": tables,
               "seconds": timings, "partition_steps_seconds": partition_steps,
               "settle_steps_worker_seconds": steps, "peak_rss_bytes": peak_rss_bytes(),
               "disk_peak_bytes": disk_peak, "disk_final_bytes": disk_bytes(out)}
    write_json(out / "summary.json", summary)
    return summary
