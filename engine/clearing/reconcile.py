"""Reconciliation (补差) of the year's re-settlement with what the counter paid, bucket by bucket.

The ledger (LEDGER_SCHEMA, `medsettle ledger export`) holds `settle` and `reverse`
rows in commit order. A claim's standing at the counter is its last entry by `seq`:
a `settle` row is what was paid; a claim whose last entry is a `reverse` row was
paid nothing (reversed claims are left out: one missing from the year's data too
does not appear at all). Only settle rows dated in the cleared year count.

A claim is matched by claim id and person: the ledger is split by person like the
claims, so a bucket holds both sides of each of its persons' claims and is
reconciled alone. A claim id the counter settled for one person and the year's data
holds for another is reported on both sides (`ledger_only` for the counter's person,
`year_only` for the year's): each person's record is corrected, which is what the
office must do (docs/CLEARING.md).

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
from typing import Optional

import duckdb
import pyarrow as pa

from ..schema import FUND_COLUMNS
from .files import write_parquet
from .schema import RECONCILIATION_PERSONS_SCHEMA, RECONCILIATION_SCHEMA
from .sql import rows

_FUNDS = [c[:-4] for c in FUND_COLUMNS]

#: The figures of a reconciliation, summed over buckets.
SUMMARY_KEYS = ("matched_exactly", "matched_with_difference", "year_only", "ledger_only", "reversed_at_counter",
                "owed", "to_recover", *(f"diff_{f}_pay" for f in _FUNDS), "reversed_left_out", "claim_rows",
                "person_rows")


def ledger_paid(con: duckdb.DuckDBPyConnection, ledger: pa.Table, year: int) -> None:
    """Table `ledger_paid` of a bucket's ledger rows: per claim of the year, its last
    settle row and whether the claim's last entry reversed it."""
    con.register("ledger_rows", ledger)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE ledger_paid AS
        WITH l AS (SELECT * FROM ledger_rows WHERE claim_id IS NOT NULL),
             last AS (SELECT claim_id, person_id, arg_max(kind, seq) AS last_kind FROM l GROUP BY ALL),
             settled AS (SELECT * FROM l WHERE kind = 'settle'
                         QUALIFY row_number() OVER (PARTITION BY claim_id, person_id ORDER BY seq DESC) = 1)
        SELECT s.* EXCLUDE (seq, kind), last.last_kind = 'reverse' AS reversed
        FROM settled s JOIN last ON s.claim_id = last.claim_id AND s.person_id IS NOT DISTINCT FROM last.person_id
        WHERE year(s.settle_time) = {int(year)}""")
    con.unregister("ledger_rows")


def reconcile_bucket(con: duckdb.DuckDBPyConnection, claims_path: Path, persons_path: Path) -> dict:
    """Reconcile view `cleared` (a bucket's CLEARED_SCHEMA rows) with table `ledger_paid`:
    write the bucket's claims needing action and its persons' totals; return its figures."""
    paid = lambda f: f"CASE WHEN l.reversed THEN 0 ELSE coalesce(l.{f}_pay, 0) END"  # noqa: E731
    diff_cols = ", ".join(f"year_{f}_pay - paid_{f}_pay AS diff_{f}_pay" for f in _FUNDS)
    diff_total = " + ".join(f"(year_{f}_pay - paid_{f}_pay)" for f in _FUNDS)
    action = "(match <> 'both' OR diff_total <> 0 OR " + " OR ".join(f"diff_{f}_pay <> 0" for f in _FUNDS) + \
        " OR diff_personal_pay <> 0)"
    # one query, only the rows needing action materialized (strings are the cost of a copy)
    action_rows = con.sql(f"""
        WITH year_rows AS (SELECT * FROM cleared WHERE claim_id IS NOT NULL AND status <> 'DUPLICATE_CLAIM'),
        r AS (
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
        FROM year_rows c FULL OUTER JOIN ledger_paid l ON c.claim_id = l.claim_id AND c.person_id = l.person_id
        WHERE (l.claim_id IS NOT NULL AND NOT l.reversed) OR c.status = 'ok')
        SELECT * FROM (SELECT *, {diff_cols}, {diff_total} AS diff_total FROM r) WHERE {action}""").to_arrow_table()
    # claims paid at the counter and in the year's data (the rest of `both` matched exactly)
    both = rows(con, """SELECT count(*) AS n FROM ledger_paid l JOIN cleared c
                        ON c.claim_id = l.claim_id AND c.person_id = l.person_id
                        WHERE NOT l.reversed AND c.status <> 'DUPLICATE_CLAIM'""")[0]["n"]
    con.register("recon_claims", action_rows)
    n_claims = write_parquet(claims_path, action_rows, RECONCILIATION_SCHEMA)
    persons = con.sql(f"""
        SELECT person_id, region, scheme, count(*)::BIGINT AS claims,
               {", ".join(f"sum(diff_{f}_pay)::BIGINT AS diff_{f}_pay" for f in _FUNDS)},
               sum(diff_total)::BIGINT AS diff_total, sum(diff_personal_pay)::BIGINT AS diff_personal_pay
        FROM recon_claims GROUP BY ALL""").to_arrow_table()
    n_persons = write_parquet(persons_path, persons, RECONCILIATION_PERSONS_SCHEMA)
    figures = rows(con, f"""
        SELECT {int(both)} - count(*) FILTER (WHERE match = 'both') AS matched_exactly,
               count(*) FILTER (WHERE match = 'both') AS matched_with_difference,
               count(*) FILTER (WHERE match = 'year_only') AS year_only,
               count(*) FILTER (WHERE match = 'ledger_only') AS ledger_only,
               count(*) FILTER (WHERE reversed_at_counter) AS reversed_at_counter,
               coalesce(sum(diff_total) FILTER (WHERE diff_total > 0), 0) AS owed,
               coalesce(-sum(diff_total) FILTER (WHERE diff_total < 0), 0) AS to_recover,
               {", ".join(f"coalesce(sum(diff_{f}_pay), 0) AS diff_{f}_pay" for f in _FUNDS)},
               (SELECT count(*) FROM ledger_paid l WHERE l.reversed AND NOT EXISTS
                  (SELECT 1 FROM cleared c WHERE c.claim_id = l.claim_id AND c.person_id = l.person_id))
                 AS reversed_left_out
        FROM recon_claims""")[0]
    con.unregister("recon_claims")
    out = {k: int(v) for k, v in figures.items()}
    out.update(claim_rows=n_claims, person_rows=n_persons)
    return out


def combine(parts: list[Optional[dict]]) -> Optional[dict]:
    """The year's reconciliation figures: the sum of its buckets'."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {k: sum(p[k] for p in parts) for k in SUMMARY_KEYS}
