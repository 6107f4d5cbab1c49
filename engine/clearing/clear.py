"""Year-end clearing (issue 17): partition, re-settle, reconcile, accounts, report.

`clear(...)` runs the phases in order and writes, under `out`:

    results/bucket-NNNNN.parquet   every claim of the year re-settled (CLEARED_SCHEMA)
    reconciliation/*.parquet       differences with the counter's ledger (with --ledger)
    accounts/*.parquet             fund, critical-illness, facility and person accounts
    report.html, charts/*.png      the report
    summary.json                   counts, key figures, time per phase, peak RSS, disk used
    work/                          the partitioned claims (removed at the end unless keep_work)

A killed run resumes (`resume=True`) from the partition and the buckets already written.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..model import PolicySet
from ..policy import load_policies
from ..settle import compiled
from .accounts import key_figures, register_layers, register_results, write_accounts
from .files import write_json
from .partition import (BUCKET_ROWS, ClearingError, connect, dataset_files, fingerprint, from_manifest,
                        load_manifest, partition)
from .progress import PhaseProgress
from .reconcile import reconcile, register_ledger
from .report import write_report
from .resettle import resettle

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


def prepare(out: Path, claims, registry, year: int, use_claim_identities: bool, bucket_rows: int,
            resume: bool, memory_limit: str, threads: int, stream, timings: dict, counts: dict):
    """The partition phase (or the finished one of an earlier run when resuming)."""
    files = dataset_files(claims)
    registry_files = None
    if not use_claim_identities:
        if registry is None:
            raise ClearingError("--registry is required (or --use-claim-identities to settle on the claims' own "
                                "region, scheme, age and identities)")
        registry_files = dataset_files(registry)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    key = fingerprint(files, Path(registry) if registry else None, year, use_claim_identities, bucket_rows)
    manifest = load_manifest(work)
    t = time.perf_counter()
    if resume and manifest is not None and manifest.get("key") == key:
        part = from_manifest(work, manifest)
        counts["partition_reused"] = True
    else:
        if resume and manifest is not None:
            raise ClearingError(f"{out}: --resume, but the run there was made from other inputs or options; "
                                "use a new --out, or run without --resume to start afresh")
        shutil.rmtree(out / "results", ignore_errors=True)
        # closed after the phase: DuckDB keeps its buffers (up to the memory limit) while
        # open, and the settle phase needs that memory for its buckets
        with connect(work, memory_limit, threads) as con:
            part = partition(con, files, registry_files, work, year, bucket_rows, key, stream)
        counts["partition_reused"] = False
    timings["partition"] = round(time.perf_counter() - t, 3)
    counts.update(claims=part.rows, other_years=part.other_years, duplicates=part.duplicates, buckets=part.buckets)
    return part


def clear(year: int, claims, policies, out, registry=None, ledger=None, *, use_claim_identities: bool = False,
          resume: bool = False, bucket_rows: int = BUCKET_ROWS, memory_limit: str = MEMORY_LIMIT,
          threads: int = 2, keep_work: bool = False, charts: bool = True, stream=sys.stderr,
          after_bucket: Optional[Callable[[int], None]] = None) -> dict:
    """Clear `year`; returns the summary (also written to out/summary.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy_set = policies if isinstance(policies, PolicySet) else load_policies(policies)
    year_policies(policy_set, year, str(policies if not isinstance(policies, PolicySet) else "policies"))
    ledger_files = dataset_files(ledger) if ledger is not None else None
    timings: dict = {}
    counts: dict = {}
    part = prepare(out, claims, registry, year, use_claim_identities, bucket_rows, resume, memory_limit,
                   threads, stream, timings, counts)
    t = time.perf_counter()
    counts.update(resettle(part, out, compiled(policy_set), not use_claim_identities, resume, stream, after_bucket))
    timings["settle"] = round(time.perf_counter() - t, 3)
    disk_peak = disk_bytes(out)

    con = connect(out / "work", memory_limit, threads)
    t = time.perf_counter()
    recon = None
    with PhaseProgress("reconcile", 2 if ledger_files else 1, stream) as bar:
        if ledger_files:
            register_ledger(con, ledger_files, year)
        register_results(con, out / "results", "ledger_paid" if ledger_files else None)
        bar.advance()
        if ledger_files:
            recon = reconcile(con, out)
            bar.advance()
    timings["reconcile"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    with PhaseProgress("accounts", 2, stream) as bar:
        register_layers(con, policy_set)
        tables = write_accounts(con, out)
        bar.advance()
        figures = key_figures(con)
        bar.advance()
    timings["accounts"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    with PhaseProgress("report", 1, stream) as bar:
        note = (f"Year {year}: {part.rows:,} claims re-settled with "
                + ("the claims' own identities" if use_claim_identities else "the registry's basis as of each claim")
                + f" under {policy_set.source or 'the policy set'}"
                + (f"; {part.other_years:,} claims of other years not cleared" if part.other_years else "")
                + (f"; reconciled with {len(ledger_files)} ledger file(s)" if ledger_files else "; no ledger given"))
        write_report(con, out, f"Year-end clearing {year}", figures, recon, note, charts)
        bar.advance()
    timings["report"] = round(time.perf_counter() - t, 3)
    con.close()
    disk_peak = max(disk_peak, disk_bytes(out))
    if not keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    summary = {"year": year, "counts": counts, "reconciliation": recon, "figures": figures, "tables": tables,
               "seconds": timings, "peak_rss_bytes": peak_rss_bytes(), "disk_peak_bytes": disk_peak,
               "disk_final_bytes": disk_bytes(out)}
    write_json(out / "summary.json", summary)
    return summary
