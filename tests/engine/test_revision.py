"""Policy format revision 2 in the reference (tests/reference.py), by hand-computed cases.

Each case is a small policy set, claims and the numbers worked out by hand in
the comments (Y = 100 fen per yuan; ratios in basis points): versions in force
by settle date sharing the year's accumulators (SETTLEMENT.md sections 4, 5),
identities known to the year but not to the version in force, a null identity
item (section 2), cap adjustments on every rule kind (5.2 step 2) and nested
caps (5.2 step 7). The same cases run through `engine.settle` in
test_revision_engine.py; here they check the oracle itself.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

import reference as ref
from conftest import Y, adj, claim_dicts, claims_table, layer, policy, policy_set, rule

KEY = ("p1", "000001", "resident", 2024)


def key(person: str) -> tuple:
    return (person, "000001", "resident", 2024)


def at(month: int, day: int = 1, hour: int = 9, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime(2024, month, day, hour, minute, second)


@dataclass
class Case:
    """Policies, claims (partial rows for conftest.claims_table), expected result fields by
    claim_id, and expected closing accumulators of some keys in the normalized form
    (admissions, compliant_total, {(layer, cap_group): (position, paid, deductible_charged)})."""

    ps: object
    claims: list
    expect: dict
    acc: dict = field(default_factory=dict)
    carry: Optional[dict] = None
    entries: dict = field(default_factory=dict)  # key -> {(layer, cap_group): (position, paid, charged)}, some only


CASES: dict[str, Callable[[], Case]] = {}


def case(fn: Callable[[], Case]) -> Callable[[], Case]:
    CASES[fn.__name__] = fn
    return fn


def check(c: Case, results: list[dict], acc: dict) -> None:
    """The expected fields of every listed claim, and the listed keys' closing accumulators."""
    got = {r["claim_id"]: r for r in results}
    for cid, fields in c.expect.items():
        r = got[cid]
        actual = {k: ([(e["layer"], e["pay"]) for e in r[k]] if k == "layer_pays" else r[k]) for k in fields}
        assert actual == fields, f"{cid}: got {actual}, expected {fields}"
    norm = ref.normalize_accumulators(acc)
    for k, want in c.acc.items():
        assert norm.get(k) == want, f"accumulators {k}: got {norm.get(k)}, expected {want}"
    for k, want in c.entries.items():
        got_entries = norm[k][2]
        assert {e: got_entries.get(e) for e in want} == want, f"accumulators {k}: {got_entries}"


def reference_rows(c: Case) -> list[dict]:
    return claim_dicts(claims_table(c.claims))


# ============================================================== versions (sections 4, 5)


@case
def versions_share_the_year_axis_and_cap():
    """A version from July 1 raises the deductible, the ratio, and lowers the cap."""
    v1 = policy([layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, axis="year", deductible=1000 * Y,
                                                ratio=5000, cap_group="year")], {"year": 10000 * Y})], id="v1")
    v2 = policy([layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, axis="year", deductible=2000 * Y,
                                                ratio=6000, cap_group="year")], {"year": 6000 * Y})], id="v2",
                effective_from=dt.date(2024, 7, 1))
    claims = [
        dict(claim_id="c1", settle_time=at(3), in_scope_amount=5000 * Y),
        dict(claim_id="c2", settle_time=at(6, 30, 23, 59, 59), in_scope_amount=1000 * Y),
        dict(claim_id="c3", settle_time=at(7, 1, 0, 0), in_scope_amount=2000 * Y),
        dict(claim_id="c4", settle_time=at(8), in_scope_amount=5000 * Y),
        dict(claim_id="c5", settle_time=at(9), in_scope_amount=1000 * Y),
    ]
    expect = {
        # v1: [0, 5000), D 1000 at 0, 50 % of 4000 = 2000.
        "c1": dict(policy_id="v1", basic_pay=2000 * Y, deductible_applied=1000 * Y, cap_hit=False),
        # still v1 at 23:59:59 on June 30: [5000, 6000) at 50 % = 500; paid 2500.
        "c2": dict(policy_id="v1", basic_pay=500 * Y, deductible_applied=0),
        # v2 from 00:00 July 1: [6000, 8000), its D 2000 lies below the position: 60 % of 2000 = 1200;
        # room under the lowered cap 6000 - 2500 = 3500; paid 3700.
        "c3": dict(policy_id="v2", basic_pay=1200 * Y, deductible_applied=0, cap_hit=False),
        # [8000, 13000) at 60 % = 3000, room 6000 - 3700 = 2300.
        "c4": dict(policy_id="v2", basic_pay=2300 * Y, cap_hit=True),
        # the cap is full: 0, and layer_pays is empty.
        "c5": dict(policy_id="v2", basic_pay=0, cap_hit=True, layer_pays=[], personal_pay=1000 * Y),
    }
    acc = {KEY: (5, 14000 * Y, {("basic", "year"): (14000 * Y, 6000 * Y, 1000 * Y)})}
    return Case(policy_set(v2, v1), claims, expect, acc)


