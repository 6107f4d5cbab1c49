"""The bundled seed policies (engine/policies/*.yaml) settle the seeds' rules.

Each test settles hand-built claims against `engine.load_policies()` (the
bundled folder) and checks a rule of the seed notices in numbers. Every
expected value is worked out by hand in the comment above it, from the policy
file's numbers (money in yuan there; the engine works in fen, so `y(…)` turns
yuan into fen). Rounding is half up on fen (SETTLEMENT.md section 1).

Files and seeds: see engine/policies/README.md.
"""
from __future__ import annotations

import datetime as dt
import os
import re
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

import engine

POLICY_DIR = Path(engine.__file__).resolve().parent / "policies"
REPO = Path(__file__).resolve().parents[2]
SEEDS = Path(os.environ.get("MEDSETTLE_SHARED", REPO.parent / "shared")) / "seeds"

EXPECTED = {
    # id: (region, scheme, year, seed file)
    "xinjiang-resident-2017": ("650000", "resident", 2017, "000_0a82b02c342d1275.txt"),
    "tibet-resident-2019": ("540000", "resident", 2019, "001_892e8363ca291314.txt"),
    "tibet-resident-2019-03-21": ("540000", "resident", 2019, "001_892e8363ca291314.txt"),
    "tibet-resident-2019-03-30": ("540000", "resident", 2019, "001_892e8363ca291314.txt"),
    "tibet-resident-2020": ("540000", "resident", 2020, "001_892e8363ca291314.txt"),
    "shuozhou-resident-2022": ("140600", "resident", 2022, "002_0f2c2e4dd98a157b.txt"),
    "shuozhou-resident-2023": ("140600", "resident", 2023, "002_0f2c2e4dd98a157b.txt"),
    "tianjin-employee-2017": ("120000", "employee", 2017, "003_6cf75a66e83a82f9.txt"),
    "tianjin-resident-2017": ("120000", "resident", 2017, "003_6cf75a66e83a82f9.txt"),
    "nanchong-employee-2017": ("511300", "employee", 2017, "004_9db848c0d513fb29.txt"),
    "nanchong-resident-2017": ("511300", "resident", 2017, "004_9db848c0d513fb29.txt"),
}

# The identity vocabulary shared by all files (README.md).
IDENTITY_NAMES = {"extreme_poverty", "low_income", "registered_poor", "poverty_returned",
                  "poverty_risk", "monitored", "farmer_herder"}

REGION = {"xinjiang": "650000", "tibet": "540000", "shuozhou": "140600", "tianjin": "120000",
          "nanchong": "511300"}


def y(yuan) -> int:
    """Yuan (int, str or float written with at most 2 decimals) -> fen, exactly."""
    return int(Decimal(str(yuan)) * 100)


# --------------------------------------------------------------------------- claims

_counter = [0]


def claim(where: str, year: int, *, scheme: str = "resident", visit: str = "inpatient",
          level: str = "secondary", locality: str = "county", referred: bool = False,
          in_scope=0, class_b=0, copay=0, self_funded=0, over_limit=0, code=None, age=45,
          ids=None, person=None, month: int = 3, day: int = 1, cid=None) -> dict:
    """One claim row (spec section 2); amounts in yuan, turned into fen here."""
    _counter[0] += 1
    n = _counter[0]
    row = dict(
        claim_id=cid or f"c{n:04d}",
        person_id=person or f"p{n:04d}",
        region=REGION[where],
        scheme=scheme,
        settle_time=dt.datetime(year, month, day, 10, 0),
        visit_type=visit,
        facility_level=level,
        locality=locality,
        referred=referred,
        disease_code=code,
        age=age,
        identities=ids,
        self_funded_amount=y(self_funded),
        over_limit_amount=y(over_limit),
        class_b_copay_amount=y(copay),
        in_scope_amount=y(in_scope),
        in_scope_class_b_amount=y(class_b),
    )
    row["total_amount"] = (row["self_funded_amount"] + row["over_limit_amount"]
                           + row["class_b_copay_amount"] + row["in_scope_amount"])
    return row


def table(rows: list[dict]) -> pa.Table:
    schema = engine.CLAIMS_SCHEMA
    return pa.Table.from_arrays([pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema],
                                schema=schema)


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies()


