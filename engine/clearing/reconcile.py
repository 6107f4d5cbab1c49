"""Phase 3: reconciliation (补差) of the year's re-settlement with what the counter paid.

The ledger (LEDGER_SCHEMA, `medsettle ledger export`) holds `settle` and `reverse`
rows in commit order. A claim's standing at the counter is its last entry by `seq`:
a `settle` row is what was paid; a claim whose last entry is a `reverse` row was
paid nothing (reversed claims are left out: one missing from the year's data too
does not appear at all). Only settle rows dated in the cleared year count.

Per claim and fund the difference is what the year's rules pay minus what was
paid, exact to the fen: > 0 is owed (to the patient's side), < 0 is to recover.
`match` says where the claim is: `both`, `year_only` (in the year's data, not paid
at the counter) or `ledger_only` (paid at the counter, missing from the year's
data: the whole payment is to recover). Rows of the year that are later
duplicates of a claim id, and year rows not `ok` that the counter never paid,
have nothing to reconcile.
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from ..schema import FUND_COLUMNS, LEDGER_SCHEMA
from .partition import ClearingError
from .schema import RECONCILIATION_PERSONS_SCHEMA, RECONCILIATION_SCHEMA
from .sql import file_list, quote, rows, write_query

#: The ledger columns reconciliation reads; facility_id is optional.
LEDGER_COLUMNS = ("seq", "kind", "claim_id", "person_id", "region", "scheme", "settle_time", *FUND_COLUMNS,
                  "personal_pay")

_FUNDS = [c[:-4] for c in FUND_COLUMNS]


def check_ledger(files: list[Path]) -> bool:
    """Every file has the columns reconciliation reads with LEDGER_SCHEMA's types; returns
    whether all have facility_id."""
    facility = True
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            raise ClearingError(f"{f}: not a readable Parquet file ({e})") from None
        for name in LEDGER_COLUMNS:
            i = schema.get_field_index(name)
            want = LEDGER_SCHEMA.field(name).type
            if i < 0:
                raise ClearingError(f"{f}: ledger column '{name}' is missing (expected {want}); "
                                    f"the ledger is `medsettle ledger export`'s schema (docs/CLEARING.md)")
            got = schema.field(i).type
            if not (got.equals(want) or (pa_string(want) and pa_string(got))):
                raise ClearingError(f"{f}: ledger column '{name}' has type {got}; expected {want}")
        if schema.get_field_index("facility_id") < 0:
            facility = False
    return facility


def pa_string(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))


def register_ledger(con: duckdb.DuckDBPyConnection, files: list[Path], year: int) -> None:
    """View `ledger_paid`: per claim id of the year, its last settle row and whether it was reversed."""
    has_facility = check_ledger(files)
    facility = "facility_id::VARCHAR" if has_facility else "NULL::VARCHAR"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE ledger_paid AS
        WITH l AS (SELECT seq, kind, claim_id, person_id, region, scheme, settle_time, {facility} AS facility_id,
                          {", ".join(FUND_COLUMNS)}, personal_pay
                   FROM read_parquet({file_list(files)}, union_by_name = true) WHERE claim_id IS NOT NULL),
             last AS (SELECT claim_id, arg_max(kind, seq) AS last_kind FROM l GROUP BY claim_id),
             settled AS (SELECT * FROM l WHERE kind = 'settle'
                         QUALIFY row_number() OVER (PARTITION BY claim_id ORDER BY seq DESC) = 1)
        SELECT s.* EXCLUDE (seq, kind), last.last_kind = 'reverse' AS reversed
        FROM settled s JOIN last USING (claim_id)
        WHERE year(s.settle_time) = {int(year)}""")


