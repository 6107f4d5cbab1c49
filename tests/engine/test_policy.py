"""The policy loader (SETTLEMENT.md section 6): exact numbers in, precise errors out.

Every load error is asserted with its full message, because the message is the
interface a policy author works with: file, key path, reason.
"""
from __future__ import annotations

import copy
import datetime as dt
import os
import pickle
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model import BP, Adjustment, Match, Segment
from engine.policy import (
    PolicyError,
    default_policies_path,
    load_policies,
    load_policy_file,
    parse_policy,
)


def shared_dir() -> Path:
    env = os.environ.get("MEDSETTLE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"


# The example of SETTLEMENT.md section 6, verbatim.
SPEC_EXAMPLE = """\
id: shuozhou-resident-2022
region: "140600"
scheme: resident
year: 2022
title: 朔州市城乡居民基本医疗保险 2022
sources: [002_0f2c2e4dd98a157b.txt]
identities: [extreme_poverty, low_income, poverty_returned, poverty_risk, monitored]
compliant_includes_class_b_copay: false
repeat_admission: {factors: [1.0, 0.5], floor: 0}
disease_groups:
  hypertension_diabetes: [I10-I15, E10-E14]
layers:
  - name: basic
    fund: basic
    cap_groups: {inpatient: 160000, outpatient: 230, two_diseases: 300}
    rules:
      - match: {visit_type: [inpatient], facility_level: [primary]}
        deductible: 150
        repeat_admission: true
        ratio: 0.85
        cap_group: inpatient
      - match: {visit_type: [inpatient], facility_level: [secondary]}
        deductible: 500
        repeat_admission: true
        ratio: 0.75
        cap_group: inpatient
      - match: {visit_type: [inpatient], facility_level: [tertiary]}
        deductible: 1000
        repeat_admission: true
        segments: [{upto: 20000, ratio: 0.60}, {ratio: 0.65}]
        cap_group: inpatient
      - match: {visit_type: [chronic], disease_group: [hypertension_diabetes]}
        ratio: 0.50
        cap_group: two_diseases
      - match: {visit_type: [chronic]}
        axis: year
        deductible: 600
        ratio: 0.65
        cap_group: inpatient
      - match: {visit_type: [outpatient]}
        ratio: {class_a: 0.55, class_b: 0.45}
        cap_group: outpatient
      - match: {visit_type: [maternity]}
        fixed_amount: 2280
    adjustments:
      - match: {identity: [extreme_poverty, low_income], locality: [county]}
        deductible_factor: 0
        ratio_add: 0.05
  - name: critical_illness
    fund: critical_illness
    cap_groups: {year: 400000}
    rules:
      - match: {visit_type: [inpatient, chronic]}
        axis: year
        deductible: 15000
        segments: [{upto: 50000, ratio: 0.60}, {upto: 100000, ratio: 0.70}, {ratio: 0.80}]
        cap_group: year
    adjustments:
      - match: {identity: [extreme_poverty, low_income]}
        deductible_factor: 0.5
        ratio_add: 0.05
  - name: assistance
    fund: medical_aid
    cap_groups: {year: 60000}
    rules:
      - match: {holds: [extreme_poverty]}
        axis: year
        ratio: 1.0
        cap_group: year
      - match: {holds: [low_income, poverty_returned, poverty_risk]}
        axis: year
        ratio: 0.70
        cap_group: year
      - match: {holds: [monitored], visit_type: [inpatient]}
        axis: year
        deductible: 2742.60
        ratio: 0.70
        cap_group: year
  - name: county_zero_pay
    fund: guarantee
    rules:
      - match: {identity: [extreme_poverty], locality: [county], visit_type: [inpatient]}
        max_personal_share: 0.0
"""


def base() -> dict:
    """A small valid policy touching every rule kind; tests break one thing in it.

    layers[0].rules: [0] ratio, [1] class ratio, [2] fixed amount;
    layers[1].rules[0] segments on the year axis; layers[2].rules[0] max_personal_share.
    """
    return {
        "id": "t-resident-2024",
        "region": "000001",
        "scheme": "resident",
        "year": 2024,
        "identities": ["poor", "low"],
        "disease_groups": {"dm": ["E10-E14", "I10"]},
        "layers": [
            {
                "name": "basic",
                "fund": "basic",
                "cap_groups": {"year": 100000},
                "rules": [
                    {"match": {"visit_type": ["inpatient"]}, "deductible": 500, "ratio": 0.7, "cap_group": "year"},
                    {"match": {"visit_type": ["outpatient"]}, "ratio": {"class_a": 0.5, "class_b": 0.4}},
                    {"match": {"visit_type": ["maternity"]}, "fixed_amount": 2280},
                ],
                "adjustments": [{"match": {"identity": ["poor"]}, "ratio_add": 0.05}],
            },
            {
                "name": "ci",
                "fund": "critical_illness",
                "rules": [
                    {"match": {}, "axis": "year", "deductible": 15000,
                     "segments": [{"upto": 50000, "ratio": 0.6}, {"ratio": 0.7}]},
                ],
            },
            {
                "name": "aid",
                "fund": "medical_aid",
                "rules": [{"match": {"holds": ["poor"]}, "max_personal_share": 0.1}],
            },
        ],
    }


def load_error(mapping, filename="t.yaml") -> str:
    with pytest.raises(PolicyError) as e:
        parse_policy(mapping, filename)
    return str(e.value)


# --------------------------------------------------------------------------- valid policies


def test_spec_example_parses_to_exact_units():
    p = parse_policy(yaml.safe_load(SPEC_EXAMPLE), "shuozhou-resident-2022.yaml")
    assert (p.id, p.region, p.scheme, p.year) == ("shuozhou-resident-2022", "140600", "resident", 2022)
    assert p.title == "朔州市城乡居民基本医疗保险 2022"
    assert p.sources == ("002_0f2c2e4dd98a157b.txt",)
    assert p.identities == ("extreme_poverty", "low_income", "poverty_returned", "poverty_risk", "monitored")
    assert p.compliant_includes_class_b_copay is False
    assert (p.repeat_factors, p.repeat_floor) == ((10000, 5000), 0)
    assert p.disease_groups == {"hypertension_diabetes": (("I10", "I15"), ("E10", "E14"))}
    assert p.path == "shuozhou-resident-2022.yaml"
    assert [(l.name, l.fund) for l in p.layers] == [
        ("basic", "basic"), ("critical_illness", "critical_illness"),
        ("assistance", "medical_aid"), ("county_zero_pay", "guarantee")]

    basic, ci, aid, zero = p.layers
    assert basic.cap_groups == {"inpatient": 16_000_000, "outpatient": 23_000, "two_diseases": 30_000}
    assert list(basic.cap_groups) == ["inpatient", "outpatient", "two_diseases"]  # file order
    primary, secondary, tertiary, two_diseases, chronic, outpatient, maternity = basic.rules
    assert primary.match == Match(visit_type=("inpatient",), facility_level=("primary",))
    assert (primary.kind, primary.segments, primary.deductible) == ("segments", (Segment(None, 8500),), 15000)
    assert (primary.repeat_admission, primary.cap_group, primary.axis, primary.bounds) == (
        True, "inpatient", "claim", "absolute")
    assert secondary.segments == (Segment(None, 7500),) and secondary.deductible == 50000
    assert tertiary.segments == (Segment(2_000_000, 6000), Segment(None, 6500))
    assert tertiary.deductible == 100_000
    assert two_diseases.match.disease_group == ("hypertension_diabetes",)
    assert (two_diseases.deductible, two_diseases.repeat_admission) == (0, False)
    assert (chronic.axis, chronic.deductible, chronic.segments) == ("year", 60000, (Segment(None, 6500),))
    assert (outpatient.kind, outpatient.class_ratio, outpatient.segments) == ("class_ratio", (5500, 4500), ())
    assert (maternity.kind, maternity.fixed_amount, maternity.cap_group) == ("fixed_amount", 228_000, None)
    assert basic.adjustments == (Adjustment(
        Match(identity=("extreme_poverty", "low_income"), locality=("county",)),
        deductible_factor=0, ratio_add=500),)

    (ci_rule,) = ci.rules
    assert ci_rule.segments == (Segment(5_000_000, 6000), Segment(10_000_000, 7000), Segment(None, 8000))
    assert (ci_rule.deductible, ci_rule.axis, ci.cap_groups) == (1_500_000, "year", {"year": 40_000_000})
    assert ci.adjustments[0].deductible_factor == 5000 and ci.adjustments[0].ratio is None

    assert [r.segments[0].ratio for r in aid.rules] == [BP, 7000, 7000]
    assert aid.rules[2].deductible == 274_260  # 2742.60 yuan, exactly
    assert aid.rules[0].match.holds == ("extreme_poverty",)
    assert zero.rules[0].kind == "max_personal_share" and zero.rules[0].max_personal_share == 0
    assert zero.cap_groups == {} and zero.adjustments == ()


def test_spec_example_in_settlement_md_is_the_one_tested_here():
    spec = shared_dir() / "spec" / "SETTLEMENT.md"
    if not spec.exists():
        pytest.skip(f"{spec} not found (set MEDSETTLE_SHARED)")
    block = re.search(r"```yaml\n(.*?)```", spec.read_text(encoding="utf-8"), re.S).group(1)
    assert parse_policy(yaml.safe_load(block), "x.yaml") == parse_policy(yaml.safe_load(SPEC_EXAMPLE), "x.yaml")


def test_defaults_and_small_forms():
    p = parse_policy(base(), "dir/t.yaml")
    assert p.path == "dir/t.yaml" and p.title == "" and p.sources == ()
    assert (p.repeat_factors, p.repeat_floor, p.compliant_includes_class_b_copay) == ((BP,), 0, False)
    assert p.disease_groups == {"dm": (("E10", "E14"), ("I10", "I10"))}  # a single category is (X, X)
    r = p.layers[1].rules[0]
    assert (r.kind, r.segments, r.deductible, r.axis) == ("segments", (Segment(5_000_000, 6000), Segment(None, 7000)),
                                                          1_500_000, "year")
    assert p.layers[1].rules[0].match == Match()  # an empty match matches anything
    assert p.layers[0].adjustments[0].ratio_add == 500
    assert p.layers[2].rules[0].max_personal_share == 1000


def test_numbers_are_exact_and_signed_where_allowed():
    d = base()
    rule = d["layers"][0]["rules"][0]
    rule.update(deductible=0.1, ratio=0.0001, bounds="above_deductible")
    d["layers"][0]["adjustments"] = [{"match": {"min_age": 0, "max_age": 0, "referred": True},
                                      "ratio_add": -0.05, "ratio": 1, "deductible_factor": 0.9999}]
    d["repeat_admission"] = {"factors": [1, 0.75], "floor": 10000000000}
    d["compliant_includes_class_b_copay"] = True
    p = parse_policy(d, "t.yaml")
    r = p.layers[0].rules[0]
    assert (r.deductible, r.segments, r.bounds) == (10, (Segment(None, 1),), "above_deductible")
    assert p.layers[0].adjustments == (Adjustment(Match(referred=True, min_age=0, max_age=0),
                                                  deductible_factor=9999, ratio=BP, ratio_add=-500),)
    assert (p.repeat_factors, p.repeat_floor) == ((BP, 7500), 10**12)
    assert p.compliant_includes_class_b_copay is True


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**12))
def test_any_two_decimal_yuan_amount_becomes_exact_fen(fen):
    """A YAML float money value converts to fen with no float error, up to the 10^10 yuan limit."""
    d = base()
    d["layers"][0]["cap_groups"]["year"] = yaml.safe_load(f"{fen // 100}.{fen % 100:02d}")
    assert parse_policy(d, "t.yaml").layers[0].cap_groups["year"] == fen


