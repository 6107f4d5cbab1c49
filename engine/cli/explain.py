"""`medsettle explain`: how one claim of a file was settled, layer by layer, in the office's words."""
from __future__ import annotations

import argparse
import datetime as dt
import json

import pyarrow as pa
import pyarrow.compute as pc

from ..explain import explain, format_explanation
from ..files import DEFAULT_BATCH, CliError, ClaimsFile
from ..settle import settle
from . import common


def register(sub) -> None:
    e = sub.add_parser("explain", help="explain one claim's settlement",
                       description="Explain, layer by layer, how one claim of a file is settled.")
    e.add_argument("claims", metavar="CLAIMS")
    e.add_argument("--claim-id", required=True, metavar="ID")
    e.add_argument("--policies", metavar="DIR", help=common.POLICIES_HELP)
    e.add_argument("--accumulators-in", metavar="A")
    e.add_argument("--format", choices=("text", "json"), default="text",
                   help="text for people (default), json for programs (amounts in integer fen)")
    e.add_argument("--batch-size", type=common.positive_int, default=DEFAULT_BATCH, metavar="N",
                   help=argparse.SUPPRESS)
    e.set_defaults(func=run)


def rows_for_claim(claims: ClaimsFile, claim_id: str) -> pa.Table:
    """The rows that can affect `claim_id`'s settlement, in file order: every row of its
    person (its accumulator keys) and every row sharing a claim id with them (duplicates)."""
    person = None
    for b in claims.batches(["claim_id", "person_id"]):
        hit = pc.equal(b.column(0), claim_id).fill_null(False)
        if pc.any(hit).as_py():
            person = b.column(1).filter(hit)[0].as_py()
            break
    else:
        raise CliError(f"{claims.path}: claim_id {claim_id!r} not found")
    if person is None:  # its person_id is null: settle it among rows sharing its id only
        ids = pa.array([claim_id])
    else:
        id_parts = []
        for b in claims.batches(["claim_id", "person_id"]):
            mine = pc.equal(b.column(1), person).fill_null(False)
            id_parts.append(b.column(0).filter(mine).drop_null())
        ids = pc.unique(pa.chunked_array(id_parts, pa.string()).combine_chunks())
    keep, rows = [], []
    start = 0
    for b in claims.batches():
        m = pc.is_in(b.column("claim_id"), value_set=ids).fill_null(False)
        if person is not None:
            m = pc.or_(m, pc.equal(b.column("person_id"), person).fill_null(False))
        if pc.any(m).as_py():
            keep.append(b.filter(m))
            rows.append(pc.add(pc.indices_nonzero(m).cast(pa.int64()), start))
        start += b.num_rows
    table = pa.Table.from_batches(keep, schema=claims.schema)
    # The file's row numbers (from 1) of the rows kept, so a duplicate can name its first row.
    numbers = pc.add(pa.chunked_array(rows, pa.int64()), 1) if rows else pa.array([], pa.int64())
    return table.append_column("_row", numbers)


def _iso(value):
    """settle_time (and any date) in JSON: ISO 8601, local wall time as in the claims."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def run(args) -> int:
    ps = common.policies(args.policies)
    acc_in = common.accumulators(args.accumulators_in)
    claims = ClaimsFile(args.claims, args.batch_size)
    settle(claims.schema.empty_table(), ps)
    table = rows_for_claim(claims, args.claim_id)
    row_numbers = table.column("_row").to_pylist()
    try:
        ex = explain(table.drop_columns(["_row"]), ps, args.claim_id, acc_in, row_numbers=row_numbers)
    except KeyError as e:
        raise CliError(str(e.args[0] if e.args else e)) from None
    if args.format == "json":
        print(json.dumps(ex, indent=2, ensure_ascii=False, default=_iso), flush=True)
    else:
        print(format_explanation(ex), flush=True)
    return 0
