"""Reconciliation (补差) on constructed differences, amounts checked by hand.

Policy: basic pays 50 % of the in-scope amount; assistance pays 50 % of what is
left for a person holding `low_income`. The counter's ledger is written by hand
(what was really paid), the year's data and the final registry differ from it:

* c1, person A, 1,000 yuan: A was recognised as low-income late (from 1 January in
  the final registry); the counter paid basic 500 and no aid. Year: basic 500, aid
  250 -> owed 250.00 aid.
* c2, person B: the counter paid basic 500 on 1,000 yuan; the corrected year data
  says 800 -> basic 400: recover 100.00 basic; B's personal pay falls by 100.00.
* c3, person B: settled then reversed at the counter, not in the year's data: left out.
* c4, person B: reversed at the counter but in the year's data (300 yuan): year only,
  owed 150.00 basic.
* c5, person C, 200 yuan: missing from the ledger (never paid at the counter):
  owed 100.00 basic.
* c6, person D: paid at the counter basic 350.00, missing from the year's data:
  recover 350.00.
* c7, person D, 400 yuan: the year pays exactly what the counter paid (basic 200):
  no difference, no row.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import claims_table
from engine.clearing import clear
from engine.schema import LEDGER_SCHEMA, PERSONS_SCHEMA

POLICY = """\
id: test-2024
region: "000001"
scheme: resident
year: 2024
identities: [low_income]
layers:
  - name: basic
    fund: basic
    rules:
      - match: {}
        ratio: 0.5
  - name: assistance
    fund: medical_aid
    rules:
      - match: {holds: [low_income]}
        ratio: 0.5
