"""Clearing end to end: buckets equal one settlement call, resume after a killed run,
the command line, what-if and the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import claims_table
from engine import load_policies, settle
from engine.clearing import clear
from engine.clearing.command import main
from engine.clearing.schema import CLEARED_SCHEMA, UNKNOWN_PERSON
from engine.generate import generate_claims, generate_persons
from engine.registry import as_of

YEAR = 2022
COMPARED = ("status", "policy_id", "identity", "deductible_applied", "basic_pay", "supplementary_pay",
            "critical_illness_pay", "medical_aid_pay", "guarantee_pay", "fund_pay_total", "personal_pay",
            "compliant_personal_pay", "layer_pays", "cap_hit")


@pytest.fixture(scope="module")
def year_data(tmp_path_factory):
    """A generated year with invalid rows, and claim ids repeated for the same and for other persons."""
    d = tmp_path_factory.mktemp("year")
    policies = load_policies()
    claims = generate_claims(policies, 12_000, seed=11, invalid_rate=0.02, year=YEAR)
    persons = generate_persons(policies, 12_000, seed=11, year=YEAR)
    n = claims.num_rows
    rng = np.random.default_rng(5)
    # later rows repeating earlier ids: half with the same person, half with another person
    src = rng.choice(n // 2, 200, replace=False)
    dups = claims.take(pa.array(src))
    other = claims.column("person_id").take(pa.array(rng.integers(0, n, 200)))
    person = pc.if_else(pa.array(np.arange(200) % 2 == 0), dups.column("person_id"), other)
    dups = dups.set_column(dups.schema.get_field_index("person_id"), "person_id", person)
    claims = pa.concat_tables([claims, dups])
    # a dataset of three files, in no particular order of time or person
    perm = rng.permutation(claims.num_rows)
    claims = claims.take(pa.array(perm))
    folder = d / "claims"
    folder.mkdir()
    cuts = [0, claims.num_rows // 3, 2 * claims.num_rows // 3, claims.num_rows]
    for i in range(3):
        pq.write_table(claims.slice(cuts[i], cuts[i + 1] - cuts[i]), folder / f"part-{i}.parquet")
    pq.write_table(persons, d / "persons.parquet")
    return d, policies, claims, persons


def _by_ord(out: Path) -> pa.Table:
    t = pq.read_table(out / "results")
    return t.take(pc.sort_indices(t.column("ord")))


def test_buckets_equal_one_settle_call(year_data, tmp_path):
    d, policies, claims, persons = year_data
    summary = clear(YEAR, d / "claims", policies, tmp_path / "out", d / "persons.parquet", bucket_rows=2_000,
                    stream=None, charts=False)
    assert summary["counts"]["buckets"] >= 6
    assert summary["counts"]["duplicates"] >= 200  # ours, and those the generator injects
    got = _by_ord(tmp_path / "out")
    assert got.schema == CLEARED_SCHEMA
    assert got.num_rows == claims.num_rows
    # one call over the whole year, in input order (files in path order, rows in file order)
    basis = as_of(claims, persons)
    assert not basis.basis_status.any()
    want = settle(basis.claims, policies).results
    assert got.column("claim_id").equals(want.column("claim_id"))
    for name in COMPARED:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    statuses = set(got.column("status").to_pylist())
    assert {"ok", "DUPLICATE_CLAIM"} <= statuses and len(statuses) > 3
    # the registry's basis, not the claims' own columns
    assert got.column("region").equals(basis.claims.column("region"))
    # the person summary (made bucket by bucket) is the whole year's group-by
    ok = got.filter(pc.equal(got.column("status"), "ok"))
    want_persons = ok.group_by(["person_id", "region", "scheme"]).aggregate(
        [("fund_pay_total", "sum"), ("claim_id", "count")]).sort_by("person_id").to_pylist()
    persons = pq.read_table(tmp_path / "out" / "accounts" / "persons.parquet").sort_by("person_id").to_pylist()
    assert [(p["person_id"], p["fund_pay_total"], p["claims"]) for p in persons] == \
        [(p["person_id"], p["fund_pay_total_sum"], p["claim_id_count"]) for p in want_persons]


def test_resume_after_a_killed_run(year_data, tmp_path):
    d, policies, _, _ = year_data
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    def kill_after_three(bucket):
        if bucket == 2:
            # a half-written bucket of the dying process, as a kill leaves it
            (out / "results" / ".bucket-00003.parquet.999.tmp").write_bytes(b"PAR1 partial")
            raise Killed

    with pytest.raises(Killed):
        clear(YEAR, d / "claims", policies, out, d / "persons.parquet", bucket_rows=2_000, stream=None,
              charts=False, after_bucket=kill_after_three)
    # a bucket is done when its mark is in place (its files first); the one in flight beside
    # bucket 2 (two workers) may have finished too
    marks = sorted(p.name for p in (out / "work" / "buckets").glob("bucket-*"))
    assert marks[:3] == ["bucket-00000", "bucket-00001", "bucket-00002"] and len(marks) <= 4
    done = [m + ".parquet" for m in marks]
    mtimes = {p: (out / "results" / p).stat().st_mtime_ns for p in done}
    summary = clear(YEAR, d / "claims", policies, out, d / "persons.parquet", bucket_rows=2_000, stream=None,
                    charts=False, resume=True)
    c = summary["counts"]
    assert c["partition_reused"] and c["skipped"] == len(marks) and c["settled"] == c["buckets"] - len(marks)
    assert {p: (out / "results" / p).stat().st_mtime_ns for p in done} == mtimes  # not settled again
    fresh = tmp_path / "fresh"
    clear(YEAR, d / "claims", policies, fresh, d / "persons.parquet", bucket_rows=2_000, stream=None, charts=False)
    assert _by_ord(out).equals(_by_ord(fresh))
    assert pq.read_table(out / "accounts" / "persons.parquet").sort_by("person_id").equals(
        pq.read_table(fresh / "accounts" / "persons.parquet").sort_by("person_id"))
    for table in ("fund_totals", "facilities", "critical_illness"):  # written sorted
        assert pq.read_table(out / "accounts" / f"{table}.parquet").equals(
            pq.read_table(fresh / "accounts" / f"{table}.parquet")), table
    assert not list(out.rglob(".*.tmp"))


def test_resume_refuses_other_inputs(year_data, tmp_path):
    from engine.clearing import ClearingError

    d, policies, _, _ = year_data
    out = tmp_path / "out"
    clear(YEAR, d / "claims", policies, out, d / "persons.parquet", bucket_rows=2_000, stream=None, charts=False,
          keep_work=True)
    with pytest.raises(ClearingError, match="other inputs"):
        clear(YEAR, d / "claims", policies, out, d / "persons.parquet", bucket_rows=2_500, stream=None,
              charts=False, resume=True)


def test_unknown_person_is_an_error_row(tmp_path):
    policies = load_policies()
    persons = generate_persons(policies, 100, seed=1, year=YEAR)
    pid = persons.column("person_id")[0].as_py()
    rows = [{"claim_id": "a", "person_id": pid, "region": "140600", "in_scope_amount": 100_000,
             "settle_time": "2022-05-01T10:00"},
            {"claim_id": "b", "person_id": "nobody", "region": "140600", "in_scope_amount": 100_000,
             "settle_time": "2022-05-01T10:00"},
            {"claim_id": "b", "person_id": pid, "region": "140600", "in_scope_amount": 100_000,
             "settle_time": "2022-05-02T10:00"}]
    pq.write_table(claims_table(rows), tmp_path / "c.parquet")
    pq.write_table(persons, tmp_path / "p.parquet")
    clear(YEAR, tmp_path / "c.parquet", policies, tmp_path / "out", tmp_path / "p.parquet", stream=None, charts=False)
    got = _by_ord(tmp_path / "out").to_pylist()
    assert [r["status"] for r in got] == ["ok", UNKNOWN_PERSON, "DUPLICATE_CLAIM"]  # a rejected id stays taken
    assert got[1]["fund_pay_total"] == 0


def test_command_line_clear_and_report(year_data, tmp_path, capsys):
    d, _, _, _ = year_data
    out = tmp_path / "out"
    code = main(["clear", "--year", str(YEAR), "--claims", str(d / "claims"), "--policies",
                 str(Path(load_policies().source or "engine/policies")), "--registry", str(d / "persons.parquet"),
                 "--out", str(out), "--bucket-rows", "10000", "--quiet"])
    assert code == 0
    assert "cleared" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    for png in ("funds_by_month.png", "burden_distribution.png", "burden_by_identity.png"):
        assert f"charts/{png}" in html
        assert (out / "charts" / png).read_bytes()[:4] == b"\x89PNG"
    assert "low-income persons with" in html and "Critical-illness insurer" in html
    assert not (out / "work").exists()
    # a usage error: no registry and no --use-claim-identities; no --year for a set of several years
    assert main(["clear", "--year", "2022", "--claims", str(d / "claims"), "--policies", "engine/policies",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--registry is required" in capsys.readouterr().err
    assert main(["clear", "--claims", str(d / "claims"), "--policies", "engine/policies", "--registry",
                 str(d / "persons.parquet"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--year is required" in capsys.readouterr().err
    # a bad input: exit 1, the file and the reason named
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"claim_id": ["x"]}), bad)
    assert main(["clear", "--year", "2022", "--claims", str(bad), "--policies", "engine/policies", "--registry",
                 str(d / "persons.parquet"), "--out", str(tmp_path / "y"), "--quiet"]) == 1
    assert "bad.parquet: claims: missing column 'person_id'" in capsys.readouterr().err


def test_report_without_matplotlib_says_so(year_data, tmp_path, monkeypatch):
    from engine.clearing import report

    d, policies, _, _ = year_data
    monkeypatch.setattr(report, "plt", None)
    clear(YEAR, d / "claims", policies, tmp_path / "out", d / "persons.parquet", stream=None)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "not drawn: matplotlib is not installed" in html
    assert not (tmp_path / "out" / "charts").exists()


def test_whatif_raising_a_cap_costs_the_funds_more(year_data, tmp_path):
    d, policies, _, _ = year_data
    src = Path(policies.source) if policies.source else Path("engine/policies")
    reform = tmp_path / "reform"
    reform.mkdir()
    for f in src.glob("shuozhou-resident-2022.yaml"):
        text = f.read_text()
        # the outpatient cap raised from 230 to 500 yuan
        assert "      outpatient: 230" in text
        (reform / f.name).write_text(text.replace("      outpatient: 230", "      outpatient: 500"))
    for f in src.glob("*.yaml"):
        if not (reform / f.name).exists():
            (reform / f.name).write_text(f.read_text())
    code = main(["whatif", "--year", str(YEAR), "--claims", str(d / "claims"), "--baseline", str(src),
                 "--reform", str(reform), "--registry", str(d / "persons.parquet"), "--out", str(tmp_path / "w"),
                 "--quiet", "--no-charts"])
    assert code == 0
    funds = pq.read_table(tmp_path / "w" / "whatif" / "funds.parquet").to_pylist()
    assert all(r["change"] == r["reform"] - r["baseline"] for r in funds)
    by_fund = {}
    for r in funds:
        by_fund[r["fund"]] = by_fund.get(r["fund"], 0) + r["change"]
    assert by_fund["basic"] > 0 and by_fund["personal"] < 0
    persons = pq.read_table(tmp_path / "w" / "whatif" / "persons.parquet")
    ident = pq.read_table(tmp_path / "w" / "whatif" / "identities.parquet").to_pylist()
    assert sum(r["pay_less"] for r in ident) == pc.sum(pc.less(persons.column("change"), 0)).as_py() > 0
    assert sum(r["change"] for r in ident) == by_fund["personal"]
    assert (tmp_path / "w" / "baseline" / "report.html").exists() and (tmp_path / "w" / "report.html").exists()


@pytest.mark.slow
def test_resume_after_sigkill(year_data, tmp_path):
    """A real kill (SIGKILL of the command in a child process) mid-settle, then --resume."""
    import signal
    import subprocess
    import sys
    import time

    d, policies, _, _ = year_data
    out = tmp_path / "out"
    args = ["clear", "--year", str(YEAR), "--claims", str(d / "claims"), "--policies", str(policies.source),
            "--registry", str(d / "persons.parquet"), "--out", str(out), "--bucket-rows", "300", "--quiet"]
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-m", "engine.clearing.command", *args], cwd=root)
    deadline = time.monotonic() + 60
    marks = out / "work" / "buckets"
    while time.monotonic() < deadline and len(list(marks.glob("bucket-*"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(marks.glob("bucket-*")))
    assert done >= 5
    assert main([*args, "--resume"]) == 0
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["counts"]["skipped"] >= done and summary["counts"]["partition_reused"]
    fresh = tmp_path / "fresh"
    clear(YEAR, d / "claims", policies, fresh, d / "persons.parquet", bucket_rows=300, stream=None, charts=False)
    assert _by_ord(out).equals(_by_ord(fresh))