@case
def a_cap_lowered_below_paid_pays_nothing_and_takes_nothing_back():
    v1 = policy([layer("basic", "basic", [rule({}, ratio=10000, cap_group="g")], {"g": 1000 * Y})], id="v1")
    v2 = policy([layer("basic", "basic", [rule({}, ratio=10000, cap_group="g")], {"g": 300 * Y})], id="v2",
                effective_from=dt.date(2024, 5, 1))
    claims = [dict(claim_id="c1", settle_time=at(2), in_scope_amount=800 * Y),
              dict(claim_id="c2", settle_time=at(6), in_scope_amount=100 * Y)]
    # c1: 800 under the cap of 1000. c2: max(0, 300 - 800) = 0; the 800 stays paid.
    expect = {"c1": dict(basic_pay=800 * Y, cap_hit=False), "c2": dict(policy_id="v2", basic_pay=0, cap_hit=True)}
    return Case(policy_set(v1, v2), claims, expect, {KEY: (2, 900 * Y, {("basic", "g"): (0, 800 * Y, 0)})})


@case
def a_raised_deductible_is_charged_again_from_the_position():
    v1 = policy([layer("basic", "basic", [rule({}, axis="year", deductible=1000 * Y, ratio=5000)])], id="v1")
    v2 = policy([layer("basic", "basic", [rule({}, axis="year", deductible=8000 * Y, ratio=5000)])], id="v2",
                effective_from=dt.date(2024, 7, 1))
    claims = [dict(claim_id="c1", settle_time=at(3), in_scope_amount=5000 * Y),
              dict(claim_id="c2", settle_time=at(7), in_scope_amount=5000 * Y)]
    expect = {
        # [0, 5000): D 1000, 50 % of 4000 = 2000.
        "c1": dict(basic_pay=2000 * Y, deductible_applied=1000 * Y),
        # [5000, 10000) under v2's D 8000: [5000, 8000) charged (3000), 50 % of 2000 = 1000.
        "c2": dict(basic_pay=1000 * Y, deductible_applied=3000 * Y),
    }
    return Case(policy_set(v1, v2), claims, expect,
                {KEY: (2, 10000 * Y, {("basic", None): (10000 * Y, 3000 * Y, 4000 * Y)})})


@case
def an_entry_a_version_does_not_use_is_kept_and_used_again():
    def version(pid, group, cap, start):
        return policy([layer("basic", "basic", [rule({}, ratio=10000, cap_group=group)], {group: cap * Y})],
                      id=pid, effective_from=start)

    ps = policy_set(version("v1", "opd", 1000, None), version("v2", "opd2", 500, dt.date(2024, 4, 1)),
                    version("v3", "opd", 1000, dt.date(2024, 8, 1)))
    claims = [dict(claim_id="c1", settle_time=at(2), visit_type="outpatient", in_scope_amount=600 * Y),
              dict(claim_id="c2", settle_time=at(5), visit_type="outpatient", in_scope_amount=700 * Y),
              dict(claim_id="c3", settle_time=at(9), visit_type="outpatient", in_scope_amount=700 * Y)]
    expect = {
        "c1": dict(policy_id="v1", basic_pay=600 * Y, cap_hit=False),  # opd paid 600
        "c2": dict(policy_id="v2", basic_pay=500 * Y, cap_hit=True),  # opd2 starts at 0: its cap 500
        "c3": dict(policy_id="v3", basic_pay=400 * Y, cap_hit=True),  # opd again: 1000 - 600 = 400
    }
    # The carried-in entry ("basic", "old") that no version names is returned unchanged.
    carry = {KEY: {"admissions": 0, "compliant_total": 77 * Y, "layers": {("basic", "old"): [0, 77 * Y, 0]}}}
    acc = {KEY: (0, (77 + 2000) * Y, {("basic", "opd"): (0, 1000 * Y, 0), ("basic", "opd2"): (0, 500 * Y, 0),
                                       ("basic", "old"): (0, 77 * Y, 0)})}
    return Case(ps, claims, expect, acc, carry)