@settings(max_examples=300, deadline=None)
@given(st.integers(0, BP))
def test_any_four_decimal_ratio_becomes_exact_bp(bp):
    d = base()
    d["layers"][0]["rules"][0]["ratio"] = yaml.safe_load(f"{bp // BP}.{bp % BP:04d}")
    assert parse_policy(d, "t.yaml").layers[0].rules[0].segments == (Segment(None, bp),)


def _published_cases():
    path = shared_dir() / "spec" / "cases" / "published.yaml"
    if not path.exists():
        if os.environ.get("MEDSETTLE_SHARED"):
            raise FileNotFoundError(path)
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} not found"), id="missing")]
    cases = yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]
    return [pytest.param(c, id=c["name"]) for c in cases]


@pytest.mark.parametrize("case", _published_cases())
def test_published_case_policy_loads(case):
    p = parse_policy(case["policy"], f"{case['name']}.yaml")
    assert p.id == case["policy"]["id"] and p.layers[0].fund == "basic"


def test_published_case_numbers():
    path = shared_dir() / "spec" / "cases" / "published.yaml"
    if not path.exists():
        pytest.skip(f"{path} not found")
    cases = {c["name"]: c for c in yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]}
    e1 = parse_policy(cases["E1-segmented-basic-plus-ci"]["policy"], "e1.yaml")
    assert e1.layers[0].rules[0].deductible == 90_000
    assert e1.layers[0].rules[0].segments == (Segment(2_000_000, 6800), Segment(4_000_000, 7300), Segment(None, 7800))
    e7 = parse_policy(cases["E7-repeat-admissions"]["policy"], "e7.yaml")
    assert e7.repeat_factors == (BP, 7000, 5000) and e7.layers[0].rules[0].repeat_admission


# --------------------------------------------------------------------------- load errors
# One case per kind of error: (mutation of base(), full message).