def settle(ps, *rows: dict) -> list[dict]:
    """Settle the rows in one call; results in input order, each checked for status ok."""
    res = engine.settle(table(list(rows)), ps)
    out = res.results.to_pylist()
    for r in out:
        assert r["status"] == "ok", r
        # section 5.3 totals hold on every row
        assert r["fund_pay_total"] == (r["basic_pay"] + r["supplementary_pay"] + r["critical_illness_pay"]
                                       + r["medical_aid_pay"] + r["guarantee_pay"])
    return out


def one(ps, row: dict) -> dict:
    return settle(ps, row)[0]


def pays(r: dict) -> dict:
    return {e["layer"]: e["pay"] for e in r["layer_pays"]}


# --------------------------------------------------------------------------- the files themselves


def test_bundled_folder_holds_the_seed_policies(ps):
    files = sorted(f.name for f in POLICY_DIR.glob("*.yaml"))
    assert files == sorted(f"{pid}.yaml" for pid in EXPECTED)
    assert sorted(p.id for p in ps.policies) == sorted(EXPECTED)
    for p in ps.policies:
        region, scheme, year, seed = EXPECTED[p.id]
        assert (p.region, p.scheme, p.year) == (region, scheme, year), p.id
        assert Path(p.path).name == f"{p.id}.yaml"
        assert p.title, p.id
        assert p.sources == (seed,), p.id
        assert set(p.identities) <= IDENTITY_NAMES, p.id
        assert p.layers[0].fund == "basic"


def test_sources_are_the_seed_files(ps):
    if not SEEDS.is_dir():
        pytest.skip(f"no seeds folder at {SEEDS}")
    for p in ps.policies:
        for s in p.sources:
            assert (SEEDS / s).is_file(), (p.id, s)


NUMBER = re.compile(r"(?<![A-Za-z0-9_])-?\d+(\.\d+)?(?![A-Za-z0-9_])")


@pytest.mark.parametrize("pid", sorted(EXPECTED))
def test_every_number_carries_its_source(pid):
    """Every line that sets a number (or an ICD range) says where it comes from:
    `# seed 00N: …` or `# assumed: …` on the same line."""
    for no, line in enumerate((POLICY_DIR / f"{pid}.yaml").read_text(encoding="utf-8").splitlines(), 1):
        code, _, comment = line.partition("#")
        key = code.strip().lstrip("- ").split(":")[0].strip()
        if not code.strip() or key in ("id", "title", "sources"):
            continue
        if NUMBER.search(code):
            assert re.search(r"seed 00\d|assumed", comment), f"{pid}.yaml:{no}: no source for {code.strip()!r}"


def test_every_visit_type_and_level_settles(ps):
    """No seed policy leaves a visit type / facility level without a rule
    (NO_BENEFIT_RULE); and the fund never pays more than the in-scope amount."""
    rows = []
    for pid, (region, scheme, year, _) in EXPECTED.items():
        where = pid.split("-")[0]
        for visit in ("inpatient", "outpatient", "chronic", "maternity"):
            for level in ("primary", "secondary", "tertiary"):
                rows.append(claim(where, year, scheme=scheme, visit=visit, level=level,
                                  in_scope=8000, class_b=1000, self_funded=500))
    for r in settle(ps, *rows):
        assert 0 <= r["fund_pay_total"] <= y(8000)
        assert r["personal_pay"] == y(8500) - r["fund_pay_total"]


# --------------------------------------------------------------------------- Nanchong (seed 004)


def test_nanchong_registered_poor_in_county_pays_nothing_in_scope(ps):
    # registered_poor, in-county secondary admission: in scope 20,000; self-funded 1,000,
    # class-B copay 500 (outside K) -> total 21,500.
    # basic: secondary 400 deductible removed in county (factor 0), 80% x 20,000 = 16,000
    # critical illness: base 4,000, deductible 10,000 x 0.5 = 5,000 -> 0
    # poverty_supplementary: 50% x 4,000 = 2,000
    # civil_assistance: 70% x (4,000 - 2,000) = 1,400
    # poverty_guarantee: max_personal_share 0 -> the last 600
    # compliant personal 0; personal = 1,000 + 500 = 1,500
    r = one(ps, claim("nanchong", 2017, in_scope=20000, self_funded=1000, copay=500,
                      ids=["registered_poor"]))
    assert r["identity"] == "registered_poor"
    assert r["deductible_applied"] == 0
    assert pays(r) == {"basic": y(16000), "poverty_supplementary": y(2000),
                       "civil_assistance": y(1400), "poverty_guarantee": y(600)}
    assert r["basic_pay"] == y(16000)
    assert r["critical_illness_pay"] == 0
    assert r["guarantee_pay"] == y(2600)
    assert r["medical_aid_pay"] == y(1400)
    assert r["compliant_personal_pay"] == 0
    assert r["personal_pay"] == y(1500)


