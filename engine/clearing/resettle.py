"""Phase 2: each bucket settled as one call, reconciled and accounted while in memory.

Keys are independent (spec 4), so a call per bucket of persons gives the results of
one call over the year. A bucket's claims (in input order) are given the registry's
basis as of each claim's date (unless the claims' own columns are to be used),
settled with `engine.settle`, and, while the results are in memory, reconciled with
the bucket's ledger rows and summed into the accounts (engine.clearing.reconcile,
.accounts). Its files go under out/ (written whole), its partial accounts and
figures under work/buckets/bucket-NNNNN/, renamed into place last: that folder's
presence is the bucket's "done" mark, so `--resume` continues with the buckets
that have none. Two buckets are worked on at once (the kernel, Arrow, Parquet and
DuckDB release the GIL), each with its own DuckDB cursor.

Why fused: the year's results were written, then read back twice (reconciliation,
accounts), and the group-bys over 100 M claims spilled to disk: 575 s of the 815 s
measured at 100 M were those two phases.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..compile import CompiledPolicies
from ..registry import BASIS_BEFORE_BIRTH, BASIS_UNKNOWN_PERSON, as_of
from ..schema import AMOUNT_COLUMNS, CLAIMS_SCHEMA, MAX_AMOUNT, PERSONS_SCHEMA
from ..settle import Settler, settle
from .accounts import PARTIALS, bucket_accounts, empty_ledger_paid
from .files import write_parquet
from .partition import BUCKET_CLAIMS_SCHEMA, BUCKET_LEDGER_SCHEMA, Partition, read_bucket, read_forced
from .progress import PhaseProgress
from .reconcile import ledger_paid, reconcile_bucket
from .schema import BEFORE_BIRTH, CLEARED_SCHEMA, UNKNOWN_PERSON

DUPLICATE = "DUPLICATE_CLAIM"  # the engine's status (engine.schema.STATUSES)

#: Buckets worked on at once (each about 0.6 KB per claim of memory while in flight); three
#: were slower on two cores (10 M claims: settle phase 18.4-18.8 s against 14.3-15.1 s).
WORKERS = 2


class Outputs(NamedTuple):
    """Where a bucket's files go."""
    out: Path
    work: Path

    def results(self, b: int) -> Path:
        return self.out / "results" / f"bucket-{b:05d}.parquet"

    def part(self, table: str, b: int) -> Path:
        """A part file of a table written bucket by bucket (a folder named like the table)."""
        return self.out / table / f"part-{b:05d}.parquet"

    def done(self, b: int) -> Path:
        return self.work / "buckets" / f"bucket-{b:05d}"


def read_bucket_claims(part: Partition, bucket: int) -> pa.Table:
    """The bucket's claims in input order: CLAIMS_SCHEMA columns plus facility_id and ord."""
    t = read_bucket(part.folder, "claims", bucket)
    return BUCKET_CLAIMS_SCHEMA.empty_table() if t is None else t


def read_bucket_registry(part: Partition, bucket: int) -> pa.Table:
    t = read_bucket(part.folder, "registry", bucket)
    return PERSONS_SCHEMA.empty_table() if t is None else t


def _rejected(claims: pa.Table, bad: np.ndarray) -> pa.Table:
    """The rows `bad` with their region blanked: the engine rejects them (every amount 0, no
    accumulator touched) and they still take their claim id, as a rejected claim does."""
    i = claims.schema.get_field_index("region")
    return claims.set_column(i, "region", pc.if_else(pa.array(bad), pa.scalar(None, pa.string()),
                                                      claims.column("region")))


#: The engine's statuses that come before DUPLICATE_CLAIM (spec 7): a later row of a repeated
#: claim id that fails one of these is reported with it, as one call over the year would.
BEFORE_DUPLICATE = ("MISSING_FIELD", "INVALID_VALUE", "INVALID_AMOUNT", "AMOUNT_MISMATCH", "UNKNOWN_POLICY",
                    "UNKNOWN_IDENTITY")


