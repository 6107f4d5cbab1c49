"""Phase 5: the report a person reads, one HTML page with tables and PNG charts.

Figures come from the Parquet tables through DuckDB (small aggregates only, so the
page costs the same for 10 thousand or 100 million claims); money is formatted from
integer fen with `format_yuan`. Charts need matplotlib (the `reports` extra): without
it the page says so where each chart would be, and everything else is written.
"""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Optional

import duckdb

from ..files import write_bytes
from ..schema import FUND_COLUMNS, FUNDS, format_yuan
from .accounts import TARGET_BP
from .sql import rows, source

try:  # optional: the `reports` extra
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
except ImportError:  # pragma: no cover - exercised by the degrade test through a flag
    plt = None

#: Personal burden bins (fen) for the distribution chart: lower bounds.
BURDEN_EDGES = (0, 10_000, 50_000, 100_000, 300_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000)

CSS = """body{font-family:system-ui,-apple-system,"Noto Sans CJK SC",sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:3px 8px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kf{display:flex;flex-wrap:wrap;gap:1em}.kf div{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;
min-width:12em}.kf b{display:block;font-size:1.3em}.note{color:#666;font-size:.9em}img{max-width:100%}"""


def yuan(fen) -> str:
    return format_yuan(int(fen or 0))


def pct(bp) -> str:
    if bp is None:
        return "–"
    bp = int(bp)
    return f"{bp // 100}.{bp % 100:02d} %"


def table(headers: list[str], body: list[list], numeric: Optional[set] = None) -> str:
    numeric = numeric if numeric is not None else set(range(1, len(headers)))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    out = []
    for r in body:
        cells = "".join(f'<td class="n">{html.escape(str(v))}</td>' if i in numeric else f"<td>{html.escape(str(v))}</td>"
                        for i, v in enumerate(r))
        out.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(out)}</table>"


class Charts:
    """PNG charts written next to the page; `img()` gives the tag, or a note without matplotlib."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled and plt is not None

    def img(self, name: str, draw, alt: str) -> str:
        if not self.enabled:
            return f'<p class="note">Chart "{html.escape(alt)}" not drawn: matplotlib is not installed ' \
                   f'(pip install "medsettle[reports]").</p>'
        fig, ax = plt.subplots(figsize=(9, 3.8), dpi=100)
        try:
            draw(ax)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes(self.folder / name, buf.getvalue())
        return f'<img src="{self.folder.name}/{name}" alt="{html.escape(alt)}">'


def yuan_axis(ax, axis: str = "y") -> None:
    fmt = FuncFormatter(lambda v, _: f"{v / 1e6:,.1f} M" if abs(v) >= 1e6 else f"{v:,.0f}")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def burden_histogram(con: duckdb.DuckDBPyConnection, view: str = "persons_summary") -> list[tuple[str, int]]:
    """Persons per bin of annual personal pay (integer fen bounds)."""
    edges = list(BURDEN_EDGES)
    parts = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        cond = f"personal_pay >= {lo}" + (f" AND personal_pay < {hi}" if hi is not None else "")
        parts.append(f"count(*) FILTER (WHERE {cond}) AS b{i}")
    counts = rows(con, f"SELECT {', '.join(parts)} FROM {view}")[0]
    labels = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        labels.append(f"{lo // 100:,}–{hi // 100:,}" if hi is not None else f"≥ {lo // 100:,}")
    return [(labels[i], int(counts[f"b{i}"])) for i in range(len(edges))]


def histogram_chart(hist: list[tuple[str, int]], xlabel: str, title: str):
    """The drawing of persons per bin (`burden_histogram`), for `Charts.img`."""
    def draw(ax):
        ax.bar(range(len(hist)), [c for _, c in hist])
        ax.set_xticks(range(len(hist)), [label for label, _ in hist], rotation=30, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("persons")
        ax.set_title(title)
    return draw


def fund_sections(con: duckdb.DuckDBPyConnection, charts: Charts, prefix: str = "") -> str:
    """Fund totals by region and by month, critical illness, facilities, burden: the accounts' part of the page."""
    parts = []
    by_region = rows(con, f"""SELECT region, scheme, sum(claims) AS claims,
        {", ".join(f"sum({c}) AS {c}" for c in FUND_COLUMNS)}, sum(fund_pay_total) AS fund_pay_total,
        sum(personal_pay) AS personal_pay FROM fund_totals GROUP BY ALL ORDER BY ALL""")
    parts.append("<h2>Funds by region (yuan)</h2>")
    parts.append(table(["region", "scheme", "claims", *FUNDS, "all funds", "personal"],
                       [[r["region"], r["scheme"], f"{int(r['claims']):,}", *[yuan(r[c]) for c in FUND_COLUMNS],
                         yuan(r["fund_pay_total"]), yuan(r["personal_pay"])] for r in by_region], set(range(2, 10))))
    by_month = rows(con, f"""SELECT month, {", ".join(f"sum({c}) AS {c}" for c in FUND_COLUMNS)},
        sum(fund_pay_total) AS fund_pay_total FROM fund_totals GROUP BY month ORDER BY month""")

    def draw_months(ax):
        bottom = [0] * len(by_month)
        months = [r["month"] for r in by_month]
        for fund, col in zip(FUNDS, FUND_COLUMNS):
            vals = [int(r[col]) / 100 for r in by_month]
            ax.bar(months, vals, bottom=bottom, label=fund)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(1, 13))
        ax.set_xlabel("month")
        ax.set_ylabel("yuan")
        yuan_axis(ax)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, ncol=5, loc="upper center")
        ax.set_title("Fund spending by month")

    parts.append("<h2>Fund spending by month</h2>")
    parts.append(charts.img(f"{prefix}funds_by_month.png", draw_months, "fund spending by month"))
    parts.append(table(["month", *FUNDS, "all funds"],
                       [[r["month"], *[yuan(r[c]) for c in FUND_COLUMNS], yuan(r["fund_pay_total"])] for r in by_month]))
    ci = rows(con, """SELECT region, scheme, layer, sum(claims) AS claims, sum(paid) AS paid
        FROM critical_illness GROUP BY ALL ORDER BY ALL""")
    parts.append("<h2>Critical-illness insurer's account</h2>")
    parts.append('<p class="note">What the critical-illness layers paid; by month in '
                 "accounts/critical_illness.parquet.</p>")
    parts.append(table(["region", "scheme", "layer", "claims", "paid (yuan)"],
                       [[r["region"], r["scheme"], r["layer"], f"{int(r['claims']):,}", yuan(r["paid"])] for r in ci],
                       {3, 4}))
    fac = rows(con, """SELECT facility_id, region, facility_level, claims, total_amount, fund_pay_total, personal_pay
        FROM facilities ORDER BY fund_pay_total DESC LIMIT 15""")
    nfac = rows(con, "SELECT count(*) AS n, count(*) FILTER (WHERE facility_id IS NULL) AS unknown FROM facilities")[0]
    parts.append("<h2>Facilities (top 15 by fund pay)</h2>")
    parts.append(f'<p class="note">{int(nfac["n"]):,} rows in accounts/facilities.parquet'
                 + (" (rows with an empty facility: no facility_id in the claims or the ledger)" if nfac["unknown"] else "")
                 + ".</p>")
    parts.append(table(["facility", "region", "level", "claims", "total", "funds", "personal"],
                       [[r["facility_id"] or "(unknown)", r["region"], r["facility_level"], f"{int(r['claims']):,}",
                         yuan(r["total_amount"]), yuan(r["fund_pay_total"]), yuan(r["personal_pay"])] for r in fac],
                       {3, 4, 5, 6}))
    draw_burden = histogram_chart(burden_histogram(con), "annual personal pay per person (yuan)",
                                  "Distribution of personal burden")

    parts.append("<h2>Personal burden</h2>")
    parts.append(charts.img(f"{prefix}burden_distribution.png", draw_burden, "distribution of personal burden"))
    return "".join(parts)