def test_nanchong_registered_poor_outside_county_keeps_deductible_and_pays(ps):
    # the same admission in another province: no county rules.
    # basic: 80% x (20,000 - 400) = 15,680; deductible 400
    # critical illness: base 4,320 < 5,000 -> 0
    # supplementary 50% x 4,320 = 2,160; assistance 70% x 2,160 = 1,512
    # compliant personal 20,000 - 15,680 - 2,160 - 1,512 = 648
    r = one(ps, claim("nanchong", 2017, locality="province", in_scope=20000, ids=["registered_poor"]))
    assert r["deductible_applied"] == y(400)
    assert pays(r) == {"basic": y(15680), "poverty_supplementary": y(2160), "civil_assistance": y(1512)}
    assert r["compliant_personal_pay"] == y(648)


def test_nanchong_registered_poor_is_the_effective_identity(ps):
    # a person both 低保 and 建档立卡 is settled as registered_poor (ranked first, 就高不就低):
    # same numbers as the in-county case above.
    r = one(ps, claim("nanchong", 2017, in_scope=20000, ids=["low_income", "registered_poor"]))
    assert r["identity"] == "registered_poor"
    assert r["deductible_applied"] == 0
    assert r["compliant_personal_pay"] == 0


def test_nanchong_minor_with_leukaemia_or_heart_disease_at_100_percent(ps):
    # age 10, C92.0 (leukaemia), tertiary, in scope 50,000: 100%, no deductible -> 50,000
    # (the +5 of the 13 diseases also matches C92 and is clamped at 100%).
    # age 10, Q21.0 (congenital heart disease), secondary, 30,000 -> 30,000
    # age 18, C92.0, tertiary: not a minor -> 800 deductible, 60% + 5 = 65% x 49,200 = 31,980;
    #   critical illness: base 18,020 on the year axis, (18,020 - 10,000) x 55% = 4,411
    a, b, c = settle(ps,
                     claim("nanchong", 2017, level="tertiary", locality="region", age=10, code="C92.0",
                           in_scope=50000),
                     claim("nanchong", 2017, age=10, code="Q21.0", in_scope=30000),
                     claim("nanchong", 2017, level="tertiary", locality="region", age=18, code="C92.0",
                           in_scope=50000))
    assert a["basic_pay"] == y(50000) and a["compliant_personal_pay"] == 0 and a["deductible_applied"] == 0
    assert b["basic_pay"] == y(30000) and b["compliant_personal_pay"] == 0
    assert c["basic_pay"] == y(31980)
    assert c["critical_illness_pay"] == y(4411)
    assert c["compliant_personal_pay"] == y(50000 - 31980 - 4411)


def test_nanchong_thirteen_diseases_plus_5_points(ps):
    # secondary admission, in scope 10,000, deductible 400:
    # F20 (schizophrenia): (80% + 5) x 9,600 = 8,160; no listed disease: 80% x 9,600 = 7,680
    a, b = settle(ps, claim("nanchong", 2017, code="F20.0", in_scope=10000),
                  claim("nanchong", 2017, code="J18.9", in_scope=10000))
    assert a["basic_pay"] == y(8160)
    assert b["basic_pay"] == y(7680)


def test_nanchong_township_deductible_150_at_85_percent(ps):
    # primary (乡镇卫生院), in scope 5,000: 85% x (5,000 - 150) = 4,122.50, for both schemes
    a, b = settle(ps, claim("nanchong", 2017, level="primary", in_scope=5000),
                  claim("nanchong", 2017, scheme="employee", level="primary", in_scope=5000))
    for r in (a, b):
        assert r["deductible_applied"] == y(150)
        assert r["basic_pay"] == y("4122.50")


def test_nanchong_resident_pool_cap_160000(ps):
    # one person, tertiary, in scope 400,000 (no disease, no identity):
    # basic raw 60% x (400,000 - 800) = 239,520 -> capped at 160,000
    # critical illness: base 240,000 on the year axis: (50,000-10,000) x 55% = 22,000
    #   + 50,000 x 65% = 32,500 + 140,000 x 75% = 105,000 -> 159,500
    # a later secondary admission, 10,000: basic raw 80% x 9,600 = 7,680, nothing left -> 0;
    #   critical illness continues at 75%: 10,000 x 75% = 7,500
    a, b = settle(ps,
                  claim("nanchong", 2017, level="tertiary", locality="region", in_scope=400000,
                        person="nc-cap", month=3),
                  claim("nanchong", 2017, in_scope=10000, person="nc-cap", month=6))
    assert a["basic_pay"] == y(160000) and a["cap_hit"]
    assert a["critical_illness_pay"] == y(159500)
    assert a["compliant_personal_pay"] == y(400000 - 160000 - 159500)
    assert b["basic_pay"] == 0 and b["cap_hit"]
    assert b["critical_illness_pay"] == y(7500)