@case
def before_the_first_version_is_unknown_policy():
    v = policy([layer("basic", "basic", [rule({}, ratio=5000)])], id="from-mar-30",
               effective_from=dt.date(2024, 3, 30))
    claims = [dict(claim_id="c1", settle_time=at(3, 29, 23, 59, 59), in_scope_amount=100 * Y),
              dict(claim_id="c2", settle_time=at(3, 30, 0, 0), in_scope_amount=100 * Y),
              dict(claim_id="c3", settle_time=dt.datetime(2025, 6, 1), in_scope_amount=100 * Y)]
    expect = {"c1": dict(status="UNKNOWN_POLICY", policy_id=None, basic_pay=0),
              "c2": dict(status="ok", policy_id="from-mar-30", basic_pay=50 * Y),
              "c3": dict(status="UNKNOWN_POLICY")}
    return Case(policy_set(v), claims, expect, {KEY: (1, 100 * Y, {("basic", None): (0, 50 * Y, 0)})})


@case
def admissions_and_repeat_factors_continue_across_versions():
    def version(pid, start, ratio):
        return policy([layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, deductible=1000 * Y,
                                                     repeat_admission=True, ratio=ratio)])],
                      id=pid, effective_from=start, repeat_factors=(10000, 5000))

    ps = policy_set(version("v1", None, 5000), version("v2", dt.date(2024, 7, 1), 8000))
    claims = [dict(claim_id="c1", settle_time=at(3), in_scope_amount=3000 * Y),
              dict(claim_id="c2", settle_time=at(8), in_scope_amount=3000 * Y)]
    expect = {
        "c1": dict(policy_id="v1", basic_pay=1000 * Y, deductible_applied=1000 * Y),  # 50 % of 2000
        # the second admission of the year, under v2: D = 1000 x 0.5 = 500; 80 % of 2500 = 2000
        "c2": dict(policy_id="v2", basic_pay=2000 * Y, deductible_applied=500 * Y),
    }
    return Case(ps, claims, expect, {KEY: (2, 6000 * Y, {("basic", None): (0, 3000 * Y, 1500 * Y)})})


# ============================================================== identities (sections 2, 5)


@case
def identities_known_to_the_year_but_not_to_the_version():
    basic = lambda adjustments: layer("basic", "basic", [rule({}, ratio=5000)], adjustments=adjustments)  # noqa
    v1 = policy([basic([adj({"identity": ["poor"]}, ratio_add=1000)])], id="v1", identities=("poor",))
    v2 = policy([basic([adj({"identity": ["farmer"]}, ratio=9000)]),
                 layer("top", "guarantee", [rule({"holds": ["farmer"]}, max_personal_share=0)])],
                id="v2", identities=("farmer", "poor"), effective_from=dt.date(2024, 7, 1))
    ps = policy_set(v1, v2)
    c = lambda cid, p, month, ids, **kw: dict(claim_id=cid, person_id=p, settle_time=at(month), identities=ids,  # noqa
                                              in_scope_amount=1000 * Y, **kw)
    claims = [
        c("c1", "a", 3, ["farmer"]),  # v1 doesn't declare farmer: not held; 50 % = 500
        c("c2", "a", 8, ["farmer"]),  # v2: farmer, 90 % = 900, then the guarantee takes the rest (100)
        c("c3", "b", 3, ["rich"]),  # no version of the year declares it
        c("c4", "c", 3, ["poor", None]),  # a null item: UNKNOWN_IDENTITY (section 2)
        c("c5", "d", 3, [None]),
        c("c6", "e", 3, [None], region="999999"),  # UNKNOWN_POLICY comes first
        c("c7", "f", 8, ["poor", "farmer"]),  # v2 ranks farmer first: 900 + 100
        c("c8", "g", 3, ["poor", "farmer"]),  # v1: only poor held; 60 % = 600
        c("c9", "h", 3, []),  # none: 500
        c("c10", "i", 8, ["poor"]),  # v2: poor declared but no rule for it: 500
    ]
    expect = {
        "c1": dict(status="ok", identity=None, basic_pay=500 * Y, guarantee_pay=0),
        "c2": dict(status="ok", identity="farmer", basic_pay=900 * Y, guarantee_pay=100 * Y, personal_pay=0),
        "c3": dict(status="UNKNOWN_IDENTITY", identity=None, basic_pay=0),
        "c4": dict(status="UNKNOWN_IDENTITY", basic_pay=0),
        "c5": dict(status="UNKNOWN_IDENTITY"),
        "c6": dict(status="UNKNOWN_POLICY"),
        "c7": dict(status="ok", identity="farmer", basic_pay=900 * Y, guarantee_pay=100 * Y),
        "c8": dict(status="ok", identity="poor", basic_pay=600 * Y),
        "c9": dict(status="ok", identity=None, basic_pay=500 * Y),
        "c10": dict(status="ok", identity="poor", basic_pay=500 * Y, guarantee_pay=0),
    }
    # A rejected claim moves nothing: person c has no accumulators.
    return Case(ps, claims, expect, {key("c"): None, key("a"): (2, 2000 * Y, {("basic", None): (0, 1400 * Y, 0),
                                                                           ("top", None): (0, 100 * Y, 0)})})


