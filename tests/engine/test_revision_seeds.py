"""The seed policies checked against their notices (issue 14), in the reference.

Each case settles the claim a notice describes against the bundled policies
(engine/policies/) and checks the amounts worked out by hand in the comments
(yuan; `y()` turns them into fen). The same cases run through `engine.settle`
in test_revision_engine.py.
"""
from __future__ import annotations

import datetime as dt

import pytest

import engine
import reference as ref
from test_revision import Case, check, reference_rows
from test_seed_policies import claim, y

SEED_CASES = {}


def case(fn):
    SEED_CASES[fn.__name__] = fn
    return fn


def bundled():
    return engine.load_policies()


# ============================================================== deliveries keep the poverty measures


@case
def nanchong_poor_delivery_in_county_pays_nothing_like_an_admission():
    # registered_poor, county (secondary) hospital, in scope 5,000, a delivery and an admission:
    # basic: deductible 400 waived in county (x 0), 80% x 5,000 = 4,000
    # critical illness: base 1,000 < 10,000 x 0.5 -> 0
    # poverty supplementary 50% x 1,000 = 500; civil assistance 70% x 500 = 350;
    # zero personal pay in county: the last 150.
    # (Before: the delivery matched none of the poverty measures: 400 + 20% x 4,600 = 1,320 left.)
    pays = {"basic": y(4000), "poverty_supplementary": y(500), "civil_assistance": y(350),
            "poverty_guarantee": y(150)}
    claims = [claim("nanchong", 2017, visit="maternity", in_scope=5000, ids=["registered_poor"], cid="delivery"),
              claim("nanchong", 2017, visit="inpatient", in_scope=5000, ids=["registered_poor"], cid="admission")]
    expect = {cid: dict(status="ok", deductible_applied=0, compliant_personal_pay=0, layer_pays=list(pays.items()))
              for cid in ("delivery", "admission")}
    return Case(bundled(), claims, expect)


@case
def xinjiang_poor_delivery_gets_assistance():
    # low_income, county (secondary) delivery, in scope 5,000: basic 80% x (5,000 - 300) = 3,760;
    # critical illness: 1,240 < 12,000 x 0.6 -> 0; assistance 70% x 1,240 = 868 (before: 0).
    claims = [claim("xinjiang", 2017, visit="maternity", in_scope=5000, ids=["low_income"], cid="d")]
    return Case(bundled(), claims, {"d": dict(basic_pay=y(3760), medical_aid_pay=y(868),
                                              compliant_personal_pay=y(372))})


@case
def tibet_delivery_at_100_percent_for_farmers_and_herders_only():
    # April 2020, county (secondary) hospital, in scope 6,000:
    # farmer_herder: 100%, no deductible -> 6,000
    # another resident: an admission, 85% x (6,000 - 300) = 4,845
    # registered_poor (not a farmer): an admission with the poor's +5: 90% x 5,700 = 5,130;
    #   critical illness: 300 + 570 = 870 < 4,000 -> 0; assistance 70% x 870 = 609
    claims = [claim("tibet", 2020, visit="maternity", in_scope=6000, ids=["farmer_herder"], month=4, cid="farmer"),
              claim("tibet", 2020, visit="maternity", in_scope=6000, month=4, cid="other"),
              claim("tibet", 2020, visit="maternity", in_scope=6000, ids=["registered_poor"], month=4, cid="poor"),
              claim("tibet", 2020, visit="maternity", in_scope=6000, ids=["registered_poor", "farmer_herder"],
                    month=4, cid="poor_farmer")]
    expect = {
        "farmer": dict(identity="farmer_herder", basic_pay=y(6000), deductible_applied=0, compliant_personal_pay=0),
        "other": dict(identity=None, basic_pay=y(4845), deductible_applied=y(300)),
        "poor": dict(identity="registered_poor", basic_pay=y(5130), medical_aid_pay=y(609)),
        # a poor farmer: effective identity registered_poor (ranked first), the farmers' rule by `holds`
        "poor_farmer": dict(identity="registered_poor", basic_pay=y(6000), medical_aid_pay=0,
                            compliant_personal_pay=0),
    }
    return Case(bundled(), claims, expect)


# ============================================================== employees with assistance identities


@case
def tianjin_employee_with_an_assistance_identity_is_settled_and_assisted():
    # employee, secondary, in scope 20,000: basic 88% x (20,000 - 1,300) = 16,456;
    # large amount: 3,544 below its yearly threshold of 28,000 -> 0
    # low_income: 城乡医疗救助 70% x 3,544 = 2,480.80 (before: UNKNOWN_IDENTITY, basic included)
    claims = [claim("tianjin", 2017, scheme="employee", in_scope=20000, ids=["low_income"], cid="low"),
              claim("tianjin", 2017, scheme="employee", in_scope=20000, cid="none")]
    expect = {"low": dict(status="ok", identity="low_income", basic_pay=y(16456), supplementary_pay=0,
                          medical_aid_pay=y("2480.80"), compliant_personal_pay=y("1063.20")),
              "none": dict(status="ok", basic_pay=y(16456), medical_aid_pay=0, compliant_personal_pay=y(3544))}
    return Case(bundled(), claims, expect)