def duplicate_statuses(rows: pa.Table, policies: CompiledPolicies) -> pa.Array:
    """The status one call over the year gives later rows of claim ids first seen in another
    bucket: their own row-check error if they have one (spec 7 precedence), else DUPLICATE_CLAIM.

    The rows are settled on their own to learn their checks' verdict; that call's payments
    and accumulators are discarded (a duplicate pays nothing and changes none)."""
    status = settle(rows.select(CLAIMS_SCHEMA.names), policies).results.column("status")
    over = np.zeros(rows.num_rows, dtype=bool)  # AMOUNT_OUT_OF_RANGE of the row itself, not of a total
    for name in AMOUNT_COLUMNS:
        over |= np.asarray(pc.fill_null(pc.greater(rows.column(name), MAX_AMOUNT), False)
                           .to_numpy(zero_copy_only=False), dtype=bool)
    keep = pc.or_(pc.is_in(status, pa.array(BEFORE_DUPLICATE)),
                  pc.and_(pc.equal(status, "AMOUNT_OUT_OF_RANGE"), pa.array(over)))
    return pc.if_else(keep, status, DUPLICATE)


def settle_bucket(claims: pa.Table, persons: Optional[pa.Table], policies: CompiledPolicies,
                  forced: Optional[np.ndarray] = None) -> pa.Table:
    """One bucket's claims (input order) re-settled: a CLEARED_SCHEMA table in the same order.

    With `persons`, the registry's basis is applied first (engine.registry.as_of); a claim
    that cannot have one (person unknown, date before birth) is settled as an error row,
    then reported with clearing's status for it. `forced` are the ords of later rows of a
    claim id whose first row is in another bucket: settled as error rows too, and reported
    with the status one call over the year gives them (`duplicate_statuses`)."""
    override = np.zeros(claims.num_rows, dtype=np.int8)  # 0: the engine's status
    if forced is not None and len(forced):
        override[np.isin(claims.column("ord").to_numpy(), forced)] = 3
    if persons is not None:
        basis = as_of(claims, persons)
        claims = basis.claims
        override[basis.basis_status == BASIS_UNKNOWN_PERSON] = 1  # the registry's verdict first
        override[basis.basis_status == BASIS_BEFORE_BIRTH] = 2
    region = claims.column("region")
    duplicates = np.flatnonzero(override == 3)
    if len(duplicates):
        dup_status = duplicate_statuses(claims.take(pa.array(duplicates)), policies)
    if override.any():
        claims = _rejected(claims, override != 0)
    # a Settler's one chunk, not engine.settle: the closing accumulators it would also build
    # (0.1 s per million claims) are not needed here
    results = pa.Table.from_batches([Settler(policies, expected_claims=claims.num_rows)
                                     .settle_batch(claims.select(CLAIMS_SCHEMA.names))])
    status = results.column("status")
    if override.any():
        names = np.array(["", UNKNOWN_PERSON, BEFORE_BIRTH, ""], dtype=object)
        if len(duplicates):
            names = np.concatenate([names, dup_status.to_numpy(zero_copy_only=False)])
            pick = override.astype(np.int64)
            pick[duplicates] = 4 + np.arange(len(duplicates))
        else:
            pick = override
        status = pc.if_else(pa.array(override != 0), pa.array(names[pick], pa.string()), status)
    compliant = pc.add(results.column("compliant_personal_pay"), results.column("fund_pay_total"))
    cols = {
        "ord": claims.column("ord"),
        **{n: claims.column(n) for n in ("claim_id", "person_id", "region", "scheme", "settle_time", "visit_type",
                                         "facility_level", "locality", "facility_id", "total_amount",
                                         "in_scope_amount")},
        "status": status,
        "compliant_amount": compliant,
        **{n: results.column(n) for n in CLEARED_SCHEMA.names
           if n in results.column_names and n not in ("claim_id", "status")},
    }
    if len(duplicates):  # a duplicate keeps its region in the results
        cols["region"] = pc.if_else(pa.array(override == 3), region, cols["region"])
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in CLEARED_SCHEMA], schema=CLEARED_SCHEMA)