# ============================================================== cap adjustments (5.2 step 2, step 7)


@case
def cap_factors_round_after_each_factor_in_file_order():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=10000, cap_group="year")], {"year": 1000 * Y},
                                  [adj({"identity": ["poor"]}, cap_factor=15000),
                                   adj({"holds": ["low"]}, cap_factor=3333)])],
                           identities=("poor", "low")))
    claims = [dict(claim_id="a1", person_id="a", settle_time=at(3), identities=["poor", "low"],
                   in_scope_amount=3000 * Y),
              dict(claim_id="b1", person_id="b", settle_time=at(3), identities=["poor"], in_scope_amount=3000 * Y),
              dict(claim_id="b2", person_id="b", settle_time=at(4), identities=["poor"], in_scope_amount=1000 * Y),
              dict(claim_id="c1", person_id="c", settle_time=at(3), in_scope_amount=3000 * Y)]
    expect = {
        # c = round(10000 x 1.5) = 15000, then round(15000 x 0.3333) = round(4999.5) = 5000 (half up);
        # cap = 1000 x 0.5 = 500. (The product 0.49995 taken at once would give 499.95.)
        "a1": dict(basic_pay=500 * Y, cap_hit=True),
        "b1": dict(basic_pay=1500 * Y, cap_hit=True),  # c = 15000: cap 1500
        "b2": dict(basic_pay=0, cap_hit=True),  # 1500 already paid under the raised cap
        "c1": dict(basic_pay=1000 * Y, cap_hit=True),  # no adjustment: 1000
    }
    return Case(ps, claims, expect, {key("a"): (1, 3000 * Y, {("basic", "year"): (0, 500 * Y, 0)})})


@case
def the_cap_factor_stops_at_100_and_may_be_zero():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=10000, cap_group="g")], {"g": 10 * Y},
                                  [adj({}, cap_factor=100000), adj({}, cap_factor=100000),
                                   adj({}, cap_factor=100000), adj({"holds": ["half"]}, cap_factor=5000),
                                   adj({"holds": ["none"]}, cap_factor=0)])],
                           identities=("half", "none")))
    claims = [dict(claim_id="a", person_id="a", settle_time=at(3), in_scope_amount=10000 * Y),
              dict(claim_id="b", person_id="b", settle_time=at(3), identities=["half"], in_scope_amount=10000 * Y),
              dict(claim_id="c", person_id="c", settle_time=at(3), identities=["none"], in_scope_amount=10000 * Y)]
    expect = {
        # 10^4 x 10 = 10^5, x 10 = 10^6, x 10 = min(10^6, 10^7) = 10^6: cap 10 x 100 = 1000.
        "a": dict(basic_pay=1000 * Y, cap_hit=True),
        # then x 0.5 = 500000: cap 500 (not 10^7 x 0.5 = 5000).
        "b": dict(basic_pay=500 * Y, cap_hit=True),
        # then x 0: cap 0.
        "c": dict(basic_pay=0, cap_hit=True, layer_pays=[]),
    }
    return Case(ps, claims, expect)