@case
def tianjin_employee_large_amount_above_the_pool():
    # employee, tertiary, in scope 300,000: basic 85% x 298,300 = 253,555 -> pool cap 150,000
    # large amount (大额): base 150,000 on the year axis, threshold 28,000: 75% x 122,000 = 91,500
    # then a second admission of 100,000 in the year: basic pool exhausted -> 0;
    # large amount [150,000, 250,000) x 75% = 75,000 -> 300,000 - 91,500 = 208,500 left: 75,000
    claims = [claim("tianjin", 2017, scheme="employee", level="tertiary", in_scope=300000, person="tj", cid="a"),
              claim("tianjin", 2017, scheme="employee", level="tertiary", in_scope=100000, person="tj", month=9,
                    cid="b")]
    expect = {"a": dict(basic_pay=y(150000), supplementary_pay=y(91500), cap_hit=True,
                        compliant_personal_pay=y(58500)),
              "b": dict(basic_pay=0, supplementary_pay=y(75000), cap_hit=True, compliant_personal_pay=y(25000))}
    return Case(bundled(), claims, expect)


@case
def nanchong_employee_with_an_assistance_identity():
    # employee, county (secondary), in scope 20,000:
    # registered_poor: deductible waived, 82% x 20,000 = 16,400; large amount 3,600 < 10,000 -> 0;
    #   civil assistance 70% x 3,600 = 2,520; zero pay in county: 1,080
    # low_income: 82% x 19,600 = 16,072; civil assistance 70% x 3,928 = 2,749.60
    claims = [claim("nanchong", 2017, scheme="employee", in_scope=20000, ids=["registered_poor"], cid="poor"),
              claim("nanchong", 2017, scheme="employee", in_scope=20000, ids=["low_income"], cid="low")]
    expect = {"poor": dict(status="ok", basic_pay=y(16400), medical_aid_pay=y(2520), guarantee_pay=y(1080),
                           compliant_personal_pay=0, deductible_applied=0),
              "low": dict(status="ok", basic_pay=y(16072), medical_aid_pay=y("2749.60"), guarantee_pay=0,
                          compliant_personal_pay=y("1178.40"))}
    return Case(bundled(), claims, expect)


# ============================================================== Shuozhou: one-stop in the city, 两病


@case
def shuozhou_assistance_only_in_the_city():
    # low_income, secondary, in scope 30,000, referred: basic 75% x 29,500 = 22,125;
    # critical illness 7,875 on the year axis, deductible 7,500, 65%: 243.75
    # in the city (county or region): assistance 70% x 7,631.25 = 5,341.875 -> 5,341.88;
    #   tilted assistance: 2,289.37 < 5,000 -> 0
    # elsewhere in the province: no one-stop assistance: 7,631.25 left
    mk = lambda cid, loc: claim("shuozhou", 2022, in_scope=30000, ids=["low_income"], locality=loc,  # noqa: E731
                                referred=True, cid=cid)
    claims = [mk("county", "county"), mk("region", "region"), mk("province", "province"), mk("national", "national")]
    inside = dict(basic_pay=y(22125), critical_illness_pay=y("243.75"), medical_aid_pay=y("5341.88"),
                  compliant_personal_pay=y("2289.37"))
    outside = dict(basic_pay=y(22125), critical_illness_pay=y("243.75"), medical_aid_pay=0, guarantee_pay=0,
                   compliant_personal_pay=y("7631.25"))
    return Case(bundled(), claims, {"county": inside, "region": inside, "province": outside, "national": outside})


@case
def shuozhou_tilted_assistance_for_referred_care_in_the_city_only():
    # monitored, referred, tertiary, in scope 100,000, region vs province:
    # basic: 60% x 19,000 = 11,400 + 65% x 80,000 = 52,000 -> 63,400
    # critical illness: base 36,600: 60% x 21,600 = 12,960
    # in the city: assistance (23,640 - 2,742.60) x 70% = 14,628.18;
    #   tilted (9,011.82 - 5,000) x 60% = 2,407.092 -> 2,407.09; personal 6,604.73
    # in the province outside the city: neither: 23,640 left
    mk = lambda cid, loc: claim("shuozhou", 2022, level="tertiary", in_scope=100000, ids=["monitored"],  # noqa
                                locality=loc, referred=True, cid=cid)
    claims = [mk("region", "region"), mk("province", "province")]
    expect = {"region": dict(basic_pay=y(63400), critical_illness_pay=y(12960), medical_aid_pay=y("14628.18"),
                             guarantee_pay=y("2407.09"), compliant_personal_pay=y("6604.73")),
              "province": dict(basic_pay=y(63400), critical_illness_pay=y(12960), medical_aid_pay=0,
                               guarantee_pay=0, compliant_personal_pay=y(23640))}
    return Case(bundled(), claims, expect)