def _set(path, value):
    """A mutation that sets base()[path...] = value; path like ('layers', 0, 'fund')."""
    def mutate(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        d[last] = value
    return mutate


def _pop(path):
    def mutate(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        del d[last]
    return mutate


def _both(*mutations):
    def mutate(d):
        for m in mutations:
            m(d)
    return mutate


R0 = ("layers", 0, "rules", 0)  # ratio rule
CR = ("layers", 0, "rules", 1)  # class ratio rule
FX = ("layers", 0, "rules", 2)  # fixed amount rule
SG = ("layers", 1, "rules", 0)  # segments rule, second layer
MP = ("layers", 2, "rules", 0)  # max_personal_share rule, third layer
ADJ = ("layers", 0, "adjustments", 0)
KINDS = "ratio, segments, fixed_amount, max_personal_share"

LOAD_ERRORS = [
    # file level
    ("missing-id", _pop(("id",)), "(file): missing required key 'id'"),
    ("missing-layers", _pop(("layers",)), "(file): missing required key 'layers'"),
    ("unknown-file-key", _set(("ragion",), "1"), "ragion: unknown key 'ragion'"),
    ("region-not-string", _set(("region",), 140600), "region: must be a string (quote it)"),
    ("region-empty", _set(("region",), ""), "region: must not be empty"),
    ("id-not-string", _set(("id",), None), "id: must be a string, not null"),
    ("scheme-enum", _set(("scheme",), "worker"), "scheme: 'worker' is not one of: employee, resident"),
    ("year-string", _set(("year",), "2024"), "year: must be a whole number, not '2024'"),
    ("year-bool", _set(("year",), True), "year: must be a whole number, not true"),
    ("year-float", _set(("year",), 2024.0), "year: must be a whole number, not 2024.0"),
    ("year-low", _set(("year",), 1899), "year: 1899 is below 1900"),
    ("year-high", _set(("year",), 2201), "year: 2201 is above 2200"),
    ("title-not-string", _set(("title",), 5), "title: must be a string, not 5"),
    ("sources-not-list", _set(("sources",), "a.txt"), "sources: must be a list (write [a.txt])"),
    ("sources-entry", _set(("sources",), ["a.txt", 3]), "sources[1]: must be a string (quote it)"),
    ("identities-duplicate", _set(("identities",), ["poor", "low", "poor"]), "identities[2]: 'poor' is listed twice"),
    ("identity-yaml-bool", _set(("identities",), ["poor", False]), "identities[1]: must be a string (quote it)"),
    ("identities-not-list", _set(("identities",), {"poor": 1}), "identities: must be a list, not a mapping"),
    ("copay-not-bool", _set(("compliant_includes_class_b_copay",), "yes"),
     "compliant_includes_class_b_copay: must be true or false, not 'yes'"),
    # disease groups
    ("icd-malformed", _set(("disease_groups", "dm"), ["E1"]),
     "disease_groups.dm[0]: 'E1' is not an ICD-10 category or range (like E10 or E10-E14)"),
    ("icd-lowercase", _set(("disease_groups", "dm"), ["E10", "e11"]),
     "disease_groups.dm[1]: 'e11' is not an ICD-10 category or range (like E10 or E10-E14)"),
    ("icd-reversed", _set(("disease_groups", "dm"), ["E14-E10"]), "disease_groups.dm[0]: 'E14-E10': E14 is above E10"),
    ("icd-empty-group", _set(("disease_groups", "dm"), []), "disease_groups.dm: must not be empty"),
    ("icd-group-name", _set(("disease_groups", 12), ["E10"]), "disease_groups.12: must be a string (quote it)"),
    # repeat admission
    ("repeat-not-mapping", _set(("repeat_admission",), True),
     "repeat_admission: must be a mapping like {factors: [1.0, 0.5], floor: 0}, not true"),
    ("repeat-unknown-key", _set(("repeat_admission",), {"factor": [1.0]}),
     "repeat_admission.factor: unknown key 'factor'"),
    ("repeat-factors-empty", _set(("repeat_admission",), {"factors": []}),
     "repeat_admission.factors: must not be empty"),
    ("repeat-factor-high", _set(("repeat_admission",), {"factors": [1.0, 1.5]}),
     "repeat_admission.factors[1]: 1.5 is above 1"),
    ("repeat-floor-negative", _set(("repeat_admission",), {"floor": -1}), "repeat_admission.floor: -1 is below 0"),
    # layers
    ("layers-empty", _set(("layers",), []), "layers: must not be empty"),
    ("layers-not-list", _set(("layers",), {"name": "basic"}), "layers: must be a list, not a mapping"),
    ("layer-missing-fund", _pop(("layers", 1, "fund")), "layers[1]: missing required key 'fund'"),
    ("layer-missing-rules", _pop(("layers", 1, "rules")), "layers[1]: missing required key 'rules'"),
    ("layer-unknown-key", _set(("layers", 1, "cap_group"), "year"), "layers[1].cap_group: unknown key 'cap_group'"),
    ("first-fund-not-basic", _set(("layers", 0, "fund"), "medical_aid"),
     "layers[0].fund: the first layer's fund must be 'basic', not 'medical_aid'"),
    ("fund-enum", _set(("layers", 2, "fund"), "charity"),
     "layers[2].fund: 'charity' is not one of: basic, supplementary, critical_illness, medical_aid, guarantee"),
    ("layer-name-duplicate", _set(("layers", 2, "name"), "ci"),
     "layers[2].name: duplicate layer name 'ci' (also layers[1])"),
    ("rules-empty", _set(("layers", 1, "rules"), []), "layers[1].rules: must not be empty"),
    ("cap-decimals", _set(("layers", 0, "cap_groups", "year"), 100.125),
     "layers[0].cap_groups.year: 100.125 has 3 decimals; money takes at most 2"),
    ("cap-too-large", _set(("layers", 0, "cap_groups", "year"), 10**10 + 1),
     "layers[0].cap_groups.year: 10000000001 is above 10000000000"),
    ("cap-string", _set(("layers", 0, "cap_groups", "year"), "100,000"),
     "layers[0].cap_groups.year: must be a number, not '100,000'"),
    # rules: shape and kind
    ("rule-no-kind", _pop(R0 + ("ratio",)), f"layers[0].rules[0]: needs one of {KINDS}"),
    ("rule-two-kinds", _set(SG + ("ratio",), 0.5),
     f"layers[1].rules[0]: has both 'segments' and 'ratio'; a rule takes exactly one of {KINDS}"),
    ("class-ratio-with-segments", _set(CR + ("segments",), [{"ratio": 0.5}]),
     f"layers[0].rules[1]: has both 'ratio' and 'segments'; a rule takes exactly one of {KINDS}"),
    ("rule-unknown-key", _set(R0 + ("ratoi",), 0.5), "layers[0].rules[0].ratoi: unknown key 'ratoi'"),
    ("rule-missing-match", _pop(R0 + ("match",)), "layers[0].rules[0]: missing required key 'match'"),
    ("rule-not-mapping", _set(("layers", 1, "rules"), ["ratio: 0.5"]),
     "layers[1].rules[0]: must be a mapping, not 'ratio: 0.5'"),
    ("deductible-on-fixed", _set(FX + ("deductible",), 0),
     "layers[0].rules[2].deductible: 'deductible' does not apply to a fixed_amount rule"),
    ("axis-on-fixed", _set(FX + ("axis",), "claim"),
     "layers[0].rules[2].axis: 'axis' does not apply to a fixed_amount rule"),
    ("axis-on-share", _set(MP + ("axis",), "year"),
     "layers[2].rules[0].axis: 'axis' does not apply to a max_personal_share rule"),
    ("repeat-on-share", _set(MP + ("repeat_admission",), False),
     "layers[2].rules[0].repeat_admission: 'repeat_admission' does not apply to a max_personal_share rule"),
    # rules: values
    ("ratio-above-1", _set(R0 + ("ratio",), 1.2), "layers[0].rules[0].ratio: 1.2 is above 1"),
    ("ratio-negative", _set(R0 + ("ratio",), -0.1), "layers[0].rules[0].ratio: -0.1 is below 0"),
    ("ratio-bool", _set(R0 + ("ratio",), True), "layers[0].rules[0].ratio: must be a number, not true"),
    ("ratio-string", _set(R0 + ("ratio",), "0.7"), "layers[0].rules[0].ratio: must be a number, not '0.7'"),
    ("ratio-null", _set(R0 + ("ratio",), None), "layers[0].rules[0].ratio: must be a number, not null"),
    ("ratio-nan", _set(R0 + ("ratio",), float("nan")), "layers[0].rules[0].ratio: must be a finite number, not nan"),
    ("ratio-decimals", _set(R0 + ("ratio",), 0.12345),
     "layers[0].rules[0].ratio: 0.12345 has 5 decimals; ratios take at most 4"),
    ("deductible-decimals", _set(R0 + ("deductible",), 2742.605),
     "layers[0].rules[0].deductible: 2742.605 has 3 decimals; money takes at most 2"),
    ("deductible-negative", _set(R0 + ("deductible",), -1), "layers[0].rules[0].deductible: -1 is below 0"),
    ("fixed-amount-string", _set(FX + ("fixed_amount",), "2280"),
     "layers[0].rules[2].fixed_amount: must be a number, not '2280'"),
    ("share-above-1", _set(MP + ("max_personal_share",), 2), "layers[2].rules[0].max_personal_share: 2 is above 1"),
    ("axis-enum", _set(R0 + ("axis",), "month"), "layers[0].rules[0].axis: 'month' is not one of: claim, year"),
    ("bounds-enum", _set(R0 + ("bounds",), "relative"),
     "layers[0].rules[0].bounds: 'relative' is not one of: absolute, above_deductible"),
    ("repeat-not-bool", _set(R0 + ("repeat_admission",), "yes"),
     "layers[0].rules[0].repeat_admission: must be true or false, not 'yes'"),
    ("repeat-in-later-layer", _set(SG + ("repeat_admission",), True),
     "layers[1].rules[0].repeat_admission: only the first layer may use repeat_admission"),
    ("cap-group-undeclared", _set(R0 + ("cap_group",), "month"),
     "layers[0].rules[0].cap_group: 'month' is not one of the layer's cap_groups (declared: year)"),
    ("cap-group-none-declared", _set(SG + ("cap_group",), "year"),
     "layers[1].rules[0].cap_group: 'year' is not one of the layer's cap_groups (declared: none)"),
    # class ratios
    ("class-ratio-later-layer", _both(_pop(SG + ("segments",)), _set(SG + ("axis",), "claim"),
                                      _set(SG + ("ratio",), {"class_a": 0.5, "class_b": 0.4})),
     "layers[1].rules[0].ratio: class ratios are allowed only in the first layer"),
    ("class-ratio-year-axis", _set(CR + ("axis",), "year"),
     "layers[0].rules[1].axis: class ratios work only on the claim axis"),
    ("class-ratio-missing", _set(CR + ("ratio",), {"class_a": 0.55}),
     "layers[0].rules[1].ratio: missing required key 'class_b'"),
    ("class-ratio-unknown", _set(CR + ("ratio",), {"class_a": 0.5, "class_b": 0.4, "class_c": 0.1}),
     "layers[0].rules[1].ratio.class_c: unknown key 'class_c'"),
    ("class-ratio-value", _set(CR + ("ratio",), {"class_a": 0.5, "class_b": 1.01}),
     "layers[0].rules[1].ratio.class_b: 1.01 is above 1"),
    # segments
    ("segments-empty", _set(SG + ("segments",), []), "layers[1].rules[0].segments: must not be empty"),
    ("segments-not-list", _set(SG + ("segments",), {"ratio": 0.5}),
     "layers[1].rules[0].segments: must be a list, not a mapping"),
    ("segment-missing-upto", _set(SG + ("segments",), [{"ratio": 0.6}, {"ratio": 0.7}]),
     "layers[1].rules[0].segments[0]: missing required key 'upto' (only the last segment is open-ended)"),
    ("segment-last-has-upto", _set(SG + ("segments",), [{"upto": 100, "ratio": 0.6}, {"upto": 200, "ratio": 0.7}]),
     "layers[1].rules[0].segments[1].upto: the last segment must have no 'upto' (it is open-ended)"),
    ("segment-not-increasing", _set(SG + ("segments",), [{"upto": 500.5, "ratio": 0.6}, {"upto": 500.5, "ratio": 0.65},
                                                         {"ratio": 0.7}]),
     "layers[1].rules[0].segments[1].upto: 500.5 is not above the previous upto 500.5"),
    ("segment-ratio", _set(SG + ("segments",), [{"upto": 100, "ratio": 0.6}, {"ratio": 1.2}]),
     "layers[1].rules[0].segments[1].ratio: 1.2 is above 1"),
    ("segment-missing-ratio", _set(SG + ("segments",), [{"upto": 100}, {"ratio": 0.7}]),
     "layers[1].rules[0].segments[0]: missing required key 'ratio'"),
    ("segment-unknown-key", _set(SG + ("segments",), [{"from": 0, "ratio": 0.7}]),
     "layers[1].rules[0].segments[0].from: unknown key 'from'"),
    # adjustments
    ("adjustment-no-effect", _pop(ADJ + ("ratio_add",)),
     "layers[0].adjustments[0]: needs at least one of deductible_factor, ratio, ratio_add, cap_factor, uncapped"),
    ("adjustment-missing-match", _pop(ADJ + ("match",)), "layers[0].adjustments[0]: missing required key 'match'"),
    ("adjustment-unknown-key", _set(ADJ + ("ratio_plus",), 0.05),
     "layers[0].adjustments[0].ratio_plus: unknown key 'ratio_plus'"),
    ("ratio-add-below", _set(ADJ + ("ratio_add",), -1.5), "layers[0].adjustments[0].ratio_add: -1.5 is below -1"),
    ("ratio-add-decimals", _set(ADJ + ("ratio_add",), 0.00001),
     "layers[0].adjustments[0].ratio_add: 1e-05 has 5 decimals; ratios take at most 4"),
    ("deductible-factor-above", _set(ADJ + ("deductible_factor",), 1.5),
     "layers[0].adjustments[0].deductible_factor: 1.5 is above 1"),
    ("adjustment-ratio-negative", _set(ADJ + ("ratio",), -0.05), "layers[0].adjustments[0].ratio: -0.05 is below 0"),
    ("adjustments-not-list", _set(("layers", 0, "adjustments"), {"match": {}}),
     "layers[0].adjustments: must be a list, not a mapping"),
    ("adjustment-match-identity", _set(ADJ + ("match",), {"identity": ["rich"]}),
     "layers[0].adjustments[0].match.identity[0]: 'rich' is not a declared identity (declared: poor, low)"),
    # match
    ("match-null", _set(R0 + ("match",), None), "layers[0].rules[0].match: must be a mapping, not null"),
    ("match-unknown-key", _set(R0 + ("match", "visit"), ["inpatient"]),
     "layers[0].rules[0].match.visit: unknown key 'visit'"),
    ("match-scalar", _set(R0 + ("match", "visit_type"), "inpatient"),
     "layers[0].rules[0].match.visit_type: must be a list (write [inpatient])"),
    ("match-empty-list", _set(R0 + ("match", "visit_type"), []),
     "layers[0].rules[0].match.visit_type: must not be empty"),
    ("visit-type-enum", _set(R0 + ("match", "visit_type"), ["hospital"]),
     "layers[0].rules[0].match.visit_type[0]: 'hospital' is not one of: inpatient, outpatient, chronic, maternity"),
    ("facility-level-enum", _set(R0 + ("match", "facility_level"), ["primary", 3]),
     "layers[0].rules[0].match.facility_level[1]: 3 is not one of: primary, secondary, tertiary"),
    ("locality-enum", _set(R0 + ("match", "locality"), ["city"]),
     "layers[0].rules[0].match.locality[0]: 'city' is not one of: county, region, province, national"),
    ("referred-not-bool", _set(R0 + ("match", "referred"), 1),
     "layers[0].rules[0].match.referred: must be true or false, not 1"),
    ("identity-undeclared", _set(R0 + ("match", "identity"), ["low", "foo"]),
     "layers[0].rules[0].match.identity[1]: 'foo' is not a declared identity (declared: poor, low)"),
    ("holds-none-declared", _both(_set(("identities",), []), _set(ADJ + ("match",), {}),
                                  _set(MP + ("match",), {"holds": ["poor"]})),
     "layers[2].rules[0].match.holds[0]: 'poor' is not a declared identity (declared: none)"),
    ("disease-group-undeclared", _set(R0 + ("match", "disease_group"), ["cancer"]),
     "layers[0].rules[0].match.disease_group[0]: 'cancer' is not a declared disease group (declared: dm)"),
    ("min-age-negative", _set(R0 + ("match", "min_age"), -1), "layers[0].rules[0].match.min_age: -1 is below 0"),
    ("max-age-float", _set(R0 + ("match", "max_age"), 30.5),
     "layers[0].rules[0].match.max_age: must be a whole number, not 30.5"),
    ("min-above-max", _both(_set(R0 + ("match", "min_age"), 60), _set(R0 + ("match", "max_age"), 18)),
     "layers[0].rules[0].match.min_age: 60 is above max_age 18"),
    # revision 2: match lists distinct, ages in [0, 150]
    ("max-age-above-150", _set(R0 + ("match", "max_age"), 151), "layers[0].rules[0].match.max_age: 151 is above 150"),
    ("min-age-above-150", _set(R0 + ("match", "min_age"), 200), "layers[0].rules[0].match.min_age: 200 is above 150"),
    ("visit-type-twice", _set(R0 + ("match", "visit_type"), ["inpatient", "chronic", "inpatient"]),
     "layers[0].rules[0].match.visit_type[2]: 'inpatient' is listed twice (also layers[0].rules[0].match.visit_type[0])"),
    ("locality-twice", _set(ADJ + ("match", "locality"), ["county", "county"]),
     "layers[0].adjustments[0].match.locality[1]: 'county' is listed twice (also layers[0].adjustments[0].match.locality[0])"),
    ("identity-twice", _set(R0 + ("match", "identity"), ["poor", "poor"]),
     "layers[0].rules[0].match.identity[1]: 'poor' is listed twice (also layers[0].rules[0].match.identity[0])"),
    ("holds-twice", _set(MP + ("match", "holds"), ["low", "poor", "low"]),
     "layers[2].rules[0].match.holds[2]: 'low' is listed twice (also layers[2].rules[0].match.holds[0])"),
    ("disease-group-twice", _set(R0 + ("match", "disease_group"), ["dm", "dm"]),
     "layers[0].rules[0].match.disease_group[1]: 'dm' is listed twice (also layers[0].rules[0].match.disease_group[0])"),
    ("holds-empty", _set(MP + ("match", "holds"), []), "layers[2].rules[0].match.holds: must not be empty"),
    ("disease-group-empty", _set(R0 + ("match", "disease_group"), []),
     "layers[0].rules[0].match.disease_group: must not be empty"),
    # revision 2: class ratios take no bounds (even the default spelled out)
    ("class-ratio-bounds", _set(CR + ("bounds",), "absolute"),
     "layers[0].rules[1].bounds: class ratios take no bounds (they have no segments)"),
    # revision 2: effective_from
    ("effective-from-other-year", _set(("effective_from",), dt.date(2023, 12, 31)),
     "effective_from: 2023-12-31 is not in year 2024"),
    ("effective-from-other-year-string", _set(("effective_from",), "2025-01-01"),
     "effective_from: 2025-01-01 is not in year 2024"),
    ("effective-from-with-time", _set(("effective_from",), dt.datetime(2024, 3, 21, 8, 0)),
     "effective_from: 2024-03-21 08:00:00 has a time; write the date only, like 2024-03-21"),
    ("effective-from-string-with-time", _set(("effective_from",), "2024-03-21T08:00"),
     "effective_from: '2024-03-21T08:00' is not a date written YYYY-MM-DD (like 2024-03-21)"),
    ("effective-from-short-month", _set(("effective_from",), "2024-3-21"),
     "effective_from: '2024-3-21' is not a date written YYYY-MM-DD (like 2024-03-21)"),
    ("effective-from-slashes", _set(("effective_from",), "2024/03/21"),
     "effective_from: '2024/03/21' is not a date written YYYY-MM-DD (like 2024-03-21)"),
    ("effective-from-invalid-day", _set(("effective_from",), "2024-02-30"),
     "effective_from: '2024-02-30' is not a valid date (day is out of range for month)"),
    ("effective-from-number", _set(("effective_from",), 20240321),
     "effective_from: must be a date like 2024-03-21, not 20240321"),
    ("effective-from-null", _set(("effective_from",), None),
     "effective_from: must be a date like 2024-03-21, not null"),
    # revision 2: nested caps
    ("cap-group-list-empty", _set(R0 + ("cap_group",), []),
     "layers[0].rules[0].cap_group: must not be empty (leave cap_group out for no cap)"),
    ("cap-group-list-twice", _both(_set(("layers", 0, "cap_groups", "level"), 500),
                                   _set(R0 + ("cap_group",), ["level", "year", "level"])),
     "layers[0].rules[0].cap_group[2]: 'level' is listed twice (also layers[0].rules[0].cap_group[0])"),
    ("cap-group-list-undeclared", _set(R0 + ("cap_group",), ["year", "month"]),
     "layers[0].rules[0].cap_group[1]: 'month' is not one of the layer's cap_groups (declared: year)"),
    ("cap-group-list-nested-list", _set(R0 + ("cap_group",), [["year"]]),
     "layers[0].rules[0].cap_group[0]: must be a cap group name, not a list"),
    ("cap-group-list-null-item", _set(R0 + ("cap_group",), ["year", None]),
     "layers[0].rules[0].cap_group[1]: must be a cap group name, not null"),
    ("cap-group-mapping", _set(R0 + ("cap_group",), {"year": 1}),
     "layers[0].rules[0].cap_group: must be a cap group name or a list of them, not a mapping"),
    ("cap-group-number", _set(R0 + ("cap_group",), 2024),
     "layers[0].rules[0].cap_group: must be a string (quote it)"),
    ("cap-group-null", _set(R0 + ("cap_group",), None),
     "layers[0].rules[0].cap_group: must be a cap group name, not null"),
    # revision 2: cap adjustments
    ("cap-factor-above", _set(ADJ + ("cap_factor",), 10.5), "layers[0].adjustments[0].cap_factor: 10.5 is above 10"),
    ("cap-factor-negative", _set(ADJ + ("cap_factor",), -1), "layers[0].adjustments[0].cap_factor: -1 is below 0"),
    ("cap-factor-decimals", _set(ADJ + ("cap_factor",), 1.23456),
     "layers[0].adjustments[0].cap_factor: 1.23456 has 5 decimals; factors take at most 4"),
    ("cap-factor-string", _set(ADJ + ("cap_factor",), "2"),
     "layers[0].adjustments[0].cap_factor: must be a number, not '2'"),
    ("cap-factor-bool", _set(ADJ + ("cap_factor",), True),
     "layers[0].adjustments[0].cap_factor: must be a number, not true"),
    ("uncapped-not-bool", _set(ADJ + ("uncapped",), "yes"),
     "layers[0].adjustments[0].uncapped: must be true or false, not 'yes'"),
    ("uncapped-number", _set(ADJ + ("uncapped",), 1),
     "layers[0].adjustments[0].uncapped: must be true or false, not 1"),
    ("uncapped-null", _set(ADJ + ("uncapped",), None),
     "layers[0].adjustments[0].uncapped: must be true or false, not null"),
]


@pytest.mark.parametrize("mutate, message", [pytest.param(m, msg, id=name) for name, m, msg in LOAD_ERRORS])
def test_load_error(mutate, message):
    d = base()
    mutate(d)
    assert load_error(d) == f"t.yaml: {message}"


def test_base_is_valid_so_each_error_comes_from_its_mutation():
    parse_policy(base(), "t.yaml")
    assert len({name for name, _, _ in LOAD_ERRORS}) == len(LOAD_ERRORS)


def test_not_a_mapping():
    assert load_error([base()]) == "t.yaml: (file): must be a mapping of policy keys, not a list"


def test_error_names_the_base_name_and_has_parts():
    d = base()
    d["layers"][1]["rules"][0]["segments"][1]["ratio"] = 1.2
    with pytest.raises(PolicyError) as e:
        parse_policy(d, "/somewhere/policies/shuozhou-resident-2022.yaml")
    err = e.value
    assert str(err) == "shuozhou-resident-2022.yaml: layers[1].rules[0].segments[1].ratio: 1.2 is above 1"
    assert (err.file, err.path, err.reason) == (
        "shuozhou-resident-2022.yaml", "layers[1].rules[0].segments[1].ratio", "1.2 is above 1")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.path) == (str(err), err.path)


def test_parse_policy_does_not_mutate_its_input():
    d = base()
    before = copy.deepcopy(d)
    parse_policy(d, "t.yaml")
    assert d == before


# --------------------------------------------------------------------------- YAML files

MINIMAL = """\
id: {id}
region: "{region}"
scheme: resident
year: {year}
layers:
  - name: basic
    fund: basic
    rules:
      - match: {{}}
        ratio: 0.5
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def file_error(path) -> str:
    with pytest.raises(PolicyError) as e:
        load_policy_file(path)
    return str(e.value)


def test_load_policy_file(tmp_path):
    path = write(tmp_path, "shuozhou-resident-2022.yaml", SPEC_EXAMPLE)
    p = load_policy_file(path)
    assert p.path == str(path) and p.layers[2].rules[2].deductible == 274_260
    assert load_policy_file(str(path)) == p


def test_duplicate_key_names_path_and_lines(tmp_path):
    text = MINIMAL.format(id="a", region="1", year=2024) + "        ratio: 0.6\n"
    assert file_error(write(tmp_path, "a.yaml", text)) == (
        "a.yaml: layers[0].rules[0].ratio: duplicate key 'ratio' at line 11 (first at line 10)")


def test_duplicate_top_level_key(tmp_path):
    text = "year: 2023\n" + MINIMAL.format(id="a", region="1", year=2024)
    assert file_error(write(tmp_path, "a.yaml", text)) == (
        "a.yaml: year: duplicate key 'year' at line 5 (first at line 1)")


def test_duplicate_key_in_flow_mapping(tmp_path):
    text = MINIMAL.format(id="a", region="1", year=2024).replace(
        "match: {}", "match: {visit_type: [inpatient], visit_type: [outpatient]}")
    assert file_error(write(tmp_path, "a.yaml", text)) == (
        "a.yaml: layers[0].rules[0].match.visit_type: duplicate key 'visit_type' at line 9 (first at line 9)")


def test_merge_keys_may_be_overridden(tmp_path):
    text = MINIMAL.format(id="a", region="1", year=2024).replace(
        "      - match: {}\n        ratio: 0.5\n",
        "      - &r {match: {visit_type: [inpatient]}, ratio: 0.5}\n"
        "      - <<: *r\n        ratio: 0.6\n")
    p = load_policy_file(write(tmp_path, "a.yaml", text))
    assert [r.segments[0].ratio for r in p.layers[0].rules] == [5000, 6000]


def test_unquoted_region_in_yaml(tmp_path):
    text = MINIMAL.format(id="a", region="1", year=2024).replace('region: "1"', "region: 140600")
    assert file_error(write(tmp_path, "a.yaml", text)) == "a.yaml: region: must be a string (quote it)"


def test_yaml_yes_is_not_a_ratio(tmp_path):
    text = MINIMAL.format(id="a", region="1", year=2024).replace("ratio: 0.5", "ratio: yes")
    assert file_error(write(tmp_path, "a.yaml", text)) == "a.yaml: layers[0].rules[0].ratio: must be a number, not true"


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "bad.yaml", "id: a\nlayers: [\n")
    assert re.fullmatch(r"bad\.yaml: \(file\): invalid YAML at line \d+, column \d+: .+", file_error(path))


def test_empty_file(tmp_path):
    assert file_error(write(tmp_path, "empty.yaml", "# nothing\n")) == "empty.yaml: (file): is empty"


def test_unsafe_tag_is_refused(tmp_path):
    path = write(tmp_path, "evil.yaml", "id: !!python/object/apply:os.getcwd []\n")
    assert file_error(path).startswith("evil.yaml: (file): invalid YAML at line 1")


def test_missing_file(tmp_path):
    assert file_error(tmp_path / "nope.yaml").startswith("nope.yaml: (file): cannot read: ")


# --------------------------------------------------------------------------- folders


def test_load_policies_reads_yaml_and_yml_sorted_by_name(tmp_path):
    write(tmp_path, "b.yml", MINIMAL.format(id="b", region="2", year=2024))
    write(tmp_path, "a.yaml", MINIMAL.format(id="a", region="1", year=2024))
    write(tmp_path, "c.yaml", MINIMAL.format(id="c", region="1", year=2025))
    write(tmp_path, "README.md", "not a policy")
    write(tmp_path, ".hidden.yaml", "not: [a policy")
    ps = load_policies(tmp_path)
    assert [p.id for p in ps.policies] == ["a", "b", "c"]
    assert ps.source == str(tmp_path)
    assert ps.find("1", "resident", 2025).id == "c"
    assert ps.find("1", "employee", 2025) is None
    assert ps.by_id("b").path == str(tmp_path / "b.yml")
    assert load_policies(str(tmp_path)) == ps


def test_load_policies_duplicate_id(tmp_path):
    write(tmp_path, "a.yaml", MINIMAL.format(id="x", region="1", year=2024))
    write(tmp_path, "b.yaml", MINIMAL.format(id="x", region="2", year=2024))
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == "b.yaml: id: duplicate id 'x' (also in a.yaml)"


def test_load_policies_same_region_scheme_year(tmp_path):
    write(tmp_path, "a.yaml", MINIMAL.format(id="a", region="140600", year=2022))
    write(tmp_path, "b.yaml", MINIMAL.format(id="b", region="140600", year=2022))
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == ("b.yaml: (file): region '140600', scheme resident, year 2022, in force from 2022-01-01 "
                            "(effective_from; January 1 when absent) is already covered by a.yaml")


def test_load_policies_reports_the_bad_file(tmp_path):
    write(tmp_path, "a.yaml", MINIMAL.format(id="a", region="1", year=2024))
    write(tmp_path, "b.yaml", MINIMAL.format(id="b", region="2", year=2024).replace("ratio: 0.5", "ratio: 1.2"))
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == "b.yaml: layers[0].rules[0].ratio: 1.2 is above 1"


def test_load_policies_empty_folder(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    write(folder, "notes.txt", "")
    with pytest.raises(PolicyError) as e:
        load_policies(folder)
    assert str(e.value) == f"policies: (folder): no policy files (*.yaml, *.yml) in {folder}"


def test_load_policies_missing_folder(tmp_path):
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path / "nowhere")
    assert str(e.value) == f"nowhere: (folder): no such folder: {tmp_path / 'nowhere'}"


def test_load_policies_not_a_folder(tmp_path):
    path = write(tmp_path, "a.yaml", MINIMAL.format(id="a", region="1", year=2024))
    with pytest.raises(PolicyError) as e:
        load_policies(path)
    assert str(e.value) == f"a.yaml: (folder): not a folder: {path}"


def test_default_policies_path_is_the_bundled_folder():
    import engine.policy

    assert default_policies_path() == Path(engine.policy.__file__).resolve().parent / "policies"


def test_bundled_policies_load():
    folder = default_policies_path()
    if not any(folder.glob("*.yaml")) and not any(folder.glob("*.yml")):
        pytest.skip(f"no bundled policies in {folder} yet")
    ps = load_policies()
    assert ps.policies and ps.source == str(folder)


# --------------------------------------------------------------------------- revision 2: new keys


def test_nested_caps_and_cap_adjustments_parse():
    d = base()
    basic = d["layers"][0]
    basic["cap_groups"] = {"year": 100000, "primary": 300, "outpatient": 800}
    basic["rules"][1]["cap_group"] = ["primary", "outpatient"]  # class ratio rule, nested caps
    basic["rules"][2]["cap_group"] = "outpatient"  # fixed amount, one group as a bare name
    basic["adjustments"] = [{"match": {"identity": ["poor"]}, "cap_factor": 1.5},
                            {"match": {"holds": ["low"]}, "cap_factor": 0, "uncapped": False},
                            {"match": {"min_age": 150}, "uncapped": True}]
    p = parse_policy(d, "t.yaml")
    r0, r1, r2 = p.layers[0].rules
    assert (r0.cap_groups, r0.cap_group) == (("year",), "year")
    assert (r1.cap_groups, r1.cap_group) == (("primary", "outpatient"), "primary")
    assert (r2.cap_groups, r2.cap_group) == (("outpatient",), "outpatient")
    assert (p.layers[1].rules[0].cap_groups, p.layers[1].rules[0].cap_group) == ((), None)
    assert p.layers[0].adjustments == (
        Adjustment(Match(identity=("poor",)), cap_factor=15000),
        Adjustment(Match(holds=("low",)), cap_factor=0, uncapped=False),
        Adjustment(Match(min_age=150), uncapped=True),
    )
    assert p.layers[0].adjustments[0].uncapped is None and p.layers[0].adjustments[2].cap_factor is None


def test_cap_factor_bounds_are_inclusive():
    d = base()
    d["layers"][0]["adjustments"][0].update(cap_factor=10, ratio_add=0.05)
    assert parse_policy(d, "t.yaml").layers[0].adjustments[0].cap_factor == 100_000
    d["layers"][0]["adjustments"][0]["cap_factor"] = 0.0001
    assert parse_policy(d, "t.yaml").layers[0].adjustments[0].cap_factor == 1


def test_revision_1_rule_constructor_still_takes_one_cap_group():
    from engine.model import KIND_SEGMENTS, Rule

    r = Rule(Match(), KIND_SEGMENTS, segments=(Segment(None, BP),), cap_group="g")
    assert (r.cap_groups, r.cap_group) == (("g",), "g")
    assert Rule(Match(), KIND_SEGMENTS, cap_groups=["a", "b"]).cap_groups == ("a", "b")
    with pytest.raises(TypeError):
        Rule(Match(), KIND_SEGMENTS, cap_group="a", cap_groups=("b",))


@pytest.mark.parametrize("value", [dt.date(2024, 3, 21), "2024-03-21"], ids=["yaml-date", "string"])
def test_effective_from_date_or_iso_string(value):
    d = base()
    d["effective_from"] = value
    assert parse_policy(d, "t.yaml").effective_from == dt.date(2024, 3, 21)


def test_effective_from_defaults_to_january_first():
    assert parse_policy(base(), "t.yaml").effective_from == dt.date(2024, 1, 1)
    d = base()
    d["effective_from"] = "2024-12-31"  # the last day of the year is within it
    assert parse_policy(d, "t.yaml").effective_from == dt.date(2024, 12, 31)


def test_ages_0_and_150_are_allowed():
    d = base()
    d["layers"][0]["rules"][0]["match"].update(min_age=0, max_age=150)
    assert parse_policy(d, "t.yaml").layers[0].rules[0].match == Match(visit_type=("inpatient",), min_age=0,
                                                                         max_age=150)


def _version(folder, name, pid, effective_from=None, identities=(), year=2019, region="540000"):
    text = MINIMAL.format(id=pid, region=region, year=year)
    if effective_from is not None:
        text = f"effective_from: {effective_from}\n" + text
    if identities:
        text = f"identities: [{', '.join(identities)}]\n" + text
    return write(folder, name, text)


def test_versions_of_a_year_in_force_by_date(tmp_path):
    _version(tmp_path, "b.yaml", "b", "2019-03-30", identities=("farmer_herder", "poor"))
    _version(tmp_path, "a.yaml", "a", identities=("poor", "low"))  # January 1
    _version(tmp_path, "c.yaml", "c", '"2019-07-01"')
    _version(tmp_path, "d.yaml", "d", year=2020)
    ps = load_policies(tmp_path)
    assert [p.id for p in ps.versions("540000", "resident", 2019)] == ["a", "b", "c"]
    assert [p.effective_from for p in ps.versions("540000", "resident", 2019)] == [
        dt.date(2019, 1, 1), dt.date(2019, 3, 30), dt.date(2019, 7, 1)]
    assert ps.versions("540000", "employee", 2019) == () and ps.versions("540000", "resident", 2021) == ()
    in_force = lambda day: getattr(ps.in_force("540000", "resident", day), "id", None)  # noqa: E731
    assert in_force(dt.date(2019, 1, 1)) == "a"
    assert in_force(dt.date(2019, 3, 29)) == "a"
    assert in_force(dt.datetime(2019, 3, 29, 23, 59, 59, 999999)) == "a"
    assert in_force(dt.datetime(2019, 3, 30, 0, 0)) == "b"  # in force from 00:00
    assert in_force(dt.date(2019, 6, 30)) == "b"
    assert in_force(dt.date(2019, 12, 31)) == "c"
    assert in_force(dt.date(2020, 5, 1)) == "d"
    assert in_force(dt.date(2021, 5, 1)) is None
    assert ps.find("540000", "resident", 2019).id == "a"  # revision-1 callers: the first version
    assert ps.year_identities("540000", "resident", 2019) == ("poor", "low", "farmer_herder")
    assert ps.year_identities("540000", "resident", 2020) == ()
    assert ps.year_identities("540000", "resident", 2021) == ()


def test_a_date_before_the_first_version_has_no_policy(tmp_path):
    _version(tmp_path, "a.yaml", "a", "2019-03-30")
    ps = load_policies(tmp_path)
    assert ps.in_force("540000", "resident", dt.date(2019, 3, 29)) is None
    assert ps.in_force("540000", "resident", dt.date(2019, 3, 30)).id == "a"
    assert ps.find("540000", "resident", 2019).id == "a"


def test_policy_set_built_in_code_sorts_versions():
    from engine.model import Policy, PolicySet

    layer = parse_policy(base(), "t.yaml").layers
    late = Policy("late", "1", "resident", 2024, layer, effective_from=dt.date(2024, 6, 1))
    early = Policy("early", "1", "resident", 2024, layer)
    assert early.effective_from == dt.date(2024, 1, 1)
    ps = PolicySet([late, early])
    assert ps.policies == (late, early)
    assert ps.versions("1", "resident", 2024) == (early, late)
    assert ps.in_force("1", "resident", dt.date(2024, 6, 1)) is late
    assert pickle.loads(pickle.dumps(ps)).in_force("1", "resident", dt.date(2024, 5, 31)).id == "early"


@pytest.mark.parametrize("second", ["2019-01-01", '"2019-01-01"'], ids=["yaml-date", "string"])
def test_no_effective_from_and_january_first_are_duplicates(tmp_path, second):
    _version(tmp_path, "a.yaml", "a")
    _version(tmp_path, "b.yaml", "b", second)
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value) == ("b.yaml: (file): region '540000', scheme resident, year 2019, in force from 2019-01-01 "
                            "(effective_from; January 1 when absent) is already covered by a.yaml")


def test_two_versions_of_the_same_day(tmp_path):
    _version(tmp_path, "a.yaml", "a", "2019-03-30")
    _version(tmp_path, "b.yaml", "b", '"2019-03-30"')
    with pytest.raises(PolicyError) as e:
        load_policies(tmp_path)
    assert str(e.value).startswith("b.yaml: (file): region '540000', scheme resident, year 2019, in force from "
                                   "2019-03-30 ")


def test_effective_from_yaml_timestamp_in_a_file(tmp_path):
    path = _version(tmp_path, "a.yaml", "a", "2019-03-30 08:00:00")
    assert file_error(path) == "a.yaml: effective_from: 2019-03-30 08:00:00 has a time; write the date only, like 2019-03-21"


def test_nested_cap_in_a_file(tmp_path):
    text = MINIMAL.format(id="a", region="1", year=2024).replace(
        "    rules:\n", "    cap_groups: {primary: 300, outpatient: 800}\n    rules:\n").replace(
        "        ratio: 0.5\n", "        ratio: 0.5\n        cap_group: [primary, outpatient]\n")
    assert load_policy_file(write(tmp_path, "a.yaml", text)).layers[0].rules[0].cap_groups == ("primary", "outpatient")