class BucketWork:
    """What settling one bucket needs, shared by the workers (each with its own DuckDB cursor)."""

    def __init__(self, part: Partition, outputs: Outputs, policies: CompiledPolicies, use_registry: bool,
                 year: int, db: duckdb.DuckDBPyConnection):
        self.part = part
        self.outputs = outputs
        self.policies = policies
        self.use_registry = use_registry
        self.year = year
        self.db = db
        self.forced = read_forced(part)
        self.local = threading.local()
        self.seconds = {"read": 0.0, "settle": 0.0, "write": 0.0, "reconcile": 0.0, "accounts": 0.0}
        self.lock = threading.Lock()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        con = getattr(self.local, "con", None)
        if con is None:
            con = self.local.con = self.db.cursor()
        return con

    def _time(self, step: str, t0: float) -> float:
        t = time.perf_counter()
        with self.lock:
            self.seconds[step] += t - t0
        return t

    def run(self, b: int) -> None:
        o = self.outputs
        t = time.perf_counter()
        claims = read_bucket_claims(self.part, b)
        persons = read_bucket_registry(self.part, b) if self.use_registry else None
        ledger = read_bucket(self.part.folder, "ledger", b) if self.part.has_ledger else None
        if ledger is None:
            ledger = BUCKET_LEDGER_SCHEMA.empty_table()
        t = self._time("read", t)
        cleared = settle_bucket(claims, persons, self.policies, self.forced.get(b))
        del claims, persons
        t = self._time("settle", t)
        write_parquet(o.results(b), cleared, CLEARED_SCHEMA)
        t = self._time("write", t)
        con = self.cursor()
        con.register("cleared", cleared)
        recon = None
        if self.part.has_ledger:
            ledger_paid(con, ledger, self.year)
            recon = reconcile_bucket(con, o.part("reconciliation/claims.parquet", b),
                                     o.part("reconciliation/persons.parquet", b))
        else:
            empty_ledger_paid(con)
        t = self._time("reconcile", t)
        acc = bucket_accounts(con, cleared, o.part("accounts/persons.parquet", b))
        con.unregister("cleared")
        con.execute("DROP TABLE IF EXISTS ledger_paid")
        save_done(o.done(b), acc, recon)
        self._time("accounts", t)


def save_done(folder: Path, acc: dict, recon: Optional[dict]) -> None:
    """A bucket's partial accounts and figures, in a folder renamed into place when complete."""
    tmp = folder.with_name("." + folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, table in acc["partial"].items():
        with pa.ipc.new_file(str(tmp / f"{name}.arrow"), table.schema) as w:
            w.write_table(table)
    (tmp / "figures.json").write_text(json.dumps({"statuses": acc["statuses"], "totals": acc["totals"],
                                                  "person_rows": acc["person_rows"], "reconciliation": recon}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_done(folder: Path) -> dict:
    figures = json.loads((folder / "figures.json").read_text())
    partial = {}
    for name in PARTIALS:
        with pa.memory_map(str(folder / f"{name}.arrow")) as source:
            partial[name] = pa.ipc.open_file(source).read_all()
    return {"partial": partial, **figures}


def resettle(part: Partition, outputs: Outputs, policies: CompiledPolicies, use_registry: bool, year: int,
             db: duckdb.DuckDBPyConnection, resume: bool, stream=None,
             after_bucket: Optional[Callable[[int], None]] = None) -> tuple[dict, list[dict]]:
    """Settle, reconcile and account every bucket not yet done; returns ({"settled": n,
    "skipped": n, "seconds": {step: worker seconds}}, every bucket's figures).

    `after_bucket(b)` is called (on the calling thread) once bucket b is done."""
    done = [b for b in range(part.buckets) if resume and outputs.done(b).exists()]
    todo = [b for b in range(part.buckets) if b not in set(done)]
    folders = [outputs.out / t for t in ("results", "reconciliation", "accounts")] + [outputs.work / "buckets"]
    for folder in folders:
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.exists():  # what a killed run was writing (engine.files' hidden temporaries)
            for leftover in folder.rglob(".*.tmp"):
                (shutil.rmtree if leftover.is_dir() else Path.unlink)(leftover)
    work = BucketWork(part, outputs, policies, use_registry, year, db)
    with PhaseProgress("settle", part.buckets, stream) as bar, \
            ThreadPoolExecutor(WORKERS, thread_name_prefix="medsettle-clear") as pool:
        bar.advance(len(done))
        # at most WORKERS buckets in flight: bounded memory, and `after_bucket` in bucket order
        futures = {}
        for i, b in enumerate(todo):
            futures[b] = pool.submit(work.run, b)
            if i + 1 >= WORKERS:
                first = todo[i + 1 - WORKERS]
                _finish(futures.pop(first), first, bar, after_bucket)
        for b in list(futures):
            _finish(futures.pop(b), b, bar, after_bucket)
    figures = [load_done(outputs.done(b)) for b in range(part.buckets)]
    return {"settled": len(todo), "skipped": len(done),
            "seconds": {k: round(v, 3) for k, v in work.seconds.items()}}, figures


def _finish(future, b: int, bar: PhaseProgress, after_bucket) -> None:
    future.result()
    bar.advance()
    if after_bucket is not None:
        after_bucket(b)
