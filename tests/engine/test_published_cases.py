"""The published worked examples (spec section 8), loaded from
shared/spec/cases/published.yaml, settled by the engine and by the reference;
every expected field must come out to the fen (yuan x 100)."""
from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import yaml

import engine
import reference as ref
from conftest import claims_table, compare, acc_from_table, shared_dir

CASES_FILE = shared_dir() / "spec" / "cases" / "published.yaml"
CASES = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))["cases"]

MONEY_FIELDS = set(ref.AMOUNT_RESULT_FIELDS)
CLAIM_AMOUNTS = ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
                 "in_scope_amount", "in_scope_class_b_amount")


def fen(yuan) -> int:
    """Yuan (a YAML int or float) to fen, exactly: a float is read as its repr."""
    d = Decimal(repr(yuan)) if isinstance(yuan, float) else Decimal(yuan)
    f = d * 100
    assert f == f.to_integral_value(), f"{yuan} yuan is not a whole number of fen"
    return int(f)


def case_rows(case) -> list[dict]:
    """The header's recipe: region/scheme/year from the policy; person '<name>-p0'
    (or '-p<i>' where per_person is true); claim '<name>-c<i>'; settle_time March 1
    of the policy year plus i days; county, not referred, age 40, no identities,
    no disease code, absent amounts 0."""
    pol, name = case["policy"], case["name"]
    rows = []
    for i, entry in enumerate(case["claims"]):
        c = dict(entry["claim"])
        per_person = entry.get("per_person", case.get("per_person", False))
        row = dict(
            claim_id=f"{name}-c{i}",
            person_id=f"{name}-p{i if per_person else 0}",
            region=str(pol["region"]),
            scheme=pol["scheme"],
            settle_time=dt.datetime(int(pol["year"]), 3, 1) + dt.timedelta(days=i),
            locality="county",
            referred=False,
            age=40,
            identities=None,
            disease_code=None,
        )
        for k in CLAIM_AMOUNTS:
            row[k] = fen(c.pop(k, 0))
        row.update(c)
        rows.append(row)
    return rows


def expected(entry) -> dict:
    out = {}
    for k, v in entry["expect"].items():
        if k in MONEY_FIELDS:
            out[k] = fen(v)
        elif k == "layer_pays":
            out[k] = [(e["layer"], fen(e["pay"])) for e in v]
        else:
            out[k] = v
    return out


def got(result: dict, field: str):
    if field == "layer_pays":
        return [(e["layer"], e["pay"]) for e in result["layer_pays"]]
    return result[field]


def test_cases_file_is_not_empty():
    assert len(CASES) >= 4
    assert len({c["name"] for c in CASES}) == len(CASES)


@pytest.fixture(params=CASES, ids=[c["name"] for c in CASES])
def case(request):
    c = request.param
    p = engine.parse_policy(c["policy"], f"{c['policy']['id']}.yaml")
    table = claims_table(case_rows(c))
    return c, engine.PolicySet(policies=(p,)), table


def test_engine_matches_published(case):
    c, ps, table = case
    results = engine.settle(table, ps).results.to_pylist()
    assert len(results) == len(c["claims"])
    for i, (entry, r) in enumerate(zip(c["claims"], results)):
        assert r["status"] == "ok", f"{c['name']} claim {i}: status {r['status']}"
        assert r["claim_id"] == f"{c['name']}-c{i}"
        for field, want in expected(entry).items():
            assert got(r, field) == want, f"{c['name']} claim {i} {field}: engine {got(r, field)} != published {want}"


def test_reference_matches_published(case):
    c, ps, table = case
    results, _ = ref.settle(ps, table.to_pylist())
    for i, (entry, r) in enumerate(zip(c["claims"], results)):
        assert r["status"] == "ok"
        for field, want in expected(entry).items():
            assert got(r, field) == want, f"{c['name']} claim {i} {field}: reference {got(r, field)} != published {want}"


def test_engine_equals_reference_every_field(case):
    c, ps, table = case
    res = engine.settle(table, ps)
    ref_rows, ref_acc = ref.settle(ps, table.to_pylist())
    compare(res.results.to_pylist(), ref_rows, acc_from_table(res.accumulators), ref_acc)


def test_published_totals_are_consistent(case):
    """fund_pay_total is the sum of the fund columns and personal_pay the rest."""
    c, ps, table = case
    for r, row in zip(engine.settle(table, ps).results.to_pylist(), table.to_pylist()):
        funds = sum(r[f] for f in ref.FUND_COLUMNS.values())
        assert r["fund_pay_total"] == funds
        assert r["personal_pay"] == row["total_amount"] - funds
        assert sum(e["pay"] for e in r["layer_pays"]) == funds