@case
def cap_adjustments_act_on_fixed_amounts_and_guarantees():
    basic = layer("basic", "basic",
                  [rule({"visit_type": ["maternity"]}, fixed_amount=3000 * Y, cap_group="mat"),
                   rule({"visit_type": ["inpatient"]}, ratio=5000, cap_group="year")],
                  {"mat": 1000 * Y, "year": 1000 * Y},
                  [adj({"identity": ["poor"]}, cap_factor=20000)])
    zero = layer("zero", "guarantee", [rule({}, max_personal_share=0, cap_group="g")], {"g": 200 * Y},
                 [adj({"identity": ["poor"]}, cap_factor=100000), adj({"locality": ["county"]}, uncapped=True),
                  adj({}, uncapped=False)])
    ps = policy_set(policy([basic, zero], identities=("poor",)))
    mk = lambda cid, p, vt, loc, ids, amount, month=3: dict(  # noqa: E731
        claim_id=cid, person_id=p, visit_type=vt, locality=loc, identities=ids, settle_time=at(month),
        in_scope_amount=amount * Y)
    claims = [
        mk("m1", "a", "maternity", "county", ["poor"], 5000),
        mk("m2", "b", "maternity", "province", None, 5000),
        mk("m3", "c", "maternity", "province", ["poor"], 5000),
        mk("i1", "f", "inpatient", "county", None, 1000),
        mk("i2", "f", "inpatient", "province", None, 1000, month=4),
    ]
    expect = {
        # fixed 3000 under the mat cap 1000 x 2 = 2000; the guarantee is uncapped in county
        # (`uncapped: false` after it changes nothing): 5000 - 2000 = 3000.
        "m1": dict(basic_pay=2000 * Y, guarantee_pay=3000 * Y, personal_pay=0, cap_hit=True),
        # cap 1000; guarantee capped at 200 out of county.
        "m2": dict(basic_pay=1000 * Y, guarantee_pay=200 * Y, cap_hit=True),
        # cap 2000; guarantee cap 200 x 10 = 2000 of the 3000 left.
        "m3": dict(basic_pay=2000 * Y, guarantee_pay=2000 * Y, cap_hit=True),
        # 50 % of 1000 = 500 under the cap; the guarantee pays the other 500 uncapped: no cap_hit,
        # but its group's paid grows to 500, above its cap of 200 ...
        "i1": dict(basic_pay=500 * Y, guarantee_pay=500 * Y, cap_hit=False),
        # ... so out of county it has no room left: 0, and cap_hit.
        "i2": dict(basic_pay=500 * Y, guarantee_pay=0, cap_hit=True),
    }
    acc = {key("f"): (2, 2000 * Y, {("basic", "year"): (0, 1000 * Y, 0), ("zero", "g"): (0, 500 * Y, 0)})}
    return Case(ps, claims, expect, acc)


@case
def a_person_gaining_an_identity_keeps_one_position():
    """Critical illness with "no cap for the poor" as one rule with an `uncapped` adjustment."""
    ci = rule({"visit_type": ["inpatient"]}, axis="year", deductible=15000 * Y,
              segments=[(50000 * Y, 6000), (100000 * Y, 7000), (None, 8000)], cap_group="year")
    ps = policy_set(policy([layer("basic", "basic", [ci], {"year": 400000 * Y},
                                  [adj({"identity": ["low_income"]}, deductible_factor=5000, ratio_add=500,
                                       uncapped=True)])],
                           identities=("low_income",)))
    claims = [dict(claim_id="c1", settle_time=at(3), in_scope_amount=100000 * Y),
              dict(claim_id="c2", settle_time=at(7), identities=["low_income"], in_scope_amount=100000 * Y),
              dict(claim_id="c3", settle_time=at(10), in_scope_amount=3000000 * Y)]
    expect = {
        # [0, 100000): D 15000; 60 % of 35000 = 21000 + 70 % of 50000 = 35000: 56000.
        "c1": dict(basic_pay=56000 * Y, deductible_applied=15000 * Y, cap_hit=False),
        # low income from June: D 7500 lies below the position, nothing charged again;
        # [100000, 200000) at 80 % + 5 % = 85000, uncapped.
        "c2": dict(basic_pay=85000 * Y, deductible_applied=0, cap_hit=False, identity="low_income"),
        # identity ended: [200000, 3200000) at 80 % = 2400000, capped by 400000 - 141000 = 259000.
        "c3": dict(basic_pay=259000 * Y, cap_hit=True),
    }
    return Case(ps, claims, expect,
                {KEY: (3, 3200000 * Y, {("basic", "year"): (3200000 * Y, 400000 * Y, 15000 * Y)})})


