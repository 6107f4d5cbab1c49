"""The year's accounts: per bucket in DuckDB over the bucket's results, then summed.

Per fund totals by region, scheme, policy, month, visit type, facility level and
identity; the critical-illness insurer's account (its layers' pays by region and
month); per facility totals; per person annual summary. Only claims settled `ok`
count; error rows pay nothing and are counted in the summary's statuses.

Why per bucket: a person's `ok` claims are all in the person's bucket, so the
person summary of a bucket is final and the other accounts are sums of the
buckets' (distinct persons included: buckets share no person). Each group-by fits
in memory; over the whole year at 100 M claims DuckDB's spilled to disk (accounts
177 s), and the results were read back once more for it.
"""
from __future__ import annotations

from pathlib import Path
import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from ..model import PolicySet
from ..schema import BP, FUND_COLUMNS
from .files import write_parquet
from .schema import (
    CRITICAL_ILLNESS_SCHEMA,
    FACILITIES_SCHEMA,
    FUND_TOTALS_SCHEMA,
    PERSONS_SUMMARY_SCHEMA,
)
from .sql import rows, source

#: The share of the in-scope amount the funds paid that the office's target asks for
#: (Shuozhou: low-income persons' in-scope amounts at least 80 % paid).
TARGET_BP = 8_000

_SUM_COLUMNS = ("total_amount", "compliant_amount", *FUND_COLUMNS, "fund_pay_total", "personal_pay",
                "compliant_personal_pay")
# persons are counted in accounts/persons.parquet, not per cell: a distinct count per cell
# costs four times the rest of the group-by (measured on 10M claims: 19.6 s against 3.8 s)
_SUMS = ", ".join(["count(*)::BIGINT AS claims", *[f"sum({c})::BIGINT AS {c}" for c in _SUM_COLUMNS]])
_RESUM = ", ".join(["sum(claims)::BIGINT AS claims", *[f"sum({c})::BIGINT AS {c}" for c in _SUM_COLUMNS]])

#: The accounts summed over buckets: name -> (schema, keys, the per-bucket query, the combining sums).
PARTIALS = {
    "fund_totals": (FUND_TOTALS_SCHEMA,
                    "region, scheme, policy_id, month, visit_type, facility_level, identity",
                    f"""SELECT region, scheme, policy_id, month(settle_time)::INTEGER AS month, visit_type,
                               facility_level, identity, {_SUMS}
                        FROM cleared WHERE status = 'ok' GROUP BY ALL""", _RESUM),
    "critical_illness": (CRITICAL_ILLNESS_SCHEMA, "region, scheme, month, layer", """
        SELECT c.region, c.scheme, month(c.settle_time)::INTEGER AS month, lp.layer,
               count(*)::BIGINT AS claims, count(DISTINCT c.person_id)::BIGINT AS persons,
               sum(lp.pay)::BIGINT AS paid
        FROM (SELECT region, scheme, settle_time, person_id, policy_id, unnest(layer_pays) AS lp
              FROM cleared WHERE status = 'ok') c
        JOIN policy_layers p ON p.policy_id = c.policy_id AND p.layer = c.lp.layer
        WHERE p.fund = 'critical_illness'
        GROUP BY ALL""", "sum(claims)::BIGINT AS claims, sum(persons)::BIGINT AS persons, "
                         "sum(paid)::BIGINT AS paid"),
    # the facility from the ledger where the claims had none
    "facilities": (FACILITIES_SCHEMA, "facility_id, region, facility_level", f"""
        SELECT facility_id, region, facility_level, {_SUMS}
        FROM (SELECT c.* REPLACE (coalesce(c.facility_id, l.facility_id) AS facility_id)
              FROM cleared c LEFT JOIN ledger_paid l ON c.claim_id = l.claim_id AND c.person_id = l.person_id
              WHERE c.status = 'ok')
        GROUP BY ALL""", _RESUM),
}

_PERSONS = f"""
    SELECT person_id, region, scheme,
           arg_max(identity, ord) FILTER (WHERE identity IS NOT NULL) AS identity,
           count(*)::BIGINT AS claims, sum(total_amount)::BIGINT AS total_amount,
           sum(in_scope_amount)::BIGINT AS in_scope_amount, sum(compliant_amount)::BIGINT AS compliant_amount,
           {", ".join(f"sum({c})::BIGINT AS {c}" for c in FUND_COLUMNS)},
           sum(fund_pay_total)::BIGINT AS fund_pay_total, sum(personal_pay)::BIGINT AS personal_pay,
           sum(compliant_personal_pay)::BIGINT AS compliant_personal_pay,
           {{bp_compliant}}::BIGINT AS compliant_paid_bp, {{bp_in_scope}}::BIGINT AS in_scope_paid_bp
    FROM cleared WHERE status = 'ok' GROUP BY person_id, region, scheme"""