def identity_section(con: duckdb.DuckDBPyConnection, figures: dict, charts: Charts, prefix: str = "") -> str:
    ident = rows(con, f"""SELECT coalesce(identity, '(none)') AS identity, count(*) AS persons,
        sum(personal_pay) AS personal_pay, sum(compliant_personal_pay) AS compliant_personal_pay,
        sum(fund_pay_total) AS funds, sum(compliant_amount) AS compliant,
        count(*) FILTER (WHERE in_scope_paid_bp >= {TARGET_BP}) AS reached
        FROM persons_summary GROUP BY 1 ORDER BY 1""")

    def mean(total, n):  # yuan per person, for the chart only
        return int(total) / 100 / max(1, int(n))

    def draw(ax):
        names = [r["identity"] for r in ident]
        ax.bar(names, [mean(r["personal_pay"], r["persons"]) for r in ident], label="personal pay")
        ax.bar(names, [mean(r["compliant_personal_pay"], r["persons"]) for r in ident], width=0.5,
               label="of which compliant")
        ax.set_ylabel("yuan per person")
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.legend(fontsize=8)
        ax.set_title("Personal burden by identity (mean per person)")

    body = [[r["identity"], f"{int(r['persons']):,}", yuan(r["personal_pay"]), yuan(r["compliant_personal_pay"]),
             pct(_bp(r["funds"], r["compliant"])), f"{int(r['reached']):,}", pct(_bp(r["reached"], r["persons"]))]
            for r in ident]
    return "".join(["<h2>Burden by identity</h2>",
                    charts.img(f"{prefix}burden_by_identity.png", draw, "personal burden by identity"),
                    table(["identity", "persons", "personal pay", "compliant personal pay",
                           "funds / compliant", f"persons ≥ {pct(TARGET_BP)} in scope paid", "share"], body)])