# ============================================================== nested caps (5.2 steps 6, 7)


@case
def nested_caps_limit_by_every_group_and_share_axes_by_the_first():
    rules = [
        rule({"visit_type": ["outpatient"], "facility_level": ["primary"]}, ratio=10000,
             cap_groups=("primary", "outpatient")),
        rule({"visit_type": ["outpatient"], "facility_level": ["secondary"]}, axis="year", deductible=100 * Y,
             ratio=10000, cap_groups=("secondary", "outpatient")),
        rule({"visit_type": ["chronic"]}, axis="year", deductible=100 * Y, ratio=10000, cap_groups=("secondary",)),
        rule({"visit_type": ["outpatient"], "facility_level": ["tertiary"]}, axis="year", deductible=100 * Y,
             ratio=10000, cap_groups=("outpatient",)),
    ]
    ps = policy_set(policy([layer("basic", "basic", rules, {"primary": 300 * Y, "secondary": 500 * Y,
                                                            "outpatient": 600 * Y})]))
    mk = lambda cid, day, vt, level, amount: dict(claim_id=cid, settle_time=at(3, day), visit_type=vt,  # noqa
                                                  facility_level=level, in_scope_amount=amount * Y)
    claims = [mk("o1", 1, "outpatient", "primary", 200), mk("o2", 2, "outpatient", "primary", 200),
              mk("o3", 3, "outpatient", "secondary", 300), mk("o4", 4, "chronic", "tertiary", 150),
              mk("o5", 5, "outpatient", "tertiary", 400), mk("o6", 6, "outpatient", "secondary", 100)]
    expect = {
        "o1": dict(basic_pay=200 * Y, cap_hit=False),  # primary 200, outpatient 200
        "o2": dict(basic_pay=100 * Y, cap_hit=True),  # primary room 100 < outpatient room 400
        # (secondary) axis [0, 300): D 100, pays 200; room min(500, 600 - 300): 200; outpatient 500
        "o3": dict(basic_pay=200 * Y, deductible_applied=100 * Y, cap_hit=False),
        # chronic shares the (secondary) axis: [300, 450) above D: 150; only secondary grows (350)
        "o4": dict(basic_pay=150 * Y, deductible_applied=0, cap_hit=False),
        # (outpatient) is its own axis: [0, 400), D 100 charged, raw 300, room 600 - 500 = 100
        "o5": dict(basic_pay=100 * Y, deductible_applied=100 * Y, cap_hit=True),
        # (secondary) axis [450, 550): raw 100; outpatient full: 0
        "o6": dict(basic_pay=0, deductible_applied=0, cap_hit=True),
    }
    acc = {KEY: (0, 1350 * Y, {("basic", "primary"): (0, 300 * Y, 0),
                               ("basic", "secondary"): (550 * Y, 350 * Y, 100 * Y),
                               ("basic", "outpatient"): (400 * Y, 600 * Y, 100 * Y)})}
    return Case(ps, claims, expect, acc)