def share_bp(num: str, den: str) -> str:
    """num / den in basis points, half up, integers only (null when den is 0)."""
    return f"CASE WHEN {den} > 0 THEN (({num}) * {BP} + ({den}) // 2) // ({den}) END"


PERSONS_SQL = _PERSONS.format(bp_compliant=share_bp("sum(fund_pay_total)", "sum(compliant_amount)"),
                              bp_in_scope=share_bp("sum(fund_pay_total)", "sum(in_scope_amount)"))


def register_layers(con: duckdb.DuckDBPyConnection, policies: PolicySet) -> None:
    """Table `policy_layers(policy_id, layer, fund)` of every policy version's layers."""
    table = pa.table({"policy_id": [p.id for p in policies.policies for _ in p.layers],
                      "layer": [l.name for p in policies.policies for l in p.layers],
                      "fund": [l.fund for p in policies.policies for l in p.layers]})
    con.register("policy_layers_arrow", table)
    con.execute("CREATE OR REPLACE TABLE policy_layers AS SELECT * FROM policy_layers_arrow")
    con.unregister("policy_layers_arrow")


def empty_ledger_paid(con: duckdb.DuckDBPyConnection) -> None:
    """`ledger_paid` with no rows, for a run without a ledger."""
    con.execute("""CREATE OR REPLACE TEMP TABLE ledger_paid AS
        SELECT NULL::VARCHAR AS claim_id, NULL::VARCHAR AS person_id, NULL::VARCHAR AS facility_id WHERE false""")


def bucket_accounts(con: duckdb.DuckDBPyConnection, cleared: pa.Table, persons_path: Path) -> dict:
    """A bucket's accounts from view `cleared` and table `ledger_paid`: writes its persons'
    annual summaries; returns its partial tables and figures."""
    partial = {name: con.sql(sql).to_arrow_table() for name, (_, _, sql, _) in PARTIALS.items()}
    persons = con.sql(PERSONS_SQL).to_arrow_table()
    write_parquet(persons_path, persons, PERSONS_SUMMARY_SCHEMA)
    # the statuses by Arrow's hash count, the totals from the fund totals' cells: two scans fewer
    counted = pc.value_counts(cleared.column("status"))
    statuses = {s.as_py(): int(n.as_py()) for s, n in zip(counted.field("values"), counted.field("counts"))}
    cells = partial["fund_totals"]
    totals = {"claims": int(pc.sum(cells.column("claims")).as_py() or 0),
              **{c: int(pc.sum(cells.column(c)).as_py() or 0) for c in _SUM_COLUMNS}}
    totals["persons"] = int(pc.count_distinct(persons.column("person_id")).as_py())
    return {"partial": partial, "statuses": statuses, "totals": totals, "person_rows": persons.num_rows}


def write_accounts(con: duckdb.DuckDBPyConnection, out: Path, partials: list[dict]) -> dict:
    """accounts/{fund_totals,critical_illness,facilities}.parquet: the buckets' partial tables
    summed (accounts/persons.parquet was written bucket by bucket); returns {table: rows}."""
    acc = out / "accounts"
    written = {}
    for name, (schema, keys, _, resum) in PARTIALS.items():
        tables = [p["partial"][name] for p in partials if p["partial"][name].num_rows]
        table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
        con.register("partial_rows", table)
        summed = con.sql(f"SELECT {keys}, {resum} FROM partial_rows GROUP BY ALL ORDER BY ALL").to_arrow_table()
        con.unregister("partial_rows")
        written[name] = write_parquet(acc / f"{name}.parquet", summed, schema)
    written["persons"] = sum(p["person_rows"] for p in partials)
    return written


def key_figures(con: duckdb.DuckDBPyConnection, out: Path, partials: list[dict]) -> dict:
    """The office's key figures: statuses, fund totals, and per (region, identity) the share of
    persons whose in-scope amounts the funds paid at least TARGET_BP of (Shuozhou's target)."""
    statuses: dict[str, int] = {}
    totals: dict[str, int] = {}
    for p in partials:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in p["totals"].items():
            totals[k] = totals.get(k, 0) + v
    statuses = dict(sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0])))
    target = rows(con, f"""
        SELECT region, coalesce(identity, '(none)') AS identity, count(*) AS persons,
               count(*) FILTER (WHERE in_scope_paid_bp >= {TARGET_BP}) AS reached,
               {share_bp(f"count(*) FILTER (WHERE in_scope_paid_bp >= {TARGET_BP})", 'count(*)')} AS reached_bp,
               sum(personal_pay) AS personal_pay, sum(compliant_personal_pay) AS compliant_personal_pay
        FROM {source(out / 'accounts' / 'persons.parquet')} GROUP BY ALL ORDER BY region, identity""")
    return {"statuses": statuses, "totals": {k: int(v) for k, v in totals.items()},
            "target_bp": TARGET_BP, "by_identity": target}

