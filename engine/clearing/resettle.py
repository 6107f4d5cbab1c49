"""Phase 2: each bucket settled as one call, its result written whole; done buckets are skipped.

Keys are independent (spec 4), so a call per bucket of persons gives the results of
one call over the year. A bucket's claims are put back in input order, given the
registry's basis as of each claim's date (unless the claims' own columns are to be
used), settled with `engine.settle`, and written to results/bucket-NNNNN.parquet
under a temporary name renamed when complete: the file's presence is the bucket's
"done" mark, so `--resume` continues with the buckets that have none.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..compile import CompiledPolicies
from ..registry import BASIS_BEFORE_BIRTH, BASIS_UNKNOWN_PERSON, as_of
from ..schema import CLAIMS_SCHEMA, PERSONS_SCHEMA
from ..settle import settle
from .files import write_parquet
from .partition import Partition, read_bucket
from .progress import PhaseProgress
from .schema import BEFORE_BIRTH, CLEARED_SCHEMA, UNKNOWN_PERSON


def result_path(out: Path, bucket: int) -> Path:
    return out / "results" / f"bucket-{bucket:05d}.parquet"


def read_bucket_claims(part: Partition, bucket: int) -> pa.Table:
    """The bucket's claims, CLAIMS_SCHEMA columns plus facility_id and ord: the rows of
    repeated claim ids last, in input order (so each id's first row comes first, as in
    one call over the year), the others as they come (their results do not depend on it)."""
    t = read_bucket(part.folder, "claims", bucket)
    if t is None:
        schema = CLAIMS_SCHEMA.append(pa.field("facility_id", pa.string())).append(pa.field("ord", pa.int64()))
        return schema.empty_table()
    repeated = np.asarray(t.column("repeated").to_numpy(zero_copy_only=False), dtype=bool)
    if repeated.any():
        rep = np.flatnonzero(repeated)
        ords = np.asarray(t.column("ord").take(pa.array(rep)).to_numpy(), dtype=np.int64)
        t = t.take(pa.array(np.concatenate([np.flatnonzero(~repeated), rep[np.argsort(ords, kind="stable")]])))
    cols = [t.column(f.name).cast(f.type) for f in CLAIMS_SCHEMA]
    cols += [t.column("facility_id").cast(pa.string()), t.column("ord").cast(pa.int64())]
    names = [*CLAIMS_SCHEMA.names, "facility_id", "ord"]
    return pa.Table.from_arrays(cols, names=names)


def read_bucket_registry(part: Partition, bucket: int) -> pa.Table:
    t = read_bucket(part.folder, "registry", bucket)
    if t is None:
        return PERSONS_SCHEMA.empty_table()
    return t.select(PERSONS_SCHEMA.names).cast(PERSONS_SCHEMA)


def settle_bucket(claims: pa.Table, persons: Optional[pa.Table], policies: CompiledPolicies) -> pa.Table:
    """One bucket's claims (input order) re-settled: a CLEARED_SCHEMA table in the same order.

    With `persons`, the registry's basis is applied first (engine.registry.as_of); a claim
    that cannot have one (person unknown, date before birth) is settled as an error row
    (its region blanked, so the engine rejects it and it still takes its claim id, as a
    rejected claim does), then reported with clearing's status for it."""
    override = None
    if persons is not None:
        basis = as_of(claims, persons)
        claims = basis.claims
        bad = basis.basis_status != 0
        if bad.any():
            override = np.where(basis.basis_status == BASIS_UNKNOWN_PERSON, UNKNOWN_PERSON,
                                np.where(basis.basis_status == BASIS_BEFORE_BIRTH, BEFORE_BIRTH, ""))
            i = claims.schema.get_field_index("region")
            claims = claims.set_column(i, "region", pc.if_else(pa.array(bad), pa.scalar(None, pa.string()),
                                                              claims.column("region")))
    results = settle(claims.select(CLAIMS_SCHEMA.names), policies).results
    status = results.column("status")
    if override is not None:
        status = pc.if_else(pa.array(override != ""), pa.array(override), status)
    ok_fund = results.column("fund_pay_total")
    compliant = pc.add(results.column("compliant_personal_pay"), ok_fund)
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
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in CLEARED_SCHEMA], schema=CLEARED_SCHEMA)


def resettle(part: Partition, out: Path, policies: CompiledPolicies, use_registry: bool, resume: bool,
             stream=None, after_bucket: Optional[Callable[[int], None]] = None) -> dict:
    """Settle every bucket not yet done; returns {"settled": n, "skipped": n}.

    Three buckets are in flight: the next one read on a helper thread, this one settled
    (the kernel releases the GIL), the previous one written on the other helper thread.
    `after_bucket(b)` is called once bucket b's file is in place."""
    todo = [b for b in range(part.buckets) if not (resume and result_path(out, b).exists())]
    skipped = part.buckets - len(todo)

    def load(b: int):
        return read_bucket_claims(part, b), (read_bucket_registry(part, b) if use_registry else None)

    with PhaseProgress("settle", part.buckets, stream) as bar, \
            ThreadPoolExecutor(2, thread_name_prefix="medsettle-clear") as pool:
        bar.advance(skipped)
        loading = pool.submit(load, todo[0]) if todo else None
        writing: Optional[tuple[int, Future]] = None
        for i, b in enumerate(todo):
            claims, persons = loading.result()
            loading = pool.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            table = settle_bucket(claims, persons, policies)
            del claims, persons
            if writing is not None:
                _written(writing, bar, after_bucket)
            writing = (b, pool.submit(write_parquet, result_path(out, b), table, CLEARED_SCHEMA))
            del table
        if writing is not None:
            _written(writing, bar, after_bucket)
    return {"settled": len(todo), "skipped": skipped}


def _written(writing: tuple, bar: PhaseProgress, after_bucket) -> None:
    b, future = writing
    future.result()
    bar.advance()
    if after_bucket is not None:
        after_bucket(b)
