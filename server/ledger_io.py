"""The ledger out and accumulators in, as Arrow/Parquet.

`export_ledger(store, path, year)` writes every settlement and reversal of the
store (engine.schema.LEDGER_SCHEMA, one row per ledger entry in seq order),
page by page (bounded memory), to a temporary file in the target folder that
is renamed into place once complete: a failed export leaves nothing.

`import_accumulators(store, path)` loads a carry table (the accumulators
Parquet of `medsettle settle --accumulators-out`, engine.schema.ACCUMULATORS_SCHEMA,
spec section 4) as the carried-in accumulators of its keys, in one
transaction, refused whole when any key already has settlements or carried
accumulators.
"""
from __future__ import annotations

import datetime as dt
import os
import tempfile
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from engine.schema import ACCUMULATORS_SCHEMA, AMOUNT_COLUMNS, LEDGER_SCHEMA, RESULT_AMOUNT_COLUMNS

from ._proto import settlement_pb2 as pb
from .core import LEVEL, LOCALITY, VISIT
from .registry import SCHEME_TO_PB
from .store import AccumulatorRow, LedgerEntry, Store

EPOCH = dt.datetime(1970, 1, 1)
UTC_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
#: Rows per Parquet row group / per store page of the export.
EXPORT_BATCH = 10_000
#: Carry-table rows per insert batch of the import.
IMPORT_BATCH = 20_000


def _layers(layers) -> list:
    return [{"layer": e.layer, "cap_group": e.cap_group or None, "position": e.position, "paid": e.paid,
             "deductible_charged": e.deductible_charged} for e in layers]


def ledger_row(e: LedgerEntry) -> dict:
    """One ledger entry as a LEDGER_SCHEMA row."""
    delta = pb.AccumulatorDelta.FromString(e.delta)
    row = {"seq": e.seq, "kind": e.kind, "recorded_at": UTC_EPOCH + dt.timedelta(microseconds=e.recorded_at_us),
           "facility_id": e.facility_id, "claim_id": e.claim_id, "person_id": e.person_id, "region": e.region,
           "scheme": e.scheme, "delta_admissions": e.delta_admissions,
           "delta_compliant_total": e.delta_compliant_total, "delta_layers": _layers(delta.layers),
           "reason": e.reason}
    if e.kind != "settle":
        return row
    c = pb.Claim.FromString(e.claim)
    resp = pb.SettleResponse.FromString(e.response)
    r, basis = resp.result, resp.basis
    row.update({
        "settle_time": EPOCH + dt.timedelta(microseconds=c.settle_time_us),
        "visit_type": VISIT.get(c.visit_type), "facility_level": LEVEL.get(c.facility_level),
        "locality": LOCALITY.get(c.locality), "referred": c.referred, "disease_code": c.disease_code or None,
        "age": basis.age, "identities": list(basis.identities) or None,
        **{name: getattr(c, name) for name in AMOUNT_COLUMNS},
        "status": r.status, "policy_id": r.policy_id or None, "identity": r.identity or None,
        **{name: getattr(r, name) for name in RESULT_AMOUNT_COLUMNS},
        "layer_pays": [{"layer": x.layer, "pay": x.pay} for x in r.layer_pays], "cap_hit": r.cap_hit,
    })
    return row


def ledger_batches(store: Store, year: Optional[int] = None, batch: int = EXPORT_BATCH) -> Iterator[pa.Table]:
    for part in store.iter_ledger(year=year, batch=batch):
        yield pa.Table.from_pylist([ledger_row(e) for e in part], schema=LEDGER_SCHEMA)


def write_whole(path: str, tables: Iterator[pa.Table], schema: pa.Schema) -> int:
    """Writes the tables to `path` through a temporary file in its folder, renamed into place
    when complete; on any failure the temporary file is removed and `path` is untouched.
    Returns the rows written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for t in tables:
                w.write_table(t)
                rows += t.num_rows
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return rows


def export_ledger(store: Store, path: str, year: Optional[int] = None) -> int:
    return write_whole(path, ledger_batches(store, year), LEDGER_SCHEMA)


# --------------------------------------------------------------------------- accumulators in


def _check_schema(schema: pa.Schema, path: str) -> None:
    for f in ACCUMULATORS_SCHEMA:
        if f.name not in schema.names:
            raise ValueError(f"{path}: column {f.name} is missing (a carry table has the columns of "
                             f"`medsettle settle --accumulators-out`: {', '.join(ACCUMULATORS_SCHEMA.names)})")


def carried_rows(path: str, batch: int = IMPORT_BATCH) -> Iterator[list]:
    """The carry table as lists of AccumulatorRow; ValueError naming file, row and column."""
    f = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps every row group read
    _check_schema(f.schema_arrow, path)
    base = 0
    for rb in f.iter_batches(batch_size=batch, columns=ACCUMULATORS_SCHEMA.names):
        t = pa.Table.from_batches([rb])
        t = pa.Table.from_arrays([t.column(n).cast(ACCUMULATORS_SCHEMA.field(n).type) for n in ACCUMULATORS_SCHEMA.names],
                                 schema=ACCUMULATORS_SCHEMA)
        out = []
        for k, r in enumerate(t.to_pylist()):
            where = f"{path}: row {base + k}"
            for name in ("person_id", "region", "scheme", "year"):
                if not r[name] and r[name] != 0:
                    raise ValueError(f"{where}: {name} is empty")
            if r["scheme"] not in SCHEME_TO_PB:
                raise ValueError(f"{where}: scheme {r['scheme']!r} is not one of {', '.join(SCHEME_TO_PB)}")
            for name in ("admissions", "compliant_total"):
                if r[name] is None or r[name] < 0:
                    raise ValueError(f"{where}: {name} {r[name]} is not a count >= 0")
            layers = []
            for e in r["layers"] or ():
                if not e["layer"]:
                    raise ValueError(f"{where}: a layers entry has no layer name")
                vals = [e["position"], e["paid"], e["deductible_charged"]]
                if any(v is None or v < 0 for v in vals):
                    raise ValueError(f"{where}: layer {e['layer']}: position, paid and deductible_charged "
                                     f"must be fen >= 0 (got {vals})")
                layers.append(pb.LayerAccumulator(layer=e["layer"], cap_group=e["cap_group"] or "", position=vals[0],
                                                  paid=vals[1], deductible_charged=vals[2]))
            state = pb.Accumulators(person_id=r["person_id"], region=r["region"], scheme=SCHEME_TO_PB[r["scheme"]],
                                    year=r["year"], admissions=r["admissions"], compliant_total=r["compliant_total"],
                                    layers=layers)
            out.append(AccumulatorRow(r["person_id"], r["region"], r["scheme"], r["year"], r["admissions"],
                                      r["compliant_total"], state.SerializeToString(), 0))
        base += t.num_rows
        yield out


def import_accumulators(store: Store, path: str) -> int:
    return store.import_carried(carried_rows(path))


__all__ = ["carried_rows", "export_ledger", "import_accumulators", "ledger_batches", "ledger_row",
           "write_whole"]