def test_nanchong_employee_pool_cap_280000(ps):
    # employee, tertiary, in scope 400,000: raw 80% x 399,200 = 319,360 -> capped at 280,000
    # 职工大额: base 120,000 on the year axis, 80% x (120,000 - 10,000) = 88,000
    r = one(ps, claim("nanchong", 2017, scheme="employee", level="tertiary", locality="region",
                      in_scope=400000))
    assert r["basic_pay"] == y(280000) and r["cap_hit"]
    assert r["supplementary_pay"] == y(88000)
    assert r["compliant_personal_pay"] == y(400000 - 280000 - 88000)


def test_nanchong_registered_poor_lower_critical_illness_deductible(ps):
    # tertiary, another province (no county rules), in scope 100,000:
    # basic 60% x (100,000 - 800) = 59,520; critical-illness base 40,480
    # poor: deductible 10,000 x 0.5 = 5,000 -> (40,480 - 5,000) x 55% = 19,514
    #   supplementary 50% x (40,480 - 19,514 = 20,966) = 10,483
    #   assistance 70% x 10,483 = 7,338.10
    #   compliant personal 100,000 - 59,520 - 19,514 - 10,483 - 7,338.10 = 3,144.90
    # not poor: (40,480 - 10,000) x 55% = 16,764
    poor, other = settle(ps,
                         claim("nanchong", 2017, level="tertiary", locality="province", in_scope=100000,
                               ids=["registered_poor"]),
                         claim("nanchong", 2017, level="tertiary", locality="province", in_scope=100000))
    assert poor["basic_pay"] == other["basic_pay"] == y(59520)
    assert poor["critical_illness_pay"] == y(19514)
    assert other["critical_illness_pay"] == y(16764)
    assert pays(poor)["poverty_supplementary"] == y(10483)
    assert poor["medical_aid_pay"] == y("7338.10")
    assert poor["compliant_personal_pay"] == y("3144.90")


def test_nanchong_eleven_chronic_diseases_personal_share_at_most_10_percent(ps):
    # registered_poor, 门诊慢病 I10 (hypertension) outside the county, in scope 2,000,
    # self-funded 300: basic chronic 65% = 1,300; critical illness base 700 < 5,000 -> 0;
    # (supplementary and assistance are inpatient only); guarantee keeps the patient at
    # 10% x 2,000 = 200 -> pays 700 - 200 = 500. Personal = 200 + 300 = 500.
    # Not poor: 1,300 only, 700 left on the patient.
    poor, other = settle(ps,
                         claim("nanchong", 2017, visit="chronic", locality="region", code="I10",
                               in_scope=2000, self_funded=300, ids=["registered_poor"]),
                         claim("nanchong", 2017, visit="chronic", locality="region", code="I10",
                               in_scope=2000, self_funded=300))
    assert poor["basic_pay"] == other["basic_pay"] == y(1300)
    assert pays(poor) == {"basic": y(1300), "poverty_guarantee": y(500)}
    assert poor["compliant_personal_pay"] == y(200)
    assert poor["personal_pay"] == y(500)
    assert other["compliant_personal_pay"] == y(700)


def test_nanchong_21_major_diseases_outpatient_get_inpatient_benefits(ps):
    # registered_poor, 门诊 N18.5 (end-stage renal disease, also one of the 13 diseases),
    # secondary, in county, in scope 3,000: inpatient ratio of the level 80% + 5 = 85% -> 2,550;
    # in county the zero-pay guarantee takes the remaining 450.
    # Not poor: ordinary chronic 65% + 5 = 70% -> 2,100.
    poor, other = settle(ps,
                         claim("nanchong", 2017, visit="chronic", code="N18.5", in_scope=3000,
                               ids=["registered_poor"]),
                         claim("nanchong", 2017, visit="chronic", code="N18.5", in_scope=3000))
    assert poor["basic_pay"] == y(2550)
    assert poor["guarantee_pay"] == y(450)
    assert poor["compliant_personal_pay"] == 0
    assert other["basic_pay"] == y(2100)


