"""One test (or a few) per mechanism of spec section 5, plus order and
accumulators (section 4). Every expected value is computed by hand in the
comment next to it (Y = 100 fen per yuan, ratios in basis points); every call
also goes through `run_both`, which asserts the engine equals the reference
(tests/reference.py) on every field and on the closing accumulators."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

import engine
import reference as ref
from engine.compile import compile_policies
from conftest import (Y, adj, acc_from_table, acc_to_table, by_id, claims_table, layer, policy,
                      policy_set, rule, run_both)

IDS = ("extreme_poverty", "low_income", "monitored")  # most favourable first


def single(rules, cap_groups=None, adjustments=(), **kw):
    """A policy set of one policy with one basic layer."""
    kw.setdefault("identities", IDS)
    return policy_set(policy([layer("basic", "basic", rules, cap_groups, adjustments)], **kw))


def day(d: int, hour: int = 9) -> dt.datetime:
    return dt.datetime(2024, 3, 1, hour) + dt.timedelta(days=d)


def pays(results, field="basic_pay"):
    return [r[field] for r in results]


def settle_one(ps, **claim):
    res, _ = run_both(ps, [claim])
    assert res[0]["status"] == "ok", res[0]
    return res[0]


# ============================================================== 5.2.1 rule choice and match keys


def test_first_matching_rule_wins():
    ps = single([rule({"visit_type": ["inpatient"]}, ratio=5000), rule({}, ratio=9000)])
    res, _ = run_both(ps, [dict(visit_type="inpatient", in_scope_amount=1000 * Y),
                           dict(visit_type="outpatient", in_scope_amount=1000 * Y)])
    # inpatient: the first rule (50 %) although the catch-all also matches: 500 yuan.
    # outpatient: only the catch-all (90 %): 900 yuan.
    assert pays(res) == [500 * Y, 900 * Y]


@pytest.mark.parametrize("key,values", [
    ("visit_type", ["inpatient", "outpatient", "chronic", "maternity"]),
    ("facility_level", ["primary", "secondary", "tertiary"]),
    ("locality", ["county", "region", "province", "national"]),
])
def test_enum_match_keys(key, values):
    # rule i matches value i only and pays (i+1) x 10 %; 1,000 yuan in scope -> (i+1) x 100 yuan.
    ps = single([rule({key: [v]}, ratio=(i + 1) * 1000) for i, v in enumerate(values)])
    res, _ = run_both(ps, [{key: v, "in_scope_amount": 1000 * Y} for v in values])
    assert pays(res) == [(i + 1) * 100 * Y for i in range(len(values))]


def test_enum_match_list_with_several_values():
    ps = single([rule({"locality": ["county", "region"]}, ratio=8000), rule({}, ratio=5000)])
    res, _ = run_both(ps, [dict(locality=v, in_scope_amount=100 * Y)
                           for v in ("county", "region", "province")])
    # county, region: 80 % of 100 = 80 yuan; province: catch-all 50 yuan.
    assert pays(res) == [80 * Y, 80 * Y, 50 * Y]


def test_referred_null_is_false():
    ps = single([rule({"referred": True}, ratio=9000), rule({"referred": False}, ratio=6000)])
    res, _ = run_both(ps, [dict(referred=True, in_scope_amount=100 * Y),
                           dict(referred=False, in_scope_amount=100 * Y),
                           dict(referred=None, in_scope_amount=100 * Y)])
    # referred: 90 yuan; not referred: 60; null counts as false: 60 (and not the `true` rule).
    assert pays(res) == [90 * Y, 60 * Y, 60 * Y]


def test_identity_is_the_effective_identity():
    # P.identities ranks extreme_poverty > low_income > monitored.
    ps = single([rule({"identity": ["low_income"]}, ratio=8000), rule({}, ratio=5000)])
    res, _ = run_both(ps, [
        dict(identities=["monitored", "low_income"], in_scope_amount=100 * Y),
        dict(identities=["low_income", "extreme_poverty"], in_scope_amount=100 * Y),
        dict(identities=None, in_scope_amount=100 * Y),
        dict(identities=[], in_scope_amount=100 * Y),
    ])
    # 1: holds monitored and low_income -> e = low_income (ranked higher; claim order irrelevant): 80 yuan.
    # 2: holds low_income but e = extreme_poverty -> identity rule fails: 50 yuan.
    # 3, 4: no identity: e = none: 50 yuan, identity null.
    assert pays(res) == [80 * Y, 50 * Y, 50 * Y, 50 * Y]
    assert [r["identity"] for r in res] == ["low_income", "extreme_poverty", None, None]


def test_holds_matches_any_held_identity_whatever_its_rank():
    ps = single([rule({"holds": ["low_income"]}, ratio=8000), rule({}, ratio=5000)])
    res, _ = run_both(ps, [
        dict(identities=["extreme_poverty", "low_income"], in_scope_amount=100 * Y),
        dict(identities=["monitored"], in_scope_amount=100 * Y),
    ])
    # 1: holds low_income (e = extreme_poverty does not matter): 80 yuan; 2: 50 yuan.
    assert pays(res) == [80 * Y, 50 * Y]
    assert res[0]["identity"] == "extreme_poverty"


DISEASE_GROUPS = {"htn": (("I10", "I15"),), "dm": (("E10", "E14"), ("E66", "E66"))}


@pytest.mark.parametrize("code,in_group", [
    ("I10", True),          # low bound, inclusive
    ("I15", True),          # high bound, inclusive
    ("I15.9", True),        # first three characters "I15"
    ("i12.9", True),        # upper-cased
    ("  E11.2 ", True),     # trimmed
    ("E66", True),          # a single category
    ("E66.01", True),
    ("I16", False),         # above the range
    ("I09.9", False),       # below
    ("E65", False),
    ("I1", False),          # shorter than three characters: in no group
    (" I1 ", False),        # trimmed to two characters
    ("", False),
    (None, False),          # no code
])
def test_disease_group(code, in_group):
    ps = single([rule({"disease_group": ["htn", "dm"]}, ratio=8000), rule({}, ratio=5000)],
                disease_groups=DISEASE_GROUPS)
    r = settle_one(ps, visit_type="chronic", disease_code=code, in_scope_amount=100 * Y)
    # in a group: 80 % of 100 yuan; otherwise the catch-all 50 %.
    assert r["basic_pay"] == (80 * Y if in_group else 50 * Y)


def test_disease_group_only_the_listed_groups():
    ps = single([rule({"disease_group": ["dm"]}, ratio=8000), rule({}, ratio=5000)],
                disease_groups=DISEASE_GROUPS)
    # I10 is hypertension (htn), not in the listed dm group: 50 yuan.
    assert settle_one(ps, disease_code="I10", in_scope_amount=100 * Y)["basic_pay"] == 50 * Y


def test_min_and_max_age_inclusive_and_null_age_fails_both():
    ps = single([rule({"min_age": 60}, ratio=9000), rule({"max_age": 17}, ratio=8000),
                 rule({"min_age": 18, "max_age": 59}, ratio=7000), rule({}, ratio=5000)])
    ages = [60, 59, 17, 18, 0, 100, None]
    res, _ = run_both(ps, [dict(age=a, in_scope_amount=100 * Y) for a in ages])
    # 60, 100: min_age 60 -> 90 yuan; 17, 0: max_age 17 -> 80; 18, 59: 18..59 -> 70;
    # null: fails every age condition -> catch-all 50.
    assert pays(res) == [90 * Y, 70 * Y, 80 * Y, 70 * Y, 80 * Y, 90 * Y, 50 * Y]


def test_match_is_a_conjunction():
    ps = single([rule({"visit_type": ["inpatient"], "facility_level": ["primary"], "locality": ["county"]},
                      ratio=9000), rule({}, ratio=5000)])
    res, _ = run_both(ps, [
        dict(facility_level="primary", locality="county", in_scope_amount=100 * Y),
        dict(facility_level="primary", locality="region", in_scope_amount=100 * Y),
        dict(facility_level="secondary", locality="county", in_scope_amount=100 * Y),
    ])
    # only the first meets all three conditions: 90; the others 50.
    assert pays(res) == [90 * Y, 50 * Y, 50 * Y]


# ============================================================== 5.2.2 adjustments


def test_deductible_factors_combine_with_rounding_each_step():
    ps = single([rule({}, ratio=5000, deductible=12345)],
                adjustments=[adj(deductible_factor=3333), adj(deductible_factor=5000),
                             adj({"locality": ["province"]}, deductible_factor=0)])
    r = settle_one(ps, in_scope_amount=100000)
    # g = round(10000 x 3333 / 10000) = 3333; g = round(3333 x 5000 / 10000) = round(1666.5) = 1667;
    # the province adjustment does not match.
    # D = round(12345 x 1667 / 10000) = round(2057.9115) = 2058 fen
    # (the exact product 0.16665 would give round(2057.27) = 2057).
    # pay = round((100000 - 2058) x 0.5) = 48971.
    assert r["deductible_applied"] == 2058
    assert r["basic_pay"] == 48971


def test_ratio_replaces_every_ratio_and_undoes_earlier_ratio_add():
    segs = [(1000 * Y, 5000), (None, 6000)]
    with_replace = single([rule({}, segments=segs)],
                          adjustments=[adj(ratio_add=1000), adj(ratio=7000), adj(ratio_add=500)])
    without = single([rule({}, segments=segs)], adjustments=[adj(ratio_add=1000), adj(ratio_add=500)])
    # with: +10 %, then both segments := 70 % (the +10 % is gone), then +5 %: 75 % on 2,000 = 1,500.
    assert settle_one(with_replace, in_scope_amount=2000 * Y)["basic_pay"] == 1500 * Y
    # without: 65 % on the first 1,000 + 75 % on the next 1,000 = 650 + 750 = 1,400.
    assert settle_one(without, in_scope_amount=2000 * Y)["basic_pay"] == 1400 * Y


def test_within_one_entry_ratio_before_ratio_add():
    ps = single([rule({}, ratio=5000)], adjustments=[adj(ratio=7000, ratio_add=1000)])
    # ratio 70 % first, then +10 %: 80 % of 2,000 = 1,600 (the other order would give 70 %).
    assert settle_one(ps, in_scope_amount=2000 * Y)["basic_pay"] == 1600 * Y


@pytest.mark.parametrize("base_ratio,adds,expected_ratio", [
    (9000, [2000, -3000], 8000),   # 110 % then 80 %: clamped once at the end -> 80 % (stepwise: 70 %)
    (1000, [-3000, 2500], 500),    # -20 % then 5 %: -> 5 % (stepwise: 25 %)
    (9000, [2000], 10000),         # 110 % -> clamped to 100 %
    (1000, [-3000], 0),            # -20 % -> clamped to 0
])
def test_ratio_clamped_once_after_all_adjustments(base_ratio, adds, expected_ratio):
    ps = single([rule({}, ratio=base_ratio)], adjustments=[adj(ratio_add=a) for a in adds])
    # 1,000 yuan in scope x the final ratio.
    assert settle_one(ps, in_scope_amount=1000 * Y)["basic_pay"] == 1000 * Y * expected_ratio // 10000


def test_adjustment_applies_only_when_its_match_holds():
    ps = single([rule({}, ratio=5000, deductible=100 * Y)],
                adjustments=[adj({"identity": ["low_income"], "locality": ["county"]},
                                 deductible_factor=0, ratio_add=500)])
    res, _ = run_both(ps, [
        dict(identities=["low_income"], locality="county", in_scope_amount=1100 * Y),
        dict(identities=["low_income"], locality="region", in_scope_amount=1100 * Y),
        dict(identities=["extreme_poverty", "low_income"], locality="county", in_scope_amount=1100 * Y),
    ])
    # 1: applies: D = 0, 55 % of 1,100 = 605.
    # 2: region: no: 50 % of (1,100 - 100) = 500.
    # 3: e = extreme_poverty, not listed: 500.
    assert pays(res) == [605 * Y, 500 * Y, 500 * Y]
    assert [r["deductible_applied"] for r in res] == [0, 100 * Y, 100 * Y]


def test_adjustments_on_class_ratios():
    ps_add = single([rule({}, class_ratio=(5500, 4500))], adjustments=[adj(ratio_add=500)])
    ps_set = single([rule({}, class_ratio=(5500, 4500))], adjustments=[adj(ratio=8000)])
    # +5 % to both: 60 % of class A 600 + 50 % of class B 400 = 360 + 200 = 560.
    assert settle_one(ps_add, in_scope_amount=1000 * Y, in_scope_class_b_amount=400 * Y)["basic_pay"] == 560 * Y
    # replaced by 80 %: 80 % of 1,000 = 800.
    assert settle_one(ps_set, in_scope_amount=1000 * Y, in_scope_class_b_amount=400 * Y)["basic_pay"] == 800 * Y


def test_adjustments_do_not_touch_fixed_amount_or_max_personal_share():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({}, fixed_amount=300 * Y)], adjustments=[adj(ratio=0, ratio_add=-5000)]),
        layer("top", "guarantee", [rule({}, max_personal_share=1000)], adjustments=[adj(ratio=10000)]),
    ]))
    r = settle_one(ps, in_scope_amount=1000 * Y)
    # fixed 300; the guarantee keeps round(10 % x 1,000) = 100 on the patient: 700 - 100 = 600.
    assert (r["basic_pay"], r["guarantee_pay"]) == (300 * Y, 600 * Y)


# ============================================================== 5.2.3 fixed amount


def test_fixed_amount_min_with_base_and_capped():
    ps = single([rule({"visit_type": ["maternity"]}, fixed_amount=2280 * Y, cap_group="mat"),
                 rule({}, ratio=0)], cap_groups={"mat": 3000 * Y})
    res, _ = run_both(ps, [
        dict(visit_type="maternity", settle_time=day(0), in_scope_amount=3000 * Y),
        dict(visit_type="maternity", settle_time=day(1), in_scope_amount=1000 * Y),
        dict(visit_type="maternity", settle_time=day(2), in_scope_amount=500 * Y),
    ])
    # 1: min(2,280, 3,000) = 2,280, paid 2,280.
    # 2: raw min(2,280, 1,000) = 1,000; cap leaves 720 -> 720, cap_hit.
    # 3: raw 500; nothing left -> 0, cap_hit.
    assert pays(res) == [2280 * Y, 720 * Y, 0]
    assert [r["cap_hit"] for r in res] == [False, True, True]
    assert [r["deductible_applied"] for r in res] == [0, 0, 0]


# ============================================================== 5.2.4 max personal share


def two_layer_guarantee(share, flag=False):
    return policy_set(policy([
        layer("basic", "basic", [rule({}, ratio=5000)]),
        layer("zero_pay", "guarantee", [rule({}, max_personal_share=share)]),
    ], compliant_includes_class_b_copay=flag))


def test_max_personal_share():
    r = settle_one(two_layer_guarantee(1000), total_amount=12000 * Y, self_funded_amount=2000 * Y,
                   in_scope_amount=10000 * Y)
    # K = 10,000; basic 5,000; base 5,000; the patient keeps round(10 % x 10,000) = 1,000 -> 4,000.
    assert (r["basic_pay"], r["guarantee_pay"]) == (5000 * Y, 4000 * Y)
    assert r["fund_pay_total"] == 9000 * Y
    assert r["personal_pay"] == 3000 * Y             # 12,000 - 9,000
    assert r["compliant_personal_pay"] == 1000 * Y   # K - 9,000


def test_max_personal_share_zero_and_above_base():
    r0 = settle_one(two_layer_guarantee(0), in_scope_amount=10000 * Y)
    # share 0: the layer pays the whole remaining 5,000; nothing compliant left.
    assert (r0["guarantee_pay"], r0["compliant_personal_pay"]) == (5000 * Y, 0)
    r6 = settle_one(two_layer_guarantee(6000), in_scope_amount=10000 * Y)
    # keeps 6,000 > base 5,000: max(0, 5,000 - 6,000) = 0; not in layer_pays.
    assert r6["guarantee_pay"] == 0
    assert [e["layer"] for e in r6["layer_pays"]] == ["basic"]


def test_max_personal_share_rounding_and_k_with_copay():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=0)]),
                            layer("zero_pay", "guarantee", [rule({}, max_personal_share=3333)])]))
    # K = 10001; keep round(10001 x 3333 / 10000) = round(3333.33) = 3333; pays 10001 - 3333 = 6668.
    assert settle_one(ps, in_scope_amount=10001)["guarantee_pay"] == 6668
    r = settle_one(two_layer_guarantee(1000, flag=True), class_b_copay_amount=1000 * Y,
                   in_scope_amount=10000 * Y)
    # K = 10,000 + 1,000 copay = 11,000; basic 50 % of in scope = 5,000; base 6,000;
    # keep round(10 % x 11,000) = 1,100 -> 4,900.
    assert r["guarantee_pay"] == 4900 * Y


def test_max_personal_share_on_first_layer_uses_in_scope_base():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, max_personal_share=1000)])],
                           compliant_includes_class_b_copay=True))
    r = settle_one(ps, class_b_copay_amount=200 * Y, in_scope_amount=1000 * Y)
    # K = 1,200; base = in scope 1,000; keep round(10 % x 1,200) = 120 -> 880.
    assert r["basic_pay"] == 880 * Y
    assert r["compliant_personal_pay"] == 320 * Y    # 1,200 - 880


# ============================================================== 5.2.5 deductible, repeat admissions


def repeat_policy(deductible=1000 * Y, factors=(10000, 5000, 2000), floor=300 * Y, adjustments=()):
    return single([rule({"facility_level": ["primary"]}, ratio=10000),
                   rule({"visit_type": ["inpatient"]}, ratio=10000, deductible=deductible, repeat_admission=True),
                   rule({}, ratio=10000, deductible=deductible, repeat_admission=True)],
                  adjustments=adjustments, repeat_factors=factors, repeat_floor=floor)


def test_repeat_admission_factors_and_floor():
    ps = repeat_policy()
    rows = [
        dict(settle_time=day(0), in_scope_amount=5000 * Y),                           # admission 1
        dict(settle_time=day(1), in_scope_amount=5000 * Y),                           # admission 2
        dict(settle_time=day(2), visit_type="outpatient", in_scope_amount=5000 * Y),  # not an admission
        dict(settle_time=day(3), in_scope_amount=5000 * Y, total_amount=1),           # error: not counted
        dict(settle_time=day(4), facility_level="primary", in_scope_amount=5000 * Y),  # admission 3 (other rule)
        dict(settle_time=day(5), in_scope_amount=5000 * Y),                           # admission 4
        dict(settle_time=day(6), in_scope_amount=5000 * Y),                           # admission 5
    ]
    res, acc = run_both(ps, rows)
    assert [r["status"] for r in res] == ["ok"] * 3 + ["AMOUNT_MISMATCH"] + ["ok"] * 3
    # factors [1, 0.5, 0.2], floor 300, deductible 1,000; 100 % above D on 5,000:
    # adm 1: factor 1 -> D 1,000; adm 2: 0.5 -> 500 (>= floor);
    # outpatient (repeat rule, but not inpatient): D = 1,000;
    # adm 3 (primary rule, no deductible, counts as an admission): D 0;
    # adm 4: factors[min(3, 2)] = 0.2 -> 200, below 1 so max(200, min(300, 1,000)) = 300;
    # adm 5: 0.2 again -> 300.
    assert [r["deductible_applied"] for r in res] == [1000 * Y, 500 * Y, 1000 * Y, 0, 0, 300 * Y, 300 * Y]
    assert pays(res) == [4000 * Y, 4500 * Y, 4000 * Y, 0, 5000 * Y, 4700 * Y, 4700 * Y]
    assert acc[("p1", "000001", "resident", 2024)]["admissions"] == 5


def test_repeat_floor_above_the_rule_deductible():
    ps = repeat_policy(deductible=200 * Y, factors=(10000, 5000), floor=300 * Y)
    res, _ = run_both(ps, [dict(settle_time=day(i), in_scope_amount=1000 * Y) for i in range(2)])
    # 2nd: round(200 x 0.5) = 100; max(100, min(300, 200)) = 200: the floor is at most the deductible.
    assert [r["deductible_applied"] for r in res] == [200 * Y, 200 * Y]


def test_repeat_deductible_rounding_and_adjustment_factor():
    ps = repeat_policy(deductible=33333, factors=(10000, 5000), floor=0)
    res, _ = run_both(ps, [dict(settle_time=day(i), in_scope_amount=1000 * Y) for i in range(2)])
    # 2nd: Dr = round(33333 x 5000 / 10000) = round(16666.5) = 16667.
    assert [r["deductible_applied"] for r in res] == [33333, 16667]
    ps = repeat_policy(adjustments=[adj(deductible_factor=5000)])
    res, _ = run_both(ps, [dict(settle_time=day(i), in_scope_amount=5000 * Y) for i in range(2)])
    # Dr 1,000 then 500; g = 0.5: D = 500 then 250.
    assert [r["deductible_applied"] for r in res] == [500 * Y, 250 * Y]


def test_repeat_admission_only_on_the_claim_axis():
    ps = single([rule({}, axis="year", ratio=10000, deductible=1000 * Y, repeat_admission=True)],
                repeat_factors=(10000, 5000))
    res, _ = run_both(ps, [dict(settle_time=day(i), in_scope_amount=600 * Y) for i in range(2)])
    # "On the claim axis, an inpatient claim ... takes factor ...; every other claim: Dr = rule.deductible":
    # year axis, D stays 1,000: [0, 600) pays 0; [600, 1,200) has 400 below D, 200 above -> 200.
    # (A halved D of 500 would give 600.)
    assert pays(res) == [0, 200 * Y]
    assert [r["deductible_applied"] for r in res] == [600 * Y, 400 * Y]


# ============================================================== 5.2.6 segments


SEGS = [(5000 * Y, 5000), (10000 * Y, 6000), (None, 7000)]


@pytest.mark.parametrize("bounds,deductible,expected", [
    # D 1,000 absolute: [1,000, 5,000) x 50 % = 2,000; [5,000, 10,000) x 60 % = 3,000;
    # [10,000, 12,000) x 70 % = 1,400 -> 6,400.
    ("absolute", 1000, 6400),
    # above_deductible: bounds +1,000: [1,000, 6,000) 2,500; [6,000, 11,000) 3,000; [11,000, 12,000) 700 -> 6,200.
    ("above_deductible", 1000, 6200),
    # D 6,000 absolute: the first segment ends below D and pays nothing; [6,000, 10,000) 2,400;
    # [10,000, 12,000) 1,400 -> 3,800.
    ("absolute", 6000, 3800),
    # D 6,000 above: [6,000, 11,000) 2,500; [11,000, 12,000) x 60 % = 600 -> 3,100.
    ("above_deductible", 6000, 3100),
    # D 12,000 (all of it): 0.
    ("absolute", 12000, 0),
])
def test_segments_bounds(bounds, deductible, expected):
    ps = single([rule({}, segments=SEGS, deductible=deductible * Y, bounds=bounds)])
    r = settle_one(ps, in_scope_amount=12000 * Y)
    assert r["basic_pay"] == expected * Y
    assert r["deductible_applied"] == deductible * Y


def test_base_below_deductible():
    ps = single([rule({}, segments=SEGS, deductible=1000 * Y)])
    r = settle_one(ps, in_scope_amount=500 * Y)
    # all of it in the deductible slice: pays 0, charged 500.
    assert (r["basic_pay"], r["deductible_applied"]) == (0, 500 * Y)


def test_segments_round_the_exact_integral_once():
    ps = single([rule({}, segments=[(1, 5000), (2, 5000), (None, 5000)])])
    # x = 3 fen: F(3) = 1.5 fen -> 2 (rounding per segment would give 1 + 1 + 1 = 3).
    assert settle_one(ps, in_scope_amount=3)["basic_pay"] == 2


@pytest.mark.parametrize("x,ratio,expected", [
    (1, 5000, 1),      # 0.5 fen rounds half up to 1
    (3, 1666, 0),      # 0.4998 -> 0
    (3, 1667, 1),      # 0.5001 -> 1
    (7, 5000, 4),      # 3.5 -> 4
])
def test_half_up_rounding(x, ratio, expected):
    assert settle_one(single([rule({}, ratio=ratio)]), in_scope_amount=x)["basic_pay"] == expected


def test_year_axis_across_claims():
    ps = single([rule({}, axis="year", deductible=1000 * Y, segments=[(3000 * Y, 5000), (None, 8000)])])
    amounts = [600, 600, 2500, 1000]
    res, acc = run_both(ps, [dict(settle_time=day(i), in_scope_amount=a * Y) for i, a in enumerate(amounts)])
    # positions [0,600) [600,1,200) [1,200,3,700) [3,700,4,700); D = 1,000 is the bottom of the year:
    # 1: all below D -> 0, charged 600;
    # 2: 400 below D, [1,000, 1,200) x 50 % = 100, charged 400;
    # 3: [1,200, 3,000) x 50 % = 900 + [3,000, 3,700) x 80 % = 560 -> 1,460;
    # 4: [3,700, 4,700) x 80 % = 800.
    assert pays(res) == [0, 100 * Y, 1460 * Y, 800 * Y]
    assert [r["deductible_applied"] for r in res] == [600 * Y, 400 * Y, 0, 0]
    a = acc[("p1", "000001", "resident", 2024)]
    # position 4,700, paid 0+100+1,460+800 = 2,360, deductible_charged 1,000.
    assert a["layers"][("basic", None)] == [4700 * Y, 2360 * Y, 1000 * Y]
    assert a["compliant_total"] == 4700 * Y


def test_year_axis_rounds_positions_not_claims():
    ps = single([rule({}, axis="year", ratio=5000)])
    res, _ = run_both(ps, [dict(settle_time=day(i), in_scope_amount=1) for i in range(3)])
    # round(F(1)) = round(0.5) = 1; round(F(2)) - 1 = 0; round(F(3)) - 1 = 2 - 1 = 1: total 2 = round(1.5).
    assert pays(res) == [1, 0, 1]


def test_year_axis_position_per_layer_and_cap_group():
    ps = single([
        rule({"visit_type": ["chronic"]}, axis="year", ratio=5000, deductible=100 * Y, cap_group="g"),
        rule({"visit_type": ["inpatient"]}, axis="year", ratio=10000, deductible=100 * Y, cap_group="g"),
        rule({"visit_type": ["outpatient"]}, ratio=10000, cap_group="g"),
        rule({"visit_type": ["maternity"]}, axis="year", ratio=10000, deductible=100 * Y, cap_group="h"),
    ], cap_groups={"g": 10**6 * Y, "h": 10**6 * Y})
    res, acc = run_both(ps, [
        dict(settle_time=day(0), visit_type="outpatient", in_scope_amount=500 * Y),
        dict(settle_time=day(1), visit_type="chronic", in_scope_amount=80 * Y),
        dict(settle_time=day(2), visit_type="maternity", in_scope_amount=80 * Y),
        dict(settle_time=day(3), visit_type="inpatient", in_scope_amount=80 * Y),
    ])
    # 1: claim axis (does not move the year position of g): 500.
    # 2: g position [0, 80): below D -> 0.
    # 3: h has its own position [0, 80): 0.
    # 4: the inpatient rule shares g's position: [80, 160): 60 above D x 100 % = 60.
    assert pays(res) == [500 * Y, 0, 0, 60 * Y]
    layers = acc[("p1", "000001", "resident", 2024)]["layers"]
    # g: position 160, paid 560, charged 0 (claim axis, D 0) + 80 + 20 = 100; h: 80, 0, 80.
    assert layers[("basic", "g")] == [160 * Y, 560 * Y, 100 * Y]
    assert layers[("basic", "h")] == [80 * Y, 0, 80 * Y]


# ============================================================== class ratios


@pytest.mark.parametrize("deductible,expected,applied", [
    # A = 700, B = 300; D 100 from class A: 600 x 55 % + 300 x 45 % = 330 + 135 = 465.
    (100, 465, 100),
    # D 800: all 700 of class A, 100 of class B: 0 + 200 x 45 % = 90.
    (800, 90, 800),
    # D 1,200 > in scope: nothing eligible; charged min(1,000, 1,200) = 1,000.
    (1200, 0, 1000),
])
def test_class_ratios_deductible_from_class_a_first(deductible, expected, applied):
    ps = single([rule({}, class_ratio=(5500, 4500), deductible=deductible * Y)])
    r = settle_one(ps, in_scope_amount=1000 * Y, in_scope_class_b_amount=300 * Y)
    assert (r["basic_pay"], r["deductible_applied"]) == (expected * Y, applied * Y)


def test_class_ratios_round_once_and_null_class_b():
    ps = single([rule({}, class_ratio=(5000, 5000))])
    # elig_a 1 fen x 50 % + elig_b 1 fen x 50 % = 1.0 -> 1 (rounding each class would give 2).
    assert settle_one(ps, in_scope_amount=2, in_scope_class_b_amount=1)["basic_pay"] == 1
    ps = single([rule({}, class_ratio=(5500, 4500))])
    # class B null = 0: all 1,000 is class A at 55 % = 550.
    assert settle_one(ps, in_scope_amount=1000 * Y, in_scope_class_b_amount=None)["basic_pay"] == 550 * Y


# ============================================================== 5.2.7 caps


def test_cap_and_cap_hit():
    ps = single([rule({}, ratio=6000, cap_group="g")], cap_groups={"g": 1000 * Y})
    res, acc = run_both(ps, [dict(settle_time=day(i), in_scope_amount=a * Y)
                             for i, a in enumerate([1000, 1000, 1000, 0])])
    # raw 600 each: 600; 400 (cap 1,000 - paid 600), cap_hit; 0, cap_hit; raw 0 -> 0, no cap_hit.
    assert pays(res) == [600 * Y, 400 * Y, 0, 0]
    assert [r["cap_hit"] for r in res] == [False, True, True, False]
    assert acc[("p1", "000001", "resident", 2024)]["layers"][("basic", "g")][1] == 1000 * Y


def test_paid_per_layer_and_cap_group():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, ratio=10000, cap_group="g1"),
                                 rule({"visit_type": ["outpatient"]}, ratio=10000, cap_group="g2"),
                                 rule({}, ratio=10000)],
              cap_groups={"g1": 1000 * Y, "g2": 500 * Y}),
        layer("extra", "supplementary", [rule({}, ratio=10000, cap_group="g1")], cap_groups={"g1": 100 * Y}),
    ]))
    res, acc = run_both(ps, [
        dict(settle_time=day(0), visit_type="inpatient", in_scope_amount=800 * Y),
        dict(settle_time=day(1), visit_type="outpatient", in_scope_amount=800 * Y),
        dict(settle_time=day(2), visit_type="inpatient", in_scope_amount=800 * Y),
        dict(settle_time=day(3), visit_type="chronic", in_scope_amount=800 * Y),
    ])
    # basic: g1 800; g2 min(800, 500) = 500 (hit); g1 min(800, 1,000 - 800) = 200 (hit); uncapped 800.
    assert pays(res) == [800 * Y, 500 * Y, 200 * Y, 800 * Y]
    # extra (its own g1, cap 100): bases 0, 300, 600, 0 -> 0, 100 (hit), 0 (hit), 0.
    assert pays(res, "supplementary_pay") == [0, 100 * Y, 0, 0]
    assert [r["cap_hit"] for r in res] == [False, True, True, False]
    layers = acc[("p1", "000001", "resident", 2024)]["layers"]
    assert layers[("basic", "g1")][1] == 1000 * Y
    assert layers[("basic", "g2")][1] == 500 * Y
    assert layers[("basic", None)][1] == 800 * Y
    assert layers[("extra", "g1")][1] == 100 * Y


def test_later_layer_base_is_k_minus_capped_earlier_pays():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({}, ratio=8000, cap_group="y")], cap_groups={"y": 500 * Y}),
        layer("aid", "medical_aid", [rule({}, ratio=5000)]),
    ]))
    r = settle_one(ps, in_scope_amount=1000 * Y)
    # basic raw 800, capped to 500 (cap_hit); aid base = 1,000 - 500 = 500 -> 250.
    assert (r["basic_pay"], r["medical_aid_pay"], r["cap_hit"]) == (500 * Y, 250 * Y, True)


def test_cap_hit_on_a_later_layer_only():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({}, ratio=5000)]),
        layer("aid", "medical_aid", [rule({}, ratio=10000, cap_group="y")], cap_groups={"y": 100 * Y}),
    ]))
    r = settle_one(ps, in_scope_amount=1000 * Y)
    # basic 500; aid raw 500, cap 100.
    assert (r["basic_pay"], r["medical_aid_pay"], r["cap_hit"]) == (500 * Y, 100 * Y, True)


# ============================================================== bases, K, totals


@pytest.mark.parametrize("flag,aid,compliant_personal", [
    (True, 700, 0),     # K = 1,000 + 200 copay = 1,200; basic 50 % of in scope 1,000 = 500; aid base 700.
    (False, 500, 0),    # K = 1,000; aid base 500.
])
def test_compliant_includes_class_b_copay(flag, aid, compliant_personal):
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=5000)]),
                            layer("aid", "medical_aid", [rule({}, ratio=10000)])],
                           compliant_includes_class_b_copay=flag))
    res, acc = run_both(ps, [dict(total_amount=1500 * Y, self_funded_amount=300 * Y,
                                  class_b_copay_amount=200 * Y, in_scope_amount=1000 * Y)])
    r = res[0]
    assert (r["basic_pay"], r["medical_aid_pay"]) == (500 * Y, aid * Y)
    assert r["compliant_personal_pay"] == compliant_personal
    assert r["personal_pay"] == 1500 * Y - (500 + aid) * Y
    assert acc[("p1", "000001", "resident", 2024)]["compliant_total"] == (1200 if flag else 1000) * Y


def test_deductible_applied_is_the_first_layers():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=5000, deductible=100 * Y)]),
                            layer("ci", "critical_illness", [rule({}, ratio=5000, deductible=300 * Y)])]))
    r = settle_one(ps, in_scope_amount=1100 * Y)
    # basic: D 100 -> 500; ci base 600, D 300 -> 150; deductible_applied is basic's 100 only.
    assert (r["basic_pay"], r["critical_illness_pay"], r["deductible_applied"]) == (500 * Y, 150 * Y, 100 * Y)


def test_fund_columns_layer_pays_and_totals():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({}, ratio=5000)]),
        layer("large", "supplementary", [rule({}, ratio=5000)]),
        layer("ci", "critical_illness", [rule({}, ratio=0)]),
        layer("aid_a", "medical_aid", [rule({}, ratio=5000)]),
        layer("aid_b", "medical_aid", [rule({}, ratio=5000)]),
        layer("none", "guarantee", [rule({"visit_type": ["chronic"]}, ratio=10000)]),
        layer("top", "guarantee", [rule({}, ratio=5000)]),
    ]))
    r = settle_one(ps, total_amount=2000 * Y, self_funded_amount=400 * Y, in_scope_amount=1600 * Y)
    # basic 50 % x 1,600 = 800; large 50 % x 800 = 400; ci 0 (not listed); aid_a 50 % x 400 = 200;
    # aid_b 50 % x 200 = 100 (medical_aid 300); 'none' has no rule for inpatient: nothing; top 50 % x 100 = 50.
    assert [(e["layer"], e["pay"]) for e in r["layer_pays"]] == [
        ("basic", 800 * Y), ("large", 400 * Y), ("aid_a", 200 * Y), ("aid_b", 100 * Y), ("top", 50 * Y)]
    assert (r["basic_pay"], r["supplementary_pay"], r["critical_illness_pay"], r["medical_aid_pay"],
            r["guarantee_pay"]) == (800 * Y, 400 * Y, 0, 300 * Y, 50 * Y)
    assert r["fund_pay_total"] == 1550 * Y
    assert r["personal_pay"] == 450 * Y            # 2,000 - 1,550
    assert r["compliant_personal_pay"] == 50 * Y   # 1,600 - 1,550
    assert (r["policy_id"], r["identity"], r["cap_hit"]) == ("t", None, False)


def test_later_layer_without_matching_rule_pays_nothing():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=5000)]),
                            layer("aid", "medical_aid", [rule({"holds": ["low_income"]}, ratio=10000)])],
                           identities=IDS))
    res, _ = run_both(ps, [dict(in_scope_amount=100 * Y), dict(identities=["low_income"], in_scope_amount=100 * Y)])
    assert pays(res, "medical_aid_pay") == [0, 50 * Y]


# ============================================================== order within a call


def capped_600():
    """Each claim of 1,000 yuan has raw 600 against a cap of 1,000: the first settled gets 600, the next 400."""
    return single([rule({}, ratio=6000, cap_group="g")], cap_groups={"g": 1000 * Y})


def test_order_by_settle_time_results_in_input_order():
    rows = [dict(claim_id="a", settle_time=day(1), in_scope_amount=1000 * Y),
            dict(claim_id="b", settle_time=day(0), in_scope_amount=1000 * Y)]
    res, _ = run_both(capped_600(), rows)
    # "b" is earlier: settled first, 600; "a" gets 400. Results stay in input order.
    assert [r["claim_id"] for r in res] == ["a", "b"]
    assert pays(res) == [400 * Y, 600 * Y]


def test_order_by_settle_time_microseconds():
    t = dt.datetime(2024, 5, 5, 12, 0, 0, 1)
    rows = [dict(claim_id="a", settle_time=t, in_scope_amount=1000 * Y),
            dict(claim_id="b", settle_time=t - dt.timedelta(microseconds=1), in_scope_amount=1000 * Y)]
    res, _ = run_both(capped_600(), rows)
    assert pays(res) == [400 * Y, 600 * Y]


@pytest.mark.parametrize("first,second", [
    ("B", "a"),                   # bytes 0x42 < 0x61 (not case-insensitive)
    ("a", "ab"),                  # prefix first
    ("z", "é"),                   # 0x7A < 0xC3
    ("C10", "C9"),                # bytes, not numeric
    ("\uff21", "\U0001F600"),     # UTF-8 EF.. < F0.. (UTF-16 order would be the other way)
])
def test_order_ties_by_claim_id_utf8_bytes(first, second):
    assert first.encode() < second.encode()
    rows = [dict(claim_id=second, in_scope_amount=1000 * Y), dict(claim_id=first, in_scope_amount=1000 * Y)]
    res, _ = run_both(capped_600(), rows)
    # same settle_time: `first` sorts first and gets 600.
    assert by_id(res)[first]["basic_pay"] == 600 * Y
    assert by_id(res)[second]["basic_pay"] == 400 * Y


def test_table_of_several_batches_is_ordered_as_a_whole():
    t1 = claims_table([dict(claim_id="late", settle_time=day(5), in_scope_amount=1000 * Y)])
    t2 = claims_table([dict(claim_id="early", settle_time=day(0), in_scope_amount=1000 * Y)])
    table = pa.Table.from_batches(t1.to_batches() + t2.to_batches())
    assert table.column("claim_id").num_chunks == 2
    res, _ = run_both(capped_600(), table)
    # one table = one chunk ordered as a whole: "early" first (600), "late" 400.
    assert pays(res) == [400 * Y, 600 * Y]
    # a RecordBatch is one chunk too
    batch = table.combine_chunks().to_batches()[0]
    assert engine.settle(batch, capped_600()).results.to_pylist() == res


def test_stream_chunks_are_ordered_each_on_its_own():
    t1 = claims_table([dict(claim_id="late", settle_time=day(5), in_scope_amount=1000 * Y)])
    t2 = claims_table([dict(claim_id="early", settle_time=day(0), in_scope_amount=1000 * Y)])
    res = engine.settle(t1.to_batches() + t2.to_batches(), capped_600()).results.to_pylist()
    # a stream settles chunk after chunk: "late" (chunk 1) first gets 600; "early" sorts before
    # it but comes in chunk 2: "still settled, after it": 400.
    assert pays(res) == [600 * Y, 400 * Y]
    ref_rows, _ = ref.settle_stream(capped_600(), [t1.to_pylist(), t2.to_pylist()])
    assert pays(ref_rows) == [600 * Y, 400 * Y]


def test_keys_are_independent():
    p24 = policy([layer("basic", "basic", [rule({}, ratio=6000, cap_group="g")], {"g": 1000 * Y})], id="r1-res-24")
    p23 = policy([layer("basic", "basic", [rule({}, ratio=6000, cap_group="g")], {"g": 1000 * Y})], id="r1-res-23",
                 year=2023)
    pemp = policy([layer("basic", "basic", [rule({}, ratio=6000, cap_group="g")], {"g": 1000 * Y})], id="r1-emp",
                  scheme="employee")
    preg = policy([layer("basic", "basic", [rule({}, ratio=6000, cap_group="g")], {"g": 1000 * Y})], id="r2",
                  region="000002")
    ps = policy_set(p24, p23, pemp, preg)
    base = dict(in_scope_amount=1000 * Y)
    rows = [
        dict(base, claim_id="1", settle_time=day(0)),
        dict(base, claim_id="2", settle_time=day(1), person_id="p2"),
        dict(base, claim_id="3", settle_time=day(2), scheme="employee"),
        dict(base, claim_id="4", settle_time=day(3), region="000002"),
        dict(base, claim_id="5", settle_time=dt.datetime(2023, 12, 31, 23, 59, 59, 999999)),
        dict(base, claim_id="6", settle_time=dt.datetime(2024, 1, 1, 0, 0)),
    ]
    res, acc = run_both(ps, rows)
    # 2-5 are each the first claim of their own key: 600. "6" (2024-01-01) is p1's first 2024 claim
    # in settle_time order: 600; "1" (2024-03-01) comes after it: 400. "5" (a second before) is 2023.
    assert pays(res) == [400 * Y] + [600 * Y] * 5
    assert [r["policy_id"] for r in res] == ["r1-res-24", "r1-res-24", "r1-emp", "r2", "r1-res-23", "r1-res-24"]
    assert set(acc) == {("p1", "000001", "resident", 2024), ("p2", "000001", "resident", 2024),
                        ("p1", "000001", "employee", 2024), ("p1", "000002", "resident", 2024),
                        ("p1", "000001", "resident", 2023)}


# ============================================================== accumulators in and out


def test_accumulator_table_format():
    ps = single([rule({"visit_type": ["inpatient"]}, ratio=5000, deductible=100 * Y, cap_group="g"),
                 rule({}, axis="year", ratio=5000, deductible=100 * Y)], cap_groups={"g": 10**5 * Y})
    res = engine.settle(claims_table([
        dict(claim_id="x", visit_type="inpatient", in_scope_amount=1000 * Y),
        dict(claim_id="y", visit_type="chronic", in_scope_amount=300 * Y),
    ]), ps)
    t = res.accumulators
    assert isinstance(t, pa.Table)
    assert t.column_names == ["person_id", "region", "scheme", "year", "admissions", "compliant_total", "layers"]
    for name in ("person_id", "region", "scheme"):
        assert t.schema.field(name).type == pa.string()
    assert pa.types.is_integer(t.schema.field("year").type)
    layers_t = t.schema.field("layers").type
    assert pa.types.is_list(layers_t)
    st = layers_t.value_type
    assert [st.field(i).name for i in range(st.num_fields)] == [
        "layer", "cap_group", "position", "paid", "deductible_charged"]
    assert [st.field(i).type for i in range(st.num_fields)] == [pa.string(), pa.string()] + [pa.int64()] * 3
    assert t.schema.equals(engine.ACCUMULATORS_SCHEMA)
    acc = acc_from_table(t)
    # x: inpatient, claim axis, g: D 100, 50 % of 900 = 450; y: year axis (basic, none): [0, 300): 50 % x 200 = 100.
    assert acc == {("p1", "000001", "resident", 2024): {
        "admissions": 1, "compliant_total": 1300 * Y,
        "layers": {("basic", "g"): [0, 450 * Y, 100 * Y], ("basic", None): [300 * Y, 100 * Y, 100 * Y]}}}


def test_carry_in_paid_admissions_position_and_charged():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, ratio=6000, cap_group="g",
                                      deductible=1000 * Y, repeat_admission=True),
                                 rule({}, axis="year", ratio=10000, deductible=1000 * Y)],
              cap_groups={"g": 1000 * Y}),
    ], repeat_factors=(10000, 5000, 2000)))
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 2, "compliant_total": 5000 * Y,
                   "layers": {("basic", "g"): [0, 900 * Y, 50 * Y], ("basic", None): [800 * Y, 0, 800 * Y]}}}
    res, acc = run_both(ps, [dict(settle_time=day(0), in_scope_amount=2000 * Y),
                             dict(settle_time=day(1), visit_type="chronic", in_scope_amount=500 * Y)], carry)
    # inpatient: 2 admissions carried -> factor 0.2: D 200; raw 60 % x 1,800 = 1,080; cap 1,000 - 900 -> 100.
    # chronic (year axis, position carried 800): [800, 1,300): 200 below D, 300 x 100 % = 300.
    assert pays(res) == [100 * Y, 300 * Y]
    assert [r["deductible_applied"] for r in res] == [200 * Y, 200 * Y]
    assert res[0]["cap_hit"] is True
    assert acc[key] == {"admissions": 3, "compliant_total": 7500 * Y,
                        "layers": {("basic", "g"): [0, 1000 * Y, 250 * Y],
                                   ("basic", None): [1300 * Y, 300 * Y, 1000 * Y]}}


def test_carried_fields_no_rule_writes_come_back_unchanged():
    """A state row keeps only the fields its policy's rules write (compile._state_layout);
    a carried-in value of another field (a position on a claim-axis column, a deductible
    charged on a fixed amount's column: say, from a policy since changed) is kept aside and
    returned as it came, in the closing accumulators and in `explain`."""
    ps = policy_set(policy([
        layer("basic", "basic", [rule({"visit_type": ["maternity"]}, fixed_amount=300 * Y, cap_group="birth"),
                                 rule({}, ratio=5000, deductible=100 * Y)],
              cap_groups={"birth": 10**6 * Y}),
    ]))
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 0, "compliant_total": 100 * Y,
                   "layers": {("basic", "birth"): [0, 300 * Y, 70 * Y], ("basic", None): [40 * Y, 0, 100 * Y]}}}
    res, acc = run_both(ps, [dict(claim_id="m", visit_type="maternity", in_scope_amount=500 * Y),
                             dict(claim_id="o", settle_time=day(1), visit_type="outpatient",
                                  in_scope_amount=300 * Y)], carry)
    # maternity: the fixed 300 yuan; outpatient: claim axis, (300 - 100) x 50 % = 100 yuan.
    assert pays(res) == [300 * Y, 100 * Y]
    assert acc[key]["layers"] == {("basic", "birth"): [0, 600 * Y, 70 * Y],
                                  ("basic", None): [40 * Y, 100 * Y, 200 * Y]}
    index = compile_policies(ps).state_index[0].reshape(-1, 3)
    assert index[0, 2] < 0 and index[1, 0] < 0  # the two carried fields are not in the rows
    shown = engine.explain(claims_table([dict(claim_id="o", settle_time=day(1), visit_type="outpatient",
                                              in_scope_amount=300 * Y)]), ps, "o", acc_to_table(carry))
    before = {(e["layer"], e["cap_group"]): e for e in shown["accumulators_before"]["layers"]}
    after = {(e["layer"], e["cap_group"]): e for e in shown["accumulators_after"]["layers"]}
    assert before[("basic", None)]["position"] == after[("basic", None)]["position"] == 40 * Y
    assert before[("basic", "birth")]["deductible_charged"] == after[("basic", "birth")]["deductible_charged"] == 70 * Y
    assert after[("basic", None)]["paid"] == 100 * Y


def test_carry_round_trip_equals_one_call():
    ps = capped_600()
    rows = [dict(claim_id=f"c{i}", settle_time=day(i), in_scope_amount=700 * Y) for i in range(4)]
    whole, whole_acc = run_both(ps, rows)
    part1 = engine.settle(claims_table(rows[:2]), ps)
    part2 = engine.settle(claims_table(rows[2:]), ps, part1.accumulators)
    # raw 420 each against a cap of 1,000: 420, 420, 160, 0.
    assert pays(whole) == [420 * Y, 420 * Y, 160 * Y, 0]
    assert part1.results.to_pylist() + part2.results.to_pylist() == whole
    assert acc_from_table(part2.accumulators) == whole_acc


@pytest.mark.parametrize("field,value", [
    ("admissions", -1), ("admissions", 10**14 + 1), ("compliant_total", -1), ("compliant_total", 10**14 + 1),
    ("position", -1), ("paid", 10**14 + 1), ("deductible_charged", -5),
])
def test_carry_in_out_of_range_fails_naming_the_key(field, value):
    ps = capped_600()
    entry = {"admissions": 0, "compliant_total": 0, "layers": {("basic", "g"): [0, 0, 0]}}
    if field in ("admissions", "compliant_total"):
        entry[field] = value
    else:
        entry["layers"][("basic", "g")][["position", "paid", "deductible_charged"].index(field)] = value
    carry = acc_to_table({("carry-person-7", "000001", "resident", 2024): entry,
                          ("other", "000001", "resident", 2024): {"admissions": 1, "compliant_total": 0, "layers": {}}})
    with pytest.raises(engine.AccumulatorError, match="carry-person-7"):
        engine.settle(claims_table([dict(in_scope_amount=100 * Y)]), ps, carry)


def test_carry_in_at_the_bounds_is_accepted():
    ps = capped_600()
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 10**14, "compliant_total": 10**14 - 100 * Y,
                   "layers": {("basic", "g"): [10**14, 0, 10**14]}}}
    res, acc = run_both(ps, [dict(visit_type="outpatient", in_scope_amount=100 * Y)], carry)
    # compliant_total reaches exactly 10^14 (allowed); raw 60.
    assert res[0]["basic_pay"] == 60 * Y
    assert acc[key]["compliant_total"] == 10**14


# ============================================================== revision 2: versions within a year

KEY = ("p1", "000001", "resident", 2024)


def versions(*specs):
    """Versions of (000001, resident, 2024): (effective_from or None for January 1, layers, identities)."""
    return policy_set(*(policy(ls, id=f"v{k}", effective_from=d, identities=ids)
                        for k, (d, ls, ids) in enumerate(specs)))


def test_the_version_in_force_on_the_settle_date_settles_the_claim():
    # v0 from January 1 pays 50 %, v1 from March 2 (00:00) pays 80 %: 1,000 yuan in scope.
    ps = versions((None, [layer("basic", "basic", [rule({}, ratio=5000)])], ()),
                  (dt.date(2024, 3, 2), [layer("basic", "basic", [rule({}, ratio=8000)])], ()))
    res, _ = run_both(ps, [dict(settle_time=dt.datetime(2024, 3, 1, 23, 59, 59), in_scope_amount=1000 * Y),
                           dict(settle_time=dt.datetime(2024, 3, 2), in_scope_amount=1000 * Y),
                           dict(settle_time=dt.datetime(2024, 12, 31, 23), in_scope_amount=1000 * Y)])
    assert pays(res) == [500 * Y, 800 * Y, 800 * Y]
    assert [r["policy_id"] for r in res] == ["v0", "v1", "v1"]


def test_a_date_before_the_first_version_is_unknown_policy():
    ps = versions((dt.date(2024, 3, 2), [layer("basic", "basic", [rule({}, ratio=5000)])], ()))
    res, acc = run_both(ps, [dict(settle_time=dt.datetime(2024, 3, 1, 12), in_scope_amount=100 * Y),
                             dict(settle_time=dt.datetime(2024, 3, 2, 12), in_scope_amount=100 * Y)])
    assert [r["status"] for r in res] == ["UNKNOWN_POLICY", "ok"]
    assert acc[KEY]["admissions"] == 1  # the first claim moved nothing


def test_versions_share_positions_counts_and_paid_by_name():
    # v0: year axis, deductible 1,000, 50 %, cap group `year` 1,000; admissions count for repeats.
    # v1 (March 2): the same names, 80 %, and a lowered cap of 500; plus a new group `extra`.
    v0 = [layer("basic", "basic", [rule({}, ratio=5000, deductible=1000 * Y, axis="year", cap_group="year")],
                {"year": 1000 * Y})]
    v1 = [layer("basic", "basic", [rule({"visit_type": ["outpatient"]}, ratio=10000, cap_group="extra"),
                                   rule({}, ratio=8000, deductible=1000 * Y, axis="year", cap_group="year")],
                {"year": 500 * Y, "extra": 300 * Y})]
    ps = versions((None, v0, ()), (dt.date(2024, 3, 2), v1, ()))
    res, acc = run_both(ps, [
        dict(settle_time=day(0), in_scope_amount=600 * Y),   # v0: [0, 600) under D: 0
        dict(settle_time=day(1), in_scope_amount=1000 * Y),  # v1: [600, 1600): 600 above D at 80 % = 480; cap 500
        dict(settle_time=day(2), in_scope_amount=1000 * Y),  # v1: [1600, 2600) at 80 % = 800; room 500 - 480 = 20
        dict(settle_time=day(3), visit_type="outpatient", in_scope_amount=400 * Y),  # `extra`: min(400, 300)
    ])
    assert pays(res) == [0, 480 * Y, 20 * Y, 300 * Y]
    assert [r["cap_hit"] for r in res] == [False, False, True, True]
    layers = acc[KEY]["layers"]
    assert layers[("basic", "year")] == [2600 * Y, 500 * Y, 1000 * Y]
    assert layers[("basic", "extra")][1] == 300 * Y
    assert acc[KEY]["admissions"] == 3 and acc[KEY]["compliant_total"] == 3000 * Y


def test_a_lowered_cap_pays_what_is_left_and_takes_nothing_back():
    # v0 cap 1,000 pays 800; v1 cap 500: max(0, 500 - 800) = 0; an entry v1 doesn't name is kept.
    v0 = [layer("basic", "basic", [rule({}, ratio=10000, cap_group="g")], {"g": 1000 * Y}),
          layer("aid", "medical_aid", [rule({}, ratio=10000, cap_group="old")], {"old": 50 * Y})]
    v1 = [layer("basic", "basic", [rule({}, ratio=10000, cap_group="g")], {"g": 500 * Y})]
    ps = versions((None, v0, ()), (dt.date(2024, 3, 2), v1, ()))
    res, acc = run_both(ps, [dict(settle_time=day(0), in_scope_amount=800 * Y),
                             dict(settle_time=day(1), in_scope_amount=100 * Y)])
    assert pays(res) == [800 * Y, 0] and res[1]["cap_hit"]
    assert pays(res, "medical_aid_pay") == [0, 0]  # basic took all of K in the first claim
    assert acc[KEY]["layers"][("basic", "g")][1] == 800 * Y


def test_identities_unknown_only_when_no_version_of_the_year_declares_them():
    # v0 declares low_income (ratio +20 %); v1 declares none: under v1 low_income is not held.
    lay = [layer("basic", "basic", [rule({}, ratio=5000)])]
    lay_adj = [layer("basic", "basic", [rule({}, ratio=5000)], adjustments=[adj({"holds": ["low_income"]},
                                                                                  ratio_add=2000)])]
    ps = versions((None, lay_adj, ("low_income",)), (dt.date(2024, 3, 2), lay, ()))
    res, _ = run_both(ps, [
        dict(settle_time=day(0), identities=["low_income"], in_scope_amount=100 * Y),
        dict(settle_time=day(1), identities=["low_income"], in_scope_amount=100 * Y),
        dict(settle_time=day(1), identities=["poor"], in_scope_amount=100 * Y),
    ])
    assert [r["status"] for r in res] == ["ok", "ok", "UNKNOWN_IDENTITY"]
    assert pays(res)[:2] == [70 * Y, 50 * Y]
    assert [r["identity"] for r in res] == ["low_income", None, None]


@pytest.mark.parametrize("identities", [[None], ["low_income", None]])
def test_a_null_identity_item_is_unknown_identity_and_moves_nothing(identities):
    ps = single([rule({}, ratio=10000, axis="year", deductible=100 * Y)])
    rows = [dict(settle_time=day(0), identities=identities, in_scope_amount=500 * Y, claim_id="lost"),
            dict(settle_time=day(1), in_scope_amount=500 * Y, claim_id="next")]
    res, acc = run_both(ps, rows)
    assert [r["status"] for r in res] == ["UNKNOWN_IDENTITY", "ok"]
    assert pays(res) == [0, 400 * Y]  # the deductible is charged to the second claim: nothing moved before
    # the rows path (the server's) agrees
    def micros(t):
        return (t - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)

    got = engine.Settler(ps).settle_rows([tuple(micros(r[f.name]) if f.name == "settle_time" else r[f.name]
                                                for f in engine.CLAIMS_SCHEMA)
                                          for r in claims_table(rows).to_pylist()])
    assert [r["status"] for r in got] == ["UNKNOWN_IDENTITY", "ok"] and got[1]["basic_pay"] == 400 * Y


# ============================================================== revision 2: cap adjustments and nested caps


def test_cap_factor_rounded_after_each_factor():
    # cap 1,000 yuan; factors 1.5 then 0.3333: c = 15000, then round(15000 x 3333 / 10^4) = round(4999.5) = 5000,
    # so the cap is 500 yuan (not 1,000 x 0.49995 = 499.95).
    ps = single([rule({}, ratio=10000, cap_group="g")], {"g": 1000 * Y},
                [adj({}, cap_factor=15000), adj({}, cap_factor=3333)])
    assert settle_one(ps, in_scope_amount=2000 * Y)["basic_pay"] == 500 * Y


def test_cap_factor_is_at_most_a_hundredfold():
    # 10 x 10 x 10 = 1000 -> min(10^6, ...) bp = 100: a 1-yuan cap pays 100 yuan.
    ps = single([rule({}, ratio=10000, cap_group="g")], {"g": 1 * Y},
                [adj({}, cap_factor=100_000), adj({}, cap_factor=100_000), adj({}, cap_factor=100_000)])
    res = settle_one(ps, in_scope_amount=1000 * Y)
    assert res["basic_pay"] == 100 * Y and res["cap_hit"]


@pytest.mark.parametrize("kind", ["fixed_amount", "max_personal_share"])
@pytest.mark.parametrize("adjustment,expected,hit", [
    (None, 600, True),                        # the cap: 600
    ({"uncapped": True}, 1000, False),        # lifted: the whole raw amount, no cap_hit
    ({"uncapped": False}, 600, True),         # false changes nothing
    ({"cap_factor": 5000}, 300, True),        # half the cap
    ({"deductible_factor": 0, "ratio": 0}, 600, True),  # these act on ratio and segments rules only
])
def test_cap_adjustments_act_on_every_kind_of_rule(kind, adjustment, expected, hit):
    # fixed amount 1,000 yuan, or a guarantee leaving 0 on the person (raw 1,000); cap group 600.
    r = (rule({}, fixed_amount=1000 * Y, cap_group="g") if kind == "fixed_amount"
         else rule({}, max_personal_share=0, cap_group="g"))
    ps = single([r], {"g": 600 * Y}, [adj({"holds": ["low_income"]}, **adjustment)] if adjustment else [])
    res = settle_one(ps, identities=["low_income"], in_scope_amount=1000 * Y)
    assert (res["basic_pay"], res["cap_hit"]) == (expected * Y, hit)


def test_uncapped_claims_still_grow_every_group():
    # groups [a 800, b 900]: an uncapped claim pays 1,000 and both paid grow by it; a later
    # capped claim then finds no room in either.
    ps = single([rule({}, ratio=10000, cap_group=None, cap_groups=("a", "b"))], {"a": 800 * Y, "b": 900 * Y},
                [adj({"holds": ["extreme_poverty"]}, uncapped=True)])
    res, acc = run_both(ps, [dict(settle_time=day(0), identities=["extreme_poverty"], in_scope_amount=1000 * Y),
                             dict(settle_time=day(1), in_scope_amount=100 * Y)])
    assert pays(res) == [1000 * Y, 0]
    assert [r["cap_hit"] for r in res] == [False, True]
    assert acc[KEY]["layers"][("basic", "a")][1] == acc[KEY]["layers"][("basic", "b")][1] == 1000 * Y


def test_nested_caps_each_limit_and_each_grow():
    # chronic: year axis, D 100, 100 %, groups [chronic 300, pool 1,000]; inpatient: [pool].
    ps = single([rule({"visit_type": ["chronic"]}, ratio=10000, deductible=100 * Y, axis="year",
                      cap_groups=("chronic", "pool")),
                 rule({}, ratio=10000, cap_groups=("pool",))], {"chronic": 300 * Y, "pool": 1000 * Y})
    res, acc = run_both(ps, [
        dict(settle_time=day(0), visit_type="chronic", in_scope_amount=500 * Y),  # 400 above D; chronic: 300
        dict(settle_time=day(1), visit_type="inpatient", in_scope_amount=900 * Y),  # pool room 700
        dict(settle_time=day(2), visit_type="chronic", in_scope_amount=100 * Y),  # chronic room 0
    ])
    assert pays(res) == [300 * Y, 700 * Y, 0]
    assert [r["cap_hit"] for r in res] == [True, True, True]
    layers = acc[KEY]["layers"]
    # the first group holds position and deductible_charged; the other only paid
    assert layers[("basic", "chronic")] == [600 * Y, 300 * Y, 100 * Y]
    assert layers[("basic", "pool")] == [0, 1000 * Y, 0]
    assert res[0]["deductible_applied"] == 100 * Y


def test_rules_share_a_year_axis_exactly_when_their_first_groups_are_the_same():
    # rule A [g, h] and rule B [g] share g's axis (D 100 charged once); rule C [h, g] has its own.
    ps = single([rule({"visit_type": ["chronic"]}, ratio=10000, deductible=100 * Y, axis="year", cap_groups=("g", "h")),
                 rule({"visit_type": ["inpatient"]}, ratio=10000, deductible=100 * Y, axis="year", cap_groups=("g",)),
                 rule({}, ratio=10000, deductible=100 * Y, axis="year", cap_groups=("h", "g"))],
                {"g": 10_000 * Y, "h": 10_000 * Y})
    res, acc = run_both(ps, [dict(settle_time=day(0), visit_type="chronic", in_scope_amount=300 * Y),
                             dict(settle_time=day(1), visit_type="inpatient", in_scope_amount=300 * Y),
                             dict(settle_time=day(2), visit_type="outpatient", in_scope_amount=300 * Y)])
    # A: [0, 300) -> 200; B: [300, 600) -> 300; C on h's axis: [0, 300) -> 200.
    assert pays(res) == [200 * Y, 300 * Y, 200 * Y]
    layers = acc[KEY]["layers"]
    assert layers[("basic", "g")] == [600 * Y, 700 * Y, 100 * Y]
    assert layers[("basic", "h")] == [300 * Y, 400 * Y, 100 * Y]


def test_carry_across_a_version_change_equals_one_call():
    """Chunk after chunk, and call after call with carried accumulators, across a version
    change whose version renames a cap group and lowers another: the same as one call."""
    v0 = [layer("basic", "basic", [rule({}, ratio=6000, deductible=200 * Y, axis="year", cap_group="g")],
                {"g": 2000 * Y}),
          layer("aid", "medical_aid", [rule({}, ratio=5000, cap_group="old")], {"old": 300 * Y})]
    v1 = [layer("basic", "basic", [rule({}, ratio=9000, deductible=500 * Y, axis="year", cap_group="g")],
                {"g": 1500 * Y}),
          layer("aid", "medical_aid", [rule({}, ratio=5000, cap_group="new")], {"new": 100 * Y})]
    ps = versions((None, v0, ()), (dt.date(2024, 3, 3), v1, ()))
    rows = [dict(settle_time=day(d, h), person_id=p, in_scope_amount=a * Y, claim_id=f"c{d}{h}{p}")
            for d, h, p, a in [(0, 9, "p1", 700), (1, 9, "p2", 300), (1, 10, "p1", 900), (2, 9, "p1", 800),
                               (2, 10, "p2", 2000), (3, 9, "p1", 400), (3, 11, "p2", 50)]]
    table = claims_table(rows)
    whole, whole_acc = run_both(ps, table)
    # two calls: up to the change (March 1-2), then from it with the first call's accumulators
    first, first_acc = run_both(ps, table.slice(0, 3))
    second, second_acc = run_both(ps, table.slice(3), first_acc)
    assert first + second == whole
    assert ref.normalize_accumulators({**first_acc, **second_acc}) == ref.normalize_accumulators(whole_acc)
    # one call, a stream of chunks cut across the change
    s = engine.Settler(ps)
    streamed = [r for b in s.settle_batches(table.to_batches(max_chunksize=2)) for r in b.to_pylist()]
    assert streamed == whole
    assert acc_from_table(s.accumulators()) == whole_acc
    # v1 settles the claims from March 3: p1's position continues (700 + 900 + 800 = 2,400 before)
    assert [r["policy_id"] for r in whole] == ["v0", "v0", "v0", "v1", "v1", "v1", "v1"]