@case
def shuozhou_two_diseases_never_below_the_general_outpatient_rule():
    # primary outpatient, in scope 100 of which class B 40:
    # hypertension (I10): 60% x 100 = 60
    # no listed disease: class A 55% x 60 = 33 + class B 45% x 40 = 18 = 51
    claims = [claim("shuozhou", 2022, visit="outpatient", level="primary", code="I10", in_scope=100, class_b=40,
                    cid="two"),
              claim("shuozhou", 2022, visit="outpatient", level="primary", in_scope=100, class_b=40, cid="general")]
    return Case(bundled(), claims, {"two": dict(basic_pay=y(60)), "general": dict(basic_pay=y(51))})


# ============================================================== new format: versions and cap adjustments


@case
def shuozhou_low_income_from_june_keeps_one_critical_illness_position():
    # tertiary, county, in scope 100,000, in March (no identity) and July (low income from June):
    # basic each time: 60% x 19,000 = 11,400 + 65% x 80,000 = 52,000 -> 63,400; CI base 36,600
    # March: critical illness [0, 36,600), deductible 15,000: 60% x 21,600 = 12,960
    # July: one rule, one position: [36,600, 73,200); the halved deductible 7,500 lies below it;
    #   +5 points: 65% x 13,400 = 8,710 + 75% x 23,200 = 17,400 -> 26,110, uncapped
    #   (revision 1's second rule on its own position charged 7,500 again: 18,915)
    #   assistance (low income, in the city) 70% x 10,490 = 7,343; tilted: 3,147 < 5,000 -> 0
    # extreme_poverty, in scope 2,000,000: basic capped at 200,000; critical illness base
    #   1,800,000, deductible 7,500: 65% x 42,500 = 27,625 + 75% x 50,000 = 37,500
    #   + 85% x 1,700,000 = 1,445,000 -> 1,510,125, above the 400,000 cap: no cap for the poor
    mk = lambda cid, person, month, ids, amount: claim("shuozhou", 2022, level="tertiary", in_scope=amount,  # noqa
                                                       person=person, month=month, ids=ids, cid=cid)
    claims = [mk("march", "sz", 3, None, 100000), mk("july", "sz", 7, ["low_income"], 100000),
              mk("poor", "sz-poor", 5, ["extreme_poverty"], 2000000)]
    expect = {"march": dict(basic_pay=y(63400), critical_illness_pay=y(12960), medical_aid_pay=0, cap_hit=False),
              "july": dict(identity="low_income", basic_pay=y(63400), critical_illness_pay=y(26110),
                           medical_aid_pay=y(7343), guarantee_pay=0, compliant_personal_pay=y(3147),
                           cap_hit=False),
              "poor": dict(basic_pay=y(200000), critical_illness_pay=y(1510125), cap_hit=True)}
    key = ("sz", "140600", "resident", 2022)
    acc = {key: (2, y(200000), {("basic", "pool"): (0, y(126800), y(2000)),
                                ("critical_illness", "year"): (y(73200), y(39070), y(15000)),
                                ("assistance", "year"): (y(10490), y(7343), 0),
                                ("tilted_assistance", "year"): (y(3147), 0, y(3147))})}
    return Case(bundled(), claims, expect, acc)


@case
def tibet_2019_versions_by_settle_date():
    # registered_poor, county (secondary), in scope 10,000, on each side of March 21 and 30:
    # basic (85% + 5) x 9,700 = 8,730; critical illness 1,270 < 4,000 -> 0;
    # assistance 70% x 1,270 = 889; major-illness assistance 381 < 5,000 -> 0
    # before March 30 the full guarantee (全兜底) pays the last 381; from March 30 nothing does.
    mk = lambda cid, when: claim("tibet", 2019, in_scope=10000, ids=["registered_poor"], cid=cid)  # noqa: E731
    rows = []
    for cid, when in (("mar20", dt.datetime(2019, 3, 20, 23, 59, 59)), ("mar21", dt.datetime(2019, 3, 21)),
                      ("mar29", dt.datetime(2019, 3, 29, 18)), ("mar30", dt.datetime(2019, 3, 30)),
                      ("dec31", dt.datetime(2019, 12, 31, 23))):
        row = mk(cid, when)
        row["settle_time"] = when
        rows.append(row)
    common = dict(basic_pay=y(8730), critical_illness_pay=0, medical_aid_pay=y(889))
    guaranteed = dict(common, guarantee_pay=y(381), compliant_personal_pay=0)
    plan = dict(common, guarantee_pay=0, compliant_personal_pay=y(381))
    expect = {"mar20": dict(guaranteed, policy_id="tibet-resident-2019"),
              "mar21": dict(guaranteed, policy_id="tibet-resident-2019-03-21"),
              "mar29": dict(guaranteed, policy_id="tibet-resident-2019-03-21"),
              "mar30": dict(plan, policy_id="tibet-resident-2019-03-30"),
              "dec31": dict(plan, policy_id="tibet-resident-2019-03-30")}
    return Case(bundled(), rows, expect)


