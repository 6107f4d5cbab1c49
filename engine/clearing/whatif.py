"""What-if: the same year under a baseline and a reform policy set, side by side.

The claims are partitioned once and each bucket settled under both sets. Each side
gets the full accounts and report of a clearing (out/baseline, out/reform); the
comparison (out/whatif/*.parquet, out/report.html) gives cost per fund and region,
personal burden by identity, and how many persons pay more or less and by how much.
This is how an office prices a reform before adopting it.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import duckdb

from ..files import write_bytes
from ..model import PolicySet
from ..schema import FUND_COLUMNS, FUNDS
from .clear import connect, disk_bytes, peak_rss_bytes, prepare, settle_year, year_policies
from .files import write_json
from .partition import BUCKET_ROWS
from .progress import PhaseProgress
from .report import Charts, burden_histogram, histogram_chart, page, table, write_report, yuan, yuan_axis
from .schema import WHATIF_FUNDS_SCHEMA, WHATIF_IDENTITY_SCHEMA, WHATIF_PERSONS_SCHEMA
from .sql import quote, rows, source, write_query

SIDES = ("baseline", "reform")


def whatif(year: int, claims, baseline: PolicySet, reform: PolicySet, out, registry=None, *,
           use_claim_identities: bool = False, bucket_rows: int = BUCKET_ROWS, memory_limit: str = "2GB",
           threads: int = 2, charts: bool = True, stream=sys.stderr) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    year_policies(baseline, year, "--baseline")
    year_policies(reform, year, "--reform")
    timings: dict = {}
    counts: dict = {}
    part = prepare(out, claims, registry, None, year, use_claim_identities, bucket_rows, False, stream, timings,
                   counts)
    figures = {}
    for side, policies in zip(SIDES, (baseline, reform)):
        t = time.perf_counter()
        d = out / side
        con, figures[side], _, _, _ = settle_year(part, d, policies, year, not use_claim_identities, False,
                                                  memory_limit, threads, stream, {}, {})
        write_report(con, d, f"Year {year} under the {side} policies", figures[side], None, f"{policies.source}",
                     charts)
        con.close()  # before the next side settles: DuckDB keeps its buffers while open
        shutil.rmtree(d / "work", ignore_errors=True)
        timings[side] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    with PhaseProgress("compare", 1, stream) as bar, connect(out / "work", memory_limit, threads) as con:
        change = compare(con, out, year, charts)
        bar.advance()
    timings["compare"] = round(time.perf_counter() - t, 3)
    disk = disk_bytes(out)
    shutil.rmtree(out / "work", ignore_errors=True)
    summary = {"year": year, "counts": counts, "change": change, "seconds": timings,
               "peak_rss_bytes": peak_rss_bytes(), "disk_peak_bytes": disk}
    write_json(out / "summary.json", summary)
    return summary


def compare(con: duckdb.DuckDBPyConnection, out: Path, year: int, charts: bool = True) -> dict:
    for side in SIDES:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {side}_persons AS SELECT * FROM "
                    f"{source(out / side / 'accounts' / 'persons.parquet')}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW {side}_funds AS SELECT * FROM "
                    f"read_parquet({quote(out / side / 'accounts' / 'fund_totals.parquet')})")
    fund_sums = ", ".join(f"sum({c})::BIGINT AS {f}" for f, c in zip(FUNDS, FUND_COLUMNS))
    unpivot = lambda side: f"""(UNPIVOT (SELECT region, scheme, {fund_sums}, sum(fund_pay_total)::BIGINT AS all_funds,
                                sum(personal_pay)::BIGINT AS personal FROM {side}_funds GROUP BY ALL)
                        ON {", ".join(FUNDS)}, all_funds, personal INTO NAME fund VALUE amount)"""  # noqa: E731
    wf = out / "whatif"
    write_query(con, f"""
        SELECT coalesce(b.region, r.region) AS region, coalesce(b.scheme, r.scheme) AS scheme,
               coalesce(b.fund, r.fund) AS fund, coalesce(b.amount, 0) AS baseline, coalesce(r.amount, 0) AS reform,
               coalesce(r.amount, 0) - coalesce(b.amount, 0) AS change
        FROM {unpivot('baseline')} b FULL OUTER JOIN {unpivot('reform')} r
          ON b.region = r.region AND b.scheme = r.scheme AND b.fund = r.fund
        ORDER BY 1, 2, 3""", wf / "funds.parquet", WHATIF_FUNDS_SCHEMA)
    pair = ", ".join([*(f"coalesce(b.{c}, 0) AS baseline_{c}" for c in FUND_COLUMNS),
                      *(f"coalesce(r.{c}, 0) AS reform_{c}" for c in FUND_COLUMNS)])
    write_query(con, f"""
        SELECT coalesce(b.person_id, r.person_id) AS person_id, coalesce(b.region, r.region) AS region,
               coalesce(b.scheme, r.scheme) AS scheme, coalesce(r.identity, b.identity) AS identity,
               coalesce(b.personal_pay, 0) AS baseline_personal_pay, coalesce(r.personal_pay, 0) AS reform_personal_pay,
               coalesce(r.personal_pay, 0) - coalesce(b.personal_pay, 0) AS change, {pair}
        FROM baseline_persons b FULL OUTER JOIN reform_persons r
          ON b.person_id = r.person_id AND b.region = r.region AND b.scheme = r.scheme""",
                wf / "persons.parquet", WHATIF_PERSONS_SCHEMA)
    con.execute(f"CREATE OR REPLACE TEMP VIEW whatif_persons AS SELECT * FROM read_parquet({quote(wf / 'persons.parquet')})")
    write_query(con, """
        SELECT identity, count(*)::BIGINT AS persons, sum(baseline_personal_pay)::BIGINT AS baseline_personal_pay,
               sum(reform_personal_pay)::BIGINT AS reform_personal_pay, sum(change)::BIGINT AS change,
               count(*) FILTER (WHERE change > 0) AS pay_more, count(*) FILTER (WHERE change < 0) AS pay_less,
               count(*) FILTER (WHERE change = 0) AS pay_same,
               coalesce(sum(change) FILTER (WHERE change > 0), 0)::BIGINT AS more_by,
               coalesce(-sum(change) FILTER (WHERE change < 0), 0)::BIGINT AS less_by
        FROM whatif_persons GROUP BY identity ORDER BY identity NULLS FIRST""",
                wf / "identities.parquet", WHATIF_IDENTITY_SCHEMA)
    total = rows(con, """SELECT count(*) FILTER (WHERE change > 0) AS pay_more, count(*) FILTER (WHERE change < 0)
        AS pay_less, count(*) FILTER (WHERE change = 0) AS pay_same,
        coalesce(sum(change) FILTER (WHERE change > 0), 0) AS more_by,
        coalesce(-sum(change) FILTER (WHERE change < 0), 0) AS less_by FROM whatif_persons""")[0]
    funds = {r["side"]: r["v"] for r in rows(con, """
        SELECT 'baseline' AS side, coalesce(sum(fund_pay_total), 0) AS v FROM baseline_funds
        UNION ALL SELECT 'reform', coalesce(sum(fund_pay_total), 0) FROM reform_funds""")}
    change = {k: int(v) for k, v in total.items()}
    change.update(baseline_funds=int(funds["baseline"]), reform_funds=int(funds["reform"]))
    _write_page(con, out, year, change, charts)
    return change


def _write_page(con, out: Path, year: int, change: dict, charts: bool) -> None:
    ch = Charts(out / "charts", charts)
    by_fund = rows(con, f"SELECT fund, sum(baseline) AS b, sum(reform) AS r, sum(change) AS c FROM "
                        f"read_parquet({quote(out / 'whatif' / 'funds.parquet')}) GROUP BY fund")
    order = {f: i for i, f in enumerate([*FUNDS, "all_funds", "personal"])}
    by_fund.sort(key=lambda r: order.get(r["fund"], 99))
    by_region = rows(con, f"SELECT region, scheme, baseline, reform, change FROM "
                          f"read_parquet({quote(out / 'whatif' / 'funds.parquet')}) WHERE fund = 'all_funds' ORDER BY 1, 2")
    ident = rows(con, f"SELECT * FROM read_parquet({quote(out / 'whatif' / 'identities.parquet')})")

    def draw_funds(ax):
        names = [r["fund"] for r in by_fund if r["fund"] in FUNDS]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [int(r["b"]) / 100 for r in by_fund if r["fund"] in FUNDS], 0.4, label="baseline")
        ax.bar([i + 0.2 for i in x], [int(r["r"]) / 100 for r in by_fund if r["fund"] in FUNDS], 0.4, label="reform")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("yuan")
        yuan_axis(ax)
        ax.legend()
        ax.set_title("Cost per fund")

    con.execute("CREATE OR REPLACE TEMP VIEW change_burden AS SELECT abs(change) AS personal_pay FROM whatif_persons "
                "WHERE change <> 0")
    draw_change = histogram_chart(burden_histogram(con, "change_burden"),
                                  "size of the change in annual personal pay (yuan)",
                                  "Persons whose personal pay changes")

    cards = (f'<div class="kf"><div>funds, baseline<b>{yuan(change["baseline_funds"])}</b></div>'
             f'<div>funds, reform<b>{yuan(change["reform_funds"])}</b></div>'
             f'<div>change<b>{yuan(change["reform_funds"] - change["baseline_funds"])}</b></div>'
             f'<div>persons paying more<b>{change["pay_more"]:,} (+{yuan(change["more_by"])})</b></div>'
             f'<div>persons paying less<b>{change["pay_less"]:,} (−{yuan(change["less_by"])})</b></div>'
             f'<div>unchanged<b>{change["pay_same"]:,}</b></div></div>')
    sections = [
        "<h2>Key figures</h2>", cards,
        '<p class="note">Full reports of each side: <a href="baseline/report.html">baseline</a>, '
        '<a href="reform/report.html">reform</a>.</p>',
        "<h2>Cost per fund (yuan)</h2>", ch.img("whatif_funds.png", draw_funds, "cost per fund"),
        table(["fund", "baseline", "reform", "change"],
              [[r["fund"], yuan(r["b"]), yuan(r["r"]), yuan(r["c"])] for r in by_fund]),
        "<h2>All funds by region (yuan)</h2>",
        table(["region", "scheme", "baseline", "reform", "change"],
              [[r["region"], r["scheme"], yuan(r["baseline"]), yuan(r["reform"]), yuan(r["change"])] for r in by_region],
              {2, 3, 4}),
        "<h2>Personal burden by identity</h2>",
        table(["identity", "persons", "baseline personal pay", "reform personal pay", "change", "pay more",
               "pay less", "unchanged", "more by", "less by"],
              [[r["identity"] or "(none)", f"{r['persons']:,}", yuan(r["baseline_personal_pay"]),
                yuan(r["reform_personal_pay"]), yuan(r["change"]), f"{r['pay_more']:,}", f"{r['pay_less']:,}",
                f"{r['pay_same']:,}", yuan(r["more_by"]), yuan(r["less_by"])] for r in ident]),
        "<h2>Who pays more or less</h2>", ch.img("whatif_change.png", draw_change, "change in personal pay"),
    ]
    write_bytes(out / "report.html", page(f"What-if {year}: baseline and reform side by side", sections))