def _bp(num, den) -> Optional[int]:
    num, den = int(num or 0), int(den or 0)
    return None if den <= 0 else (num * 10_000 + den // 2) // den


def key_figures_html(figures: dict, recon: Optional[dict]) -> str:
    t = figures["totals"]
    cards = [("claims settled ok", f"{int(t['claims']):,}"), ("persons", f"{int(t['persons']):,}"),
             ("total cost", yuan(t["total_amount"])), ("all funds", yuan(t["fund_pay_total"])),
             ("personal pay", yuan(t["personal_pay"])),
             ("funds / compliant", pct(_bp(t["fund_pay_total"], t["compliant_amount"])))]
    low = [r for r in figures["by_identity"] if r["identity"] == "low_income"]
    if low:
        n = sum(int(r["persons"]) for r in low)
        k = sum(int(r["reached"]) for r in low)
        cards.append((f"low-income persons with ≥ {pct(figures['target_bp'])} of in-scope paid",
                      f"{pct(_bp(k, n))} ({k:,} of {n:,})"))
    if recon:
        cards += [("owed (year pays more)", yuan(recon["owed"])), ("to recover", yuan(recon["to_recover"])),
                  ("claims matched exactly", f"{recon['matched_exactly']:,}")]
    out = ['<div class="kf">', *[f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in cards], "</div>"]
    target = [[r["region"], r["identity"], f"{int(r['persons']):,}", f"{int(r['reached']):,}", pct(r["reached_bp"])]
              for r in figures["by_identity"] if r["identity"] != "(none)"]
    if target:
        out.append(f"<h3>Target: persons whose in-scope amounts the funds paid at least {pct(figures['target_bp'])}</h3>")
        out.append(table(["region", "identity", "persons", "reached", "share"], target, {2, 3, 4}))
    st = figures["statuses"]
    out.append("<h3>Claims by status</h3>" + table(["status", "claims"], [[k, f"{int(v):,}"] for k, v in st.items()]))
    return "".join(out)


def recon_section(con: duckdb.DuckDBPyConnection, recon: dict, charts: Charts) -> str:
    parts = ["<h2>Reconciliation with the counter (补差)</h2>",
             table(["", "claims"], [[k.replace("_", " "), f"{recon[k]:,}"] for k in
                                    ("matched_exactly", "matched_with_difference", "year_only", "ledger_only",
                                     "reversed_at_counter", "reversed_left_out")]),
             table(["fund", "difference (yuan; > 0 owed, < 0 to recover)"],
                   [[f, yuan(recon[f"diff_{f}_pay"])] for f in FUNDS])]
    top = rows(con, """SELECT person_id, region, scheme, claims, diff_total, diff_personal_pay FROM recon_persons
                       WHERE diff_total <> 0 ORDER BY abs(diff_total) DESC, person_id LIMIT 20""")
    if top:
        def draw(ax):
            names = [r["person_id"] for r in top][::-1]
            vals = [int(r["diff_total"]) / 100 for r in top][::-1]
            ax.barh(names, vals, color=["tab:green" if v > 0 else "tab:red" for v in vals])
            ax.set_xlabel("yuan (green: owed, red: to recover)")
            yuan_axis(ax, "x")
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title("Top differences per person")

        parts.append(charts.img("top_differences.png", draw, "top differences per person"))
        parts.append(table(["person", "region", "scheme", "claims", "difference", "personal pay difference"],
                           [[r["person_id"], r["region"], r["scheme"], r["claims"], yuan(r["diff_total"]),
                             yuan(r["diff_personal_pay"])] for r in top], {3, 4, 5}))
    return "".join(parts)


def register_accounts(con: duckdb.DuckDBPyConnection, out: Path) -> None:
    """Views over the run's tables (a table may be a folder of part files)."""
    for name in ("fund_totals", "critical_illness", "facilities", "persons"):
        view = "persons_summary" if name == "persons" else name
        con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM {source(out / 'accounts' / (name + '.parquet'))}")
    recon = out / "reconciliation" / "persons.parquet"
    if recon.exists():
        con.execute(f"CREATE OR REPLACE TEMP VIEW recon_persons AS SELECT * FROM {source(recon)}")


def page(title: str, sections: list[str], note: str = "") -> bytes:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + html.escape(title) +
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>" +
            (f'<p class="note">{html.escape(note)}</p>' if note else "") + "".join(sections) +
            "</body></html>").encode()


def write_report(con: duckdb.DuckDBPyConnection, out: Path, title: str, figures: dict, recon: Optional[dict],
                 note: str = "", charts: bool = True) -> Path:
    """out/report.html (and out/charts/*.png) from the accounts and reconciliation tables."""
    register_accounts(con, out)
    ch = Charts(out / "charts", charts)
    sections = ["<h2>Key figures</h2>", key_figures_html(figures, recon)]
    if recon:
        sections.append(recon_section(con, recon, ch))
    sections.append(fund_sections(con, ch))
    sections.append(identity_section(con, figures, ch))
    path = out / "report.html"
    write_bytes(path, page(title, sections, note))
    return path