"""

Y = 100


def write_policy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test-2024.yaml").write_text(POLICY)
    return folder


def write_registry(path: Path, late_low_income: bool = True) -> Path:
    spells = [{"identity": "low_income", "valid_from": dt.date(2024, 1, 1), "valid_to": None}]
    rows = [{"person_id": p, "region": "000001", "scheme": "resident", "birth_date": dt.date(1980, 5, 5),
             "identities": spells if (p == "A" and late_low_income) else []} for p in "ABCD"]
    pq.write_table(pa.Table.from_pylist(rows, schema=PERSONS_SCHEMA), path)
    return path


def ledger_row(seq: int, kind: str, claim_id: str, person: str, in_scope: int = 0, basic: int = 0, aid: int = 0,
               day: int = 1) -> dict:
    row = {f.name: None for f in LEDGER_SCHEMA}
    row.update(seq=seq, kind=kind, recorded_at=dt.datetime(2024, 3, day, 10, tzinfo=dt.timezone.utc),
               claim_id=claim_id, person_id=person, region="000001", scheme="resident",
               facility_id=f"H{person}")
    if kind == "settle":
        fund = basic + aid
        row.update(settle_time=dt.datetime(2024, 3, day, 9), visit_type="inpatient", facility_level="secondary",
                   locality="county", status="ok", total_amount=in_scope, in_scope_amount=in_scope,
                   basic_pay=basic, supplementary_pay=0, critical_illness_pay=0, medical_aid_pay=aid,
                   guarantee_pay=0, fund_pay_total=fund, personal_pay=in_scope - fund,
                   compliant_personal_pay=in_scope - fund, deductible_applied=0, layer_pays=[], cap_hit=False)
    else:
        row["reason"] = "cancelled"
    return row


def write_ledger(path: Path) -> Path:
    rows = [
        ledger_row(1, "settle", "c1", "A", 1000 * Y, basic=500 * Y, day=1),
        ledger_row(2, "settle", "c2", "B", 1000 * Y, basic=500 * Y, day=2),
        ledger_row(3, "settle", "c3", "B", 600 * Y, basic=300 * Y, day=3),
        ledger_row(4, "reverse", "c3", "B", day=3),
        ledger_row(5, "settle", "c4", "B", 300 * Y, basic=150 * Y, day=4),
        ledger_row(6, "reverse", "c4", "B", day=4),
        ledger_row(7, "settle", "c6", "D", 700 * Y, basic=350 * Y, day=6),
        ledger_row(8, "settle", "c7", "D", 400 * Y, basic=200 * Y, day=7),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), path)
    return path


def year_claims(path: Path) -> Path:
    rows = [
        {"claim_id": "c1", "person_id": "A", "in_scope_amount": 1000 * Y, "settle_time": dt.datetime(2024, 3, 1, 9)},
        {"claim_id": "c2", "person_id": "B", "in_scope_amount": 800 * Y, "settle_time": dt.datetime(2024, 3, 2, 9)},
        {"claim_id": "c4", "person_id": "B", "in_scope_amount": 300 * Y, "settle_time": dt.datetime(2024, 3, 4, 9)},
        {"claim_id": "c5", "person_id": "C", "in_scope_amount": 200 * Y, "settle_time": dt.datetime(2024, 3, 5, 9)},
        {"claim_id": "c7", "person_id": "D", "in_scope_amount": 400 * Y, "settle_time": dt.datetime(2024, 3, 7, 9)},
    ]
    # the claims' own columns are stale (no identity, wrong region): the registry's basis is used
    rows = [dict(r, region="999999", identities=None, age=1) for r in rows]
    pq.write_table(claims_table(rows), path)
    return path


@pytest.fixture
def cleared(tmp_path):
    out = tmp_path / "out"
    summary = clear(2024, year_claims(tmp_path / "claims.parquet"), write_policy(tmp_path / "policies"), out,
                    write_registry(tmp_path / "persons.parquet"), write_ledger(tmp_path / "ledger.parquet"),
                    stream=None, charts=False)
    return out, summary


def test_claims_differences_exact_to_the_fen(cleared):
    out, _ = cleared
    rows = {r["claim_id"]: r for r in pq.read_table(out / "reconciliation" / "claims.parquet").to_pylist()}
    assert sorted(rows) == ["c1", "c2", "c4", "c5", "c6"]  # c3 reversed and absent: left out; c7 equal
    c1 = rows["c1"]
    assert (c1["match"], c1["year_basic_pay"], c1["paid_basic_pay"], c1["year_medical_aid_pay"],
            c1["paid_medical_aid_pay"], c1["diff_medical_aid_pay"], c1["diff_total"], c1["diff_personal_pay"]) == \
        ("both", 500 * Y, 500 * Y, 250 * Y, 0, 250 * Y, 250 * Y, -250 * Y)
    c2 = rows["c2"]
    assert (c2["match"], c2["diff_basic_pay"], c2["diff_total"], c2["diff_personal_pay"]) == \
        ("both", -100 * Y, -100 * Y, -100 * Y)
    c4 = rows["c4"]
    assert (c4["match"], c4["reversed_at_counter"], c4["paid_basic_pay"], c4["diff_basic_pay"]) == \
        ("year_only", True, 0, 150 * Y)
    c5 = rows["c5"]
    assert (c5["match"], c5["year_status"], c5["diff_total"], c5["facility_id"]) == ("year_only", "ok", 100 * Y, None)
    c6 = rows["c6"]
    assert (c6["match"], c6["year_status"], c6["paid_basic_pay"], c6["diff_basic_pay"], c6["diff_total"],
            c6["facility_id"]) == ("ledger_only", None, 350 * Y, -350 * Y, -350 * Y, "HD")
    assert c1["region"] == "000001"  # the registry's, not the claim's stale column


def test_person_totals_and_summary(cleared):
    out, summary = cleared
    persons = {r["person_id"]: r for r in pq.read_table(out / "reconciliation" / "persons.parquet").to_pylist()}
    assert {p: (r["claims"], r["diff_total"]) for p, r in persons.items()} == {
        "A": (1, 250 * Y), "B": (2, -100 * Y + 150 * Y), "C": (1, 100 * Y), "D": (1, -350 * Y)}
    assert persons["A"]["diff_medical_aid_pay"] == 250 * Y
    r = summary["reconciliation"]
    assert (r["matched_exactly"], r["matched_with_difference"], r["year_only"], r["ledger_only"],
            r["reversed_left_out"]) == (1, 2, 2, 1, 1)
    assert (r["owed"], r["to_recover"]) == ((250 + 150 + 100) * Y, (100 + 350) * Y)
    assert (r["diff_basic_pay"], r["diff_medical_aid_pay"]) == ((-100 + 150 + 100 - 350) * Y, 250 * Y)


def test_facility_from_ledger_in_accounts(cleared):
    out, _ = cleared
    fac = {r["facility_id"]: r["fund_pay_total"] for r in pq.read_table(out / "accounts" / "facilities.parquet").to_pylist()}
    # c1 (A: 750), c2 (B: 400), c7 (D: 200) matched in the ledger; c4 reversed there, still its facility; c5 unknown
    assert fac == {"HA": 750 * Y, "HB": 400 * Y + 150 * Y, "HD": 200 * Y, None: 100 * Y}


def test_same_registry_as_counter_shows_no_difference(tmp_path):
    """Without the late identity, c1 matches the counter exactly: no row for it."""
    out = tmp_path / "out"
    summary = clear(2024, year_claims(tmp_path / "claims.parquet"), write_policy(tmp_path / "policies"), out,
                    write_registry(tmp_path / "persons.parquet", late_low_income=False),
                    write_ledger(tmp_path / "ledger.parquet"), stream=None, charts=False)
    ids = pq.read_table(out / "reconciliation" / "claims.parquet").column("claim_id").to_pylist()
    assert "c1" not in ids and summary["reconciliation"]["matched_exactly"] == 2


def test_bad_ledger_names_file_and_column(tmp_path):
    from engine.clearing import ClearingError

    bad = tmp_path / "ledger.parquet"
    pq.write_table(pa.table({"claim_id": ["c1"]}), bad)
    with pytest.raises(ClearingError, match=r"ledger.parquet: ledger column 'seq' is missing"):
        clear(2024, year_claims(tmp_path / "claims.parquet"), write_policy(tmp_path / "policies"), tmp_path / "o",
              write_registry(tmp_path / "persons.parquet"), bad, stream=None, charts=False)


def test_report_shows_reconciliation(tmp_path):
    out = tmp_path / "out"
    clear(2024, year_claims(tmp_path / "claims.parquet"), write_policy(tmp_path / "policies"), out,
          write_registry(tmp_path / "persons.parquet"), write_ledger(tmp_path / "ledger.parquet"), stream=None)
    html = (out / "report.html").read_text()
    assert "Reconciliation with the counter" in html and "charts/top_differences.png" in html
    assert (out / "charts" / "top_differences.png").read_bytes()[:4] == b"\x89PNG"
    assert "-350.00" in html and "250.00" in html  # D to recover, A owed, in yuan


def test_claim_moved_to_another_person_is_corrected_on_both(tmp_path):
    """The counter paid c7 on D's record; the year's data holds c7 for C (a corrected person):
    D's payment is to recover (ledger_only), C's re-settlement owed (year_only); each
    person's record is corrected, whatever buckets the two persons fall in."""
    claims = tmp_path / "claims.parquet"
    year_claims(claims)
    t = pq.read_table(claims)
    moved = pa.array(["C" if c == "c7" else p for c, p in zip(t.column("claim_id").to_pylist(),
                                                                 t.column("person_id").to_pylist())])
    pq.write_table(t.set_column(t.schema.get_field_index("person_id"), "person_id", moved), claims)
    for buckets_rows in (1, 1000):  # every person alone in a bucket, and all in one
        out = tmp_path / f"out{buckets_rows}"
        clear(2024, claims, write_policy(tmp_path / "policies"), out, write_registry(tmp_path / "persons.parquet"),
              write_ledger(tmp_path / "ledger.parquet"), stream=None, charts=False, bucket_rows=buckets_rows)
        rows = [r for r in pq.read_table(out / "reconciliation" / "claims.parquet").to_pylist()
                if r["claim_id"] == "c7"]
        assert sorted((r["person_id"], r["match"], r["diff_total"]) for r in rows) == [
            ("C", "year_only", 200 * Y), ("D", "ledger_only", -200 * Y)]