def test_nanchong_outpatient_only_at_primary_level(ps):
    # 门诊统筹 at 村级/社区 (primary): 50% of 300 = 150, capped at the 100 yearly limit;
    # at a secondary hospital the pool pays nothing (status ok).
    a, b = settle(ps, claim("nanchong", 2017, visit="outpatient", level="primary", in_scope=300),
                  claim("nanchong", 2017, visit="outpatient", level="secondary", in_scope=300))
    assert a["basic_pay"] == y(100) and a["cap_hit"]
    assert b["fund_pay_total"] == 0


# --------------------------------------------------------------------------- Tibet (seed 001)


@pytest.mark.parametrize("year", [2019, 2020])
def test_tibet_maternity_100_percent(ps, year):
    # 农牧民 住院分娩, in scope 6,000, self-funded 500: 100% of the in-scope amount, no deductible
    # (in April: the 2019 plan is in force from March 21)
    r = one(ps, claim("tibet", year, visit="maternity", in_scope=6000, self_funded=500, ids=["farmer_herder"],
                      month=4))
    assert r["basic_pay"] == y(6000)
    assert r["deductible_applied"] == 0
    assert r["compliant_personal_pay"] == 0
    assert r["personal_pay"] == y(500)
    assert r["identity"] == "farmer_herder"
    # another resident's delivery is paid as an admission at a 县级 (secondary) hospital:
    # 85% x (6,000 - 300) = 4,845
    r = one(ps, claim("tibet", year, visit="maternity", in_scope=6000, self_funded=500, month=4))
    assert r["basic_pay"] == y(4845) and r["deductible_applied"] == y(300)


def test_tibet_newborn_rescue_100_percent(ps):
    # age 0, P07.3 (preterm), a farmer's or herder's child, tertiary, in scope 30,000 -> 30,000
    r = one(ps, claim("tibet", 2020, level="tertiary", age=0, code="P07.3", in_scope=30000, ids=["farmer_herder"]))
    assert r["basic_pay"] == y(30000) and r["compliant_personal_pay"] == 0
    # another newborn: an admission, 75% x (30,000 - 800) = 21,900
    r = one(ps, claim("tibet", 2020, level="tertiary", age=0, code="P07.3", in_scope=30000))
    assert r["basic_pay"] == y(21900)


@pytest.mark.parametrize("year", [2019, 2020])
def test_tibet_poor_plus_5_points_and_assistance_70_percent(ps, year):
    # secondary admission, in scope 10,000, deductible 300:
    # (in April 2019: the plan without 全兜底 is in force from March 30)
    # registered_poor: (85% + 5) x 9,700 = 8,730; critical illness base 1,270 < 4,000 -> 0;
    #   assistance 70% x 1,270 = 889; major-illness assistance: 381 < 5,000 -> 0
    #   compliant personal 10,000 - 8,730 - 889 = 381
    # no identity: 85% x 9,700 = 8,245
    poor, other = settle(ps, claim("tibet", year, in_scope=10000, ids=["registered_poor"], month=4),
                         claim("tibet", year, in_scope=10000, month=4))
    assert poor["basic_pay"] == y(8730)
    assert poor["critical_illness_pay"] == 0
    assert poor["medical_aid_pay"] == y(889)
    assert poor["compliant_personal_pay"] == y(381)
    assert other["basic_pay"] == y(8245)
    assert other["medical_aid_pay"] == 0


@pytest.mark.parametrize("year", [2019, 2020])
def test_tibet_assistance_limits_100000_and_200000(ps, year):
    # extreme_poverty, tertiary, in scope 1,000,000, in April (the plan of 2019-03-21 raised the
    # limits for 2019 and 2020 alike):
    # basic raw (75% + 5) x 999,200 = 799,360 -> pool cap 150,000
    # critical illness: base 850,000, deductible 8,000 x 0.5 = 4,000, ratios + 5:
    #   46,000 x 65% = 29,900 + 50,000 x 75% = 37,500 + 750,000 x 85% = 637,500 = 704,900
    #   -> cap 300,000
    # assistance: 70% x 550,000 = 385,000 -> ordinary limit 100,000
    # major-illness assistance: 70% x (450,000 - 5,000) = 311,500 -> limit 200,000
    # compliant personal 1,000,000 - 150,000 - 300,000 - 300,000 = 250,000
    r = one(ps, claim("tibet", year, level="tertiary", locality="national", in_scope=1000000,
                      ids=["extreme_poverty"], month=4))
    assert r["identity"] == "extreme_poverty"
    assert pays(r) == {"basic": y(150000), "critical_illness": y(300000), "assistance": y(100000),
                       "major_illness_assistance": y(200000)}
    assert r["medical_aid_pay"] == y(300000)
    assert r["cap_hit"]
    assert r["compliant_personal_pay"] == y(250000)