@case
def nested_caps_with_a_cap_factor_and_uncapped():
    rules = [rule({}, ratio=10000, cap_groups=("level", "all"))]
    ps = policy_set(policy([layer("basic", "basic", rules, {"level": 100 * Y, "all": 150 * Y},
                                  [adj({"holds": ["double"]}, cap_factor=20000),
                                   adj({"holds": ["free"]}, uncapped=True)])],
                           identities=("double", "free")))
    claims = [dict(claim_id="d1", person_id="d", settle_time=at(3), identities=["double"], in_scope_amount=500 * Y),
              dict(claim_id="f1", person_id="f", settle_time=at(3), identities=["free"], in_scope_amount=500 * Y),
              dict(claim_id="f2", person_id="f", settle_time=at(4), in_scope_amount=10 * Y)]
    expect = {
        # both caps doubled: min(200, 300) = 200.
        "d1": dict(basic_pay=200 * Y, cap_hit=True),
        # uncapped: 500, both groups' paid grow by it ...
        "f1": dict(basic_pay=500 * Y, cap_hit=False),
        # ... so the next claim without the identity finds no room.
        "f2": dict(basic_pay=0, cap_hit=True),
    }
    return Case(ps, claims, expect, {key("f"): (2, 510 * Y, {("basic", "level"): (0, 500 * Y, 0),
                                                              ("basic", "all"): (0, 500 * Y, 0)})})


# ============================================================== wording made precise (5.2)


@case
def repeat_admission_has_no_effect_on_the_year_axis():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, axis="year", deductible=1000 * Y, ratio=10000,
                                                          repeat_admission=True)])],
                           repeat_factors=(10000, 5000)))
    claims = [dict(claim_id="c1", settle_time=at(3), in_scope_amount=600 * Y),
              dict(claim_id="c2", settle_time=at(4), in_scope_amount=1000 * Y)]
    # c1 [0, 600) all below D 1000; c2 [600, 1600): D stays 1000 (not 500): 600.
    expect = {"c1": dict(basic_pay=0, deductible_applied=600 * Y),
              "c2": dict(basic_pay=600 * Y, deductible_applied=400 * Y)}
    return Case(ps, claims, expect)


@case
def a_guarantee_in_the_first_layer_works_on_in_scope():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, max_personal_share=1000)])],
                           compliant_includes_class_b_copay=True))
    claims = [dict(claim_id="g", in_scope_amount=1000 * Y, class_b_copay_amount=200 * Y)]
    # K = 1000 + 200 = 1200; the base is in_scope: 1000 - round(10% x 1200) = 880;
    # the patient keeps 120 and the copay besides: compliant personal 1200 - 880 = 320
    return Case(ps, claims, {"g": dict(basic_pay=880 * Y, deductible_applied=0, compliant_personal_pay=320 * Y,
                                       personal_pay=320 * Y)})


@case
def a_null_claim_id_takes_no_id():
    ps = policy_set(policy([layer("basic", "basic", [rule({}, ratio=5000)])]))
    claims = [dict(claim_id=None, person_id="a", in_scope_amount=100 * Y),
              dict(claim_id="x", person_id="b", in_scope_amount=100 * Y),
              dict(claim_id="x", person_id="c", in_scope_amount=100 * Y)]
    # the null id is MISSING_FIELD and changes nothing; "x" is settled once, then a duplicate
    return Case(ps, claims, {None: dict(status="MISSING_FIELD")},
                {key("a"): None, key("b"): (1, 100 * Y, {("basic", None): (0, 50 * Y, 0)}), key("c"): None})


# ============================================================== the reference on every case


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_case(name):
    c = CASES[name]()
    results, acc = ref.settle(c.ps, reference_rows(c), c.carry)
    check(c, results, acc)


def test_reference_in_force_version_by_calendar_date():
    v1 = policy([layer("basic", "basic", [rule({}, ratio=5000)])], id="v1")
    v2 = policy([layer("basic", "basic", [rule({}, ratio=6000)])], id="v2", effective_from=dt.date(2024, 3, 21))
    assert ref.find_policy([v2, v1], "000001", "resident", at(3, 20, 23, 59)).id == "v1"
    assert ref.find_policy([v2, v1], "000001", "resident", at(3, 21, 0, 0)).id == "v2"
    assert ref.find_policy([v2, v1], "000001", "employee", at(3, 21)) is None
    assert ref.year_identities([v1, v2], "000001", "resident", 2024) == set()


def test_reference_stream_across_a_version_change_equals_one_call():
    c = CASES["versions_share_the_year_axis_and_cap"]()
    rows = reference_rows(c)
    whole, whole_acc = ref.settle(c.ps, rows)
    first, acc = ref.settle(c.ps, rows[:2])
    second, acc = ref.settle(c.ps, rows[2:], acc)
    assert first + second == whole and acc == whole_acc