def reconcile(con: duckdb.DuckDBPyConnection, out: Path, view: str = "cleared") -> dict:
    """Write reconciliation/claims.parquet and persons.parquet; returns the summary figures."""
    paid = lambda f: f"CASE WHEN l.reversed THEN 0 ELSE coalesce(l.{f}_pay, 0) END"  # noqa: E731
    # views, not tables: a temporary table of every claim of the year would spill to disk
    con.execute(f"""CREATE OR REPLACE TEMP VIEW recon AS
        SELECT coalesce(c.claim_id, l.claim_id) AS claim_id, coalesce(c.person_id, l.person_id) AS person_id,
               coalesce(c.region, l.region) AS region, coalesce(c.scheme, l.scheme) AS scheme,
               coalesce(c.settle_time, l.settle_time) AS settle_time,
               coalesce(c.facility_id, l.facility_id) AS facility_id,
               CASE WHEN c.claim_id IS NULL THEN 'ledger_only'
                    WHEN l.claim_id IS NULL OR l.reversed THEN 'year_only' ELSE 'both' END AS match,
               c.status AS year_status, coalesce(l.reversed, false) AS reversed_at_counter,
               {", ".join(f"coalesce(c.{f}_pay, 0) AS year_{f}_pay" for f in _FUNDS)},
               {", ".join(f"{paid(f)} AS paid_{f}_pay" for f in _FUNDS)},
               coalesce(c.personal_pay, 0) - CASE WHEN l.reversed THEN 0 ELSE coalesce(l.personal_pay, 0) END
                   AS diff_personal_pay
        FROM (SELECT * FROM {view} WHERE claim_id IS NOT NULL AND status <> 'DUPLICATE_CLAIM') c
        FULL OUTER JOIN ledger_paid l ON c.claim_id = l.claim_id
        WHERE (l.claim_id IS NOT NULL AND NOT l.reversed) OR c.status = 'ok'""")
    diff_cols = ", ".join(f"year_{f}_pay - paid_{f}_pay AS diff_{f}_pay" for f in _FUNDS)
    diff_total = " + ".join(f"(year_{f}_pay - paid_{f}_pay)" for f in _FUNDS)
    con.execute(f"""CREATE OR REPLACE TEMP VIEW recon_diff AS
        SELECT *, {diff_cols}, {diff_total} AS diff_total FROM recon""")
    action = "(match <> 'both' OR diff_total <> 0 OR " + " OR ".join(f"diff_{f}_pay <> 0" for f in _FUNDS) + \
        " OR diff_personal_pay <> 0)"
    rec = out / "reconciliation"
    # in no particular order: a sort of every claim needing action (most of a year whose
    # ledger covers little of it) costs more than the join
    n_claims = write_query(con, f"SELECT * FROM recon_diff WHERE {action}",
                           rec / "claims.parquet", RECONCILIATION_SCHEMA)
    con.execute(f"CREATE OR REPLACE TEMP VIEW recon_claims AS SELECT * FROM read_parquet({quote(rec / 'claims.parquet')})")
    # the persons' totals and the summary from the written claims needing action (a fraction
    # of the year), and one semi-join count for the claims matched exactly
    n_persons = write_query(con, f"""
        SELECT person_id, region, scheme, count(*)::BIGINT AS claims,
               {", ".join(f"sum(diff_{f}_pay)::BIGINT AS diff_{f}_pay" for f in _FUNDS)},
               sum(diff_total)::BIGINT AS diff_total, sum(diff_personal_pay)::BIGINT AS diff_personal_pay
        FROM recon_claims GROUP BY ALL""",
                            rec / "persons.parquet", RECONCILIATION_PERSONS_SCHEMA)
    both = rows(con, f"""SELECT count(*) AS n FROM ledger_paid l WHERE NOT l.reversed AND l.claim_id IN
        (SELECT claim_id FROM {view} WHERE claim_id IS NOT NULL AND status <> 'DUPLICATE_CLAIM')""")[0]["n"]
    summary = rows(con, f"""
        SELECT {int(both)} - count(*) FILTER (WHERE match = 'both') AS matched_exactly,
               count(*) FILTER (WHERE match = 'both') AS matched_with_difference,
               count(*) FILTER (WHERE match = 'year_only') AS year_only,
               count(*) FILTER (WHERE match = 'ledger_only') AS ledger_only,
               count(*) FILTER (WHERE reversed_at_counter) AS reversed_at_counter,
               coalesce(sum(diff_total) FILTER (WHERE diff_total > 0), 0) AS owed,
               coalesce(-sum(diff_total) FILTER (WHERE diff_total < 0), 0) AS to_recover,
               {", ".join(f"coalesce(sum(diff_{f}_pay), 0) AS diff_{f}_pay" for f in _FUNDS)}
        FROM recon_claims""")[0]
    reversed_left_out = rows(con, "SELECT count(*) AS n FROM ledger_paid l WHERE reversed AND NOT EXISTS "
                                  f"(SELECT 1 FROM {view} c WHERE c.claim_id = l.claim_id)")[0]["n"]
    con.execute(f"CREATE OR REPLACE TEMP VIEW recon_persons AS SELECT * FROM read_parquet({quote(rec / 'persons.parquet')})")
    out_summary = {k: int(v) for k, v in summary.items()}
    out_summary.update(reversed_left_out=int(reversed_left_out), claim_rows=n_claims, person_rows=n_persons)
    return out_summary