def test_tibet_no_full_guarantee_layer_from_2019_03_30(ps):
    # seed 001 orders 全兜底 ended by 2019-03-30: from then no Tibet layer takes the patient's
    # share to 0; the versions before it have the full-guarantee layer (a test in
    # test_revision_seeds.py settles a claim on each side)
    for pid in ("tibet-resident-2019-03-30", "tibet-resident-2020"):
        p = ps.by_id(pid)
        assert all(r.kind != "max_personal_share" for L in p.layers for r in L.rules)
    for pid in ("tibet-resident-2019", "tibet-resident-2019-03-21"):
        assert ps.by_id(pid).layers[-1].name == "full_guarantee"
    assert [p.id for p in ps.versions("540000", "resident", 2019)] == [
        "tibet-resident-2019", "tibet-resident-2019-03-21", "tibet-resident-2019-03-30"]
    assert [str(p.effective_from) for p in ps.versions("540000", "resident", 2019)] == [
        "2019-01-01", "2019-03-21", "2019-03-30"]


# --------------------------------------------------------------------------- Shuozhou (seed 002)


@pytest.mark.parametrize("year, limit", [(2022, 230), (2023, 250)])
def test_shuozhou_outpatient_class_ratios_and_yearly_limit(ps, year, limit):
    # 普通门诊: class A 55%, class B 45%, no deductible.
    # in scope 200 of which class B 80: 55% x 120 + 45% x 80 = 66 + 36 = 102
    # then in scope 1,000 of which class B 400: 55% x 600 + 45% x 400 = 510 -> the rest of the
    # yearly limit: 230 - 102 = 128 (2022) / 250 - 102 = 148 (2023)
    a, b = settle(ps,
                  claim("shuozhou", year, visit="outpatient", level="primary", in_scope=200, class_b=80,
                        person=f"sz-op-{year}", month=2),
                  claim("shuozhou", year, visit="outpatient", level="primary", in_scope=1000, class_b=400,
                        person=f"sz-op-{year}", month=5))
    assert a["basic_pay"] == y(102) and not a["cap_hit"]
    assert b["basic_pay"] == y(limit - 102) and b["cap_hit"]


def test_shuozhou_hypertension_diabetes_outpatient_drugs_without_deductible(ps):
    # I10 outpatient, in scope 100: 60%, no deductible -> 60 (never below the general rule's 55% / 45%)
    # then E11 outpatient, in scope 600: 60% = 360 -> 300 - 60 = 240 left of the 300 limit
    a, b = settle(ps,
                  claim("shuozhou", 2022, visit="outpatient", level="primary", code="I10", in_scope=100,
                        person="sz-2d", month=2),
                  claim("shuozhou", 2022, visit="outpatient", level="primary", code="E11.9", in_scope=600,
                        person="sz-2d", month=4))
    assert a["deductible_applied"] == 0 and a["basic_pay"] == y(60)
    assert b["basic_pay"] == y(240) and b["cap_hit"]


def test_shuozhou_in_county_inpatient_75_percent(ps):
    # county (secondary) hospital, in scope 10,500: 75% x (10,500 - 500) = 7,500;
    # critical illness: 3,000 < 15,000 -> 0
    r = one(ps, claim("shuozhou", 2022, in_scope=10500))
    assert r["deductible_applied"] == y(500)
    assert r["basic_pay"] == y(7500)
    assert r["critical_illness_pay"] == 0


def test_shuozhou_chronic_self_pay_counts_toward_critical_illness(ps):
    # one person: 门诊慢特病 20,000 then an admission of 40,000 (secondary)
    # chronic: basic 65% x (20,000 - 600) = 12,610; critical illness axis [0, 7,390) < 15,000 -> 0
    # admission: basic 75% x 39,500 = 29,625; critical illness axis [7,390, 17,765):
    #   (17,765 - 15,000) x 60% = 1,659
    # the same admission alone would leave 10,375 < 15,000 -> 0
    a, b, c = settle(ps,
                     claim("shuozhou", 2022, visit="chronic", in_scope=20000, person="sz-ci", month=2),
                     claim("shuozhou", 2022, in_scope=40000, person="sz-ci", month=5),
                     claim("shuozhou", 2022, in_scope=40000, person="sz-ci-alone", month=5))
    assert a["basic_pay"] == y(12610) and a["critical_illness_pay"] == 0
    assert b["basic_pay"] == y(29625)
    assert b["critical_illness_pay"] == y(1659)
    assert c["critical_illness_pay"] == 0