@case
def tibet_2019_old_assistance_limits_then_the_raised_ones():
    # extreme_poverty, tertiary, national, in scope 1,000,000 on February 1 (before the plan):
    #   basic capped at 150,000; critical illness capped at 300,000;
    #   assistance 70% x 550,000 = 385,000 -> old limit 60,000;
    #   major-illness assistance 70% x (490,000 - 5,000) = 339,500 -> old limit 150,000;
    #   全兜底: the last 340,000
    # the same person on April 10 (the plan), in scope 100,000: basic and critical illness
    #   capped (0); assistance [550,000, 650,000) x 70% = 70,000 -> the raised limit 100,000
    #   leaves 40,000; major-illness [490,000, 550,000) x 70% = 42,000 (200,000 - 150,000 left);
    #   no full guarantee: 18,000 left on the patient
    feb = claim("tibet", 2019, level="tertiary", locality="national", in_scope=1000000, ids=["extreme_poverty"],
                person="tb", month=2, cid="feb")
    apr = claim("tibet", 2019, level="tertiary", locality="national", in_scope=100000, ids=["extreme_poverty"],
                person="tb", month=4, day=10, cid="apr")
    expect = {"feb": dict(policy_id="tibet-resident-2019", basic_pay=y(150000), critical_illness_pay=y(300000),
                          layer_pays=[("basic", y(150000)), ("critical_illness", y(300000)),
                                      ("assistance", y(60000)), ("major_illness_assistance", y(150000)),
                                      ("full_guarantee", y(340000))], compliant_personal_pay=0),
              "apr": dict(policy_id="tibet-resident-2019-03-30", basic_pay=0, critical_illness_pay=0,
                          layer_pays=[("assistance", y(40000)), ("major_illness_assistance", y(42000))],
                          guarantee_pay=0, compliant_personal_pay=y(18000), cap_hit=True)}
    return Case(bundled(), [feb, apr], expect)


@case
def shuozhou_chronic_limit_inside_the_pool_limit():
    # nested caps: 门诊慢特病 (chronic) pays under its own 20,000 and under the 200,000 pool
    # person a: a tertiary admission of 300,000 in March: 60% x 19,000 = 11,400 + 65% x 280,000
    #   = 182,000 -> 193,400 of the pool; then chronic care of 40,000 in June: year axis, deductible
    #   600, 65% x 39,400 = 25,610 -> min(20,000, 200,000 - 193,400 = 6,600) = 6,600
    # person b: chronic 40,000: 25,610 -> the chronic limit 20,000; then 1,000 more: 650 -> 0
    claims = [claim("shuozhou", 2022, level="tertiary", in_scope=300000, person="a", month=3, cid="a1"),
              claim("shuozhou", 2022, visit="chronic", in_scope=40000, person="a", month=6, cid="a2"),
              claim("shuozhou", 2022, visit="chronic", in_scope=40000, person="b", month=6, cid="b1"),
              claim("shuozhou", 2022, visit="chronic", in_scope=1000, person="b", month=7, cid="b2")]
    expect = {"a1": dict(basic_pay=y(193400), cap_hit=False),
              "a2": dict(basic_pay=y(6600), deductible_applied=y(600), cap_hit=True),
              "b1": dict(basic_pay=y(20000), deductible_applied=y(600), cap_hit=True),
              "b2": dict(basic_pay=0, cap_hit=True)}
    # every pay grows both groups' paid; the position and deductible are the chronic entry's
    key = lambda p: (p, "140600", "resident", 2022)  # noqa: E731
    entries = {key("a"): {("basic", "chronic"): (y(40000), y(6600), y(600)),
                          ("basic", "pool"): (0, y(200000), y(1000))},
               key("b"): {("basic", "chronic"): (y(41000), y(20000), y(600)),
                          ("basic", "pool"): (0, y(20000), 0)}}
    return Case(bundled(), claims, expect, entries=entries)


@pytest.mark.parametrize("name", sorted(SEED_CASES))
def test_reference_seed_case(name):
    c = SEED_CASES[name]()
    results, acc = ref.settle(c.ps, reference_rows(c), c.carry)
    check(c, results, acc)