def test_shuozhou_monitored_assistance_above_10_percent_of_income(ps):
    # monitored, county secondary admission, in scope 30,000:
    # basic 75% x 29,500 = 22,125; critical illness: 7,875 < 15,000 -> 0
    # assistance: 70% above 2,742.60 (10% of the 2021 provincial per-capita income):
    #   (7,875 - 2,742.60) x 70% = 3,592.68
    # tilted assistance: 4,282.32 < 5,000 -> 0
    r = one(ps, claim("shuozhou", 2022, in_scope=30000, ids=["monitored"]))
    assert r["identity"] == "monitored"
    assert r["basic_pay"] == y(22125)
    assert r["medical_aid_pay"] == y("3592.68")
    assert r["compliant_personal_pay"] == y("4282.32")


def test_shuozhou_monitored_2023_threshold(ps):
    # same admission in 2023: threshold 2,917.80 -> (7,875 - 2,917.80) x 70% = 3,470.04
    r = one(ps, claim("shuozhou", 2023, in_scope=30000, ids=["monitored"]))
    assert r["medical_aid_pay"] == y("3470.04")


def test_shuozhou_assistance_limit_60000_shared_by_outpatient_and_inpatient(ps):
    # monitored, referred to a tertiary hospital in the city outside the county, in scope 500,000:
    # basic: 1,000 deductible, 19,000 x 60% = 11,400 + 480,000 x 65% = 312,000 = 323,400
    #   -> pool cap 200,000
    # critical illness: base 300,000: 35,000 x 60% = 21,000 + 50,000 x 70% = 35,000
    #   + 200,000 x 80% = 160,000 -> 216,000
    # assistance: base 84,000: (84,000 - 2,742.60) x 70% = 56,880.18
    # tilted assistance (referred, in the city): base 27,119.82, (27,119.82 - 5,000) x 60%
    #   = 13,271.892 -> 13,271.89
    # then a 门诊慢特病 claim of 30,000 (secondary):
    #   basic: pool exhausted -> 0 (cap hit); critical illness [300,000, 330,000) x 80% = 24,000
    #   assistance on the shared axis [84,000, 90,000) x 70% = 4,200 -> only
    #   60,000 - 56,880.18 = 3,119.82 of the shared limit is left
    a, b = settle(ps,
                  claim("shuozhou", 2022, level="tertiary", locality="region", referred=True,
                        in_scope=500000, ids=["monitored"], person="sz-mon", month=3),
                  claim("shuozhou", 2022, visit="chronic", in_scope=30000, ids=["monitored"],
                        person="sz-mon", month=8))
    assert a["basic_pay"] == y(200000) and a["cap_hit"]
    assert a["critical_illness_pay"] == y(216000)
    assert a["medical_aid_pay"] == y("56880.18")
    assert a["guarantee_pay"] == y("13271.89")
    assert a["compliant_personal_pay"] == y("13847.93")
    assert b["basic_pay"] == 0 and b["cap_hit"]
    assert b["critical_illness_pay"] == y(24000)
    assert b["medical_aid_pay"] == y("3119.82")
    assert a["medical_aid_pay"] + b["medical_aid_pay"] == y(60000)
    assert b["compliant_personal_pay"] == y("2880.18")


def test_shuozhou_critical_illness_tilt_for_extreme_poverty(ps):
    # extreme_poverty, secondary, in scope 60,000:
    # basic 75% x 59,500 = 44,625; critical illness base 15,375 on the year axis,
    #   deductible 15,000 x 0.5 = 7,500, (60% + 5) -> (15,375 - 7,500) x 65% = 5,118.75
    # assistance 80% x (15,375 - 5,118.75 = 10,256.25) = 8,205
    # tilted assistance (county): base 2,051.25 < 5,000 -> 0
    r = one(ps, claim("shuozhou", 2022, in_scope=60000, ids=["extreme_poverty", "monitored"]))
    assert r["identity"] == "extreme_poverty"
    assert r["basic_pay"] == y(44625)
    assert r["critical_illness_pay"] == y("5118.75")
    assert r["medical_aid_pay"] == y(8205)
    assert r["compliant_personal_pay"] == y("2051.25")


# --------------------------------------------------------------------------- Xinjiang (seed 000)


@pytest.mark.parametrize("who", ["registered_poor", "extreme_poverty", "low_income"])
def test_xinjiang_critical_illness_deductible_60_percent_plus_5_points(ps, who):
    # tertiary, in the region, in scope 100,000 (no listed disease):
    # basic 65% x (100,000 - 600) = 64,610; critical-illness base 35,390
    # poor / 五保 / 低保: deductible 12,000 x 0.6 = 7,200, 55% + 5 = 60%:
    #   (35,390 - 7,200) x 60% = 16,914
    r = one(ps, claim("xinjiang", 2017, level="tertiary", locality="region", in_scope=100000, ids=[who]))
    assert r["basic_pay"] == y(64610)
    assert r["critical_illness_pay"] == y(16914)
    # assistance: 五保 90%, 低保 / 建档立卡 70% of 35,390 - 16,914 = 18,476
    assert r["medical_aid_pay"] == (y("16628.40") if who == "extreme_poverty" else y("12933.20"))


def test_xinjiang_critical_illness_standard(ps):
    # no identity: (35,390 - 12,000) x 55% = 12,864.50
    r = one(ps, claim("xinjiang", 2017, level="tertiary", locality="region", in_scope=100000))
    assert r["critical_illness_pay"] == y("12864.50")
    assert r["medical_aid_pay"] == 0


def test_xinjiang_22_major_diseases_and_delivery(ps):
    # C50 (breast cancer) at a tertiary hospital, in scope 50,000: 70%, no deductible -> 35,000
    # a delivery (住院分娩) at a primary hospital, in scope 3,000: 90% x (3,000 - 100) = 2,610
    a, b = settle(ps,
                  claim("xinjiang", 2017, level="tertiary", code="C50.9", in_scope=50000),
                  claim("xinjiang", 2017, visit="maternity", level="primary", in_scope=3000))
    assert a["basic_pay"] == y(35000) and a["deductible_applied"] == 0
    assert b["basic_pay"] == y(2610)


# --------------------------------------------------------------------------- Tianjin (seed 003)


def test_tianjin_maternity_per_birth(ps):
    # 按产次付费: resident 2,280, employee 3,800 (in scope 5,000, self-funded 200);
    # nothing else pays a birth: resident personal 5,200 - 2,280 = 2,920
    # an in-scope amount below the quota is paid in full: 2,000 -> 2,000
    res, emp, small = settle(ps,
                             claim("tianjin", 2017, visit="maternity", in_scope=5000, self_funded=200),
                             claim("tianjin", 2017, scheme="employee", visit="maternity", in_scope=5000,
                                   self_funded=200),
                             claim("tianjin", 2017, visit="maternity", in_scope=2000))
    assert res["basic_pay"] == res["fund_pay_total"] == y(2280)
    assert res["personal_pay"] == y(2920)
    assert res["compliant_personal_pay"] == y(2720)
    assert emp["basic_pay"] == emp["fund_pay_total"] == y(3800)
    assert small["basic_pay"] == y(2000)
    # 2,280 is 60% of the employees' 3,800 (seed 003)
    assert y(2280) * 10 == y(3800) * 6


def test_tianjin_resident_outpatient_scope_and_yearly_deductible(ps):
    # 门急诊 at primary/secondary: yearly deductible 500, then 50%.
    # 300 -> all deductible; then 600 -> (900 - 500) x 50% = 200; tertiary -> 0
    a, b, c = settle(ps,
                     claim("tianjin", 2017, visit="outpatient", level="primary", in_scope=300,
                           person="tj-op", month=2),
                     claim("tianjin", 2017, visit="outpatient", level="secondary", in_scope=600,
                           person="tj-op", month=3),
                     claim("tianjin", 2017, visit="outpatient", level="tertiary", in_scope=600,
                           person="tj-op", month=4))
    assert a["basic_pay"] == 0 and a["deductible_applied"] == y(300)
    assert b["basic_pay"] == y(200) and b["deductible_applied"] == y(200)
    assert c["basic_pay"] == 0


def test_tianjin_resident_one_stop_assistance(ps):
    # 低保, secondary admission, in scope 20,000: basic 65% x 19,200 = 12,480;
    # critical illness 7,520 < 15,000 -> 0; assistance 70% x 7,520 = 5,264
    r = one(ps, claim("tianjin", 2017, in_scope=20000, ids=["low_income"]))
    assert pays(r) == {"basic": y(12480), "assistance": y(5264)}
    assert r["compliant_personal_pay"] == y(20000 - 12480 - 5264)
