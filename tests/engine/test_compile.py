"""The compiled state layout (engine/compile.py `_state_layout`): what a key's state row keeps,
where, and which of its cache lines the loop prefetches for a claim profile."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import _kernel
from engine.compile import (
    ACC_FIELDS,
    FACILITY_LEVELS,
    LINE_FIELDS,
    LOCALITIES,
    PROFILES,
    STATE_HEAD,
    VISIT_TYPES,
    compile_policies,
    profile_code,
)

SEGMENTS, CLASS_RATIO = 0, 1


@pytest.fixture(scope="module")
def seeds():
    return compile_policies(engine.load_policies(None))


def _policy_rules(c, p):
    pol = c.policies[p]
    for li in range(pol["layer_start"], pol["layer_start"] + pol["layer_count"]):
        lay = c.layers[li]
        yield from range(lay["rule_start"], lay["rule_start"] + lay["rule_count"])


def test_constants_agree_with_the_kernel():
    assert (STATE_HEAD, ACC_FIELDS) == (_kernel.STATE_HEAD, _kernel.ACC_FIELDS)


def _year(c, p):
    """The versions of policy p's year: they share its state rows."""
    return [q for q in range(len(c.policies)) if c.policies[q]["key_policy"] == c.policies[p]["key_policy"]]


def test_rows_keep_exactly_the_fields_rules_write(seeds):
    """Over every version of the year: a position for year-axis segments, a deductible charged
    for segments and class ratios, a paid for every cap group of a rule (or its none entry)."""
    c = seeds
    assert c.state_width % LINE_FIELDS == 0 or LINE_FIELDS % c.state_width == 0
    for p in range(len(c.policies)):
        index = c.state_index[p].reshape(c.acc_width, ACC_FIELDS)
        kept = index[index >= 0]
        assert len(set(kept.tolist())) == len(kept)  # no two fields share a place
        assert kept.min() >= STATE_HEAD and kept.max() < c.state_width
        want = np.zeros((c.acc_width, ACC_FIELDS), bool)
        for q in _year(c, p):
            assert (c.state_index[q] == c.state_index[p]).all()  # one layout per year
            for j in _policy_rules(c, q):
                r = c.rules[j]
                want[r["acc"], 0] |= r["kind"] == SEGMENTS and r["axis"] == 1
                want[r["acc"], 1] = True
                want[r["acc"], 2] |= r["kind"] in (SEGMENTS, CLASS_RATIO)
                assert [r["position_at"], r["paid_at"], r["charged_at"]] == index[r["acc"]].tolist()
                caps = c.caps[r["cap_start"]:r["cap_start"] + r["cap_count"]]
                assert r["cap"] >= 0 or r["cap_count"] == 0  # nested groups come after a first one
                for cap in caps:
                    want[cap["acc"], 1] = True
                    assert cap["paid_at"] == index[cap["acc"], 1]
        assert ((index >= 0) == want).all(), c.policy_ids[p]
    # the seeds have columns whose rules never use the year axis: rows are narrower than 2 + 3 x columns
    assert c.state_width < STATE_HEAD + ACC_FIELDS * c.acc_width


def test_profile_lines_cover_every_field_a_claim_may_touch(seeds):
    c = seeds
    for p in range(len(c.policies)):
        pol = c.policies[p]
        for prof in range(PROFILES):
            lines = int(c.state_lines[p, prof])
            assert lines & 1  # the head: admissions and compliant_total
            for li in range(pol["layer_start"], pol["layer_start"] + pol["layer_count"]):
                start, count = c.rule_candidates[li, prof]
                for j in c.candidate_rules[start:start + count]:
                    r = c.rules[j]
                    caps = c.caps[r["cap_start"]:r["cap_start"] + r["cap_count"]]
                    for at in (r["position_at"], r["paid_at"], r["charged_at"], *caps["paid_at"].tolist()):
                        if at >= 0:
                            assert (lines >> min(at // LINE_FIELDS, 63)) & 1, (c.policy_ids[p], prof, at)


def test_profiles_touching_few_columns_find_them_in_the_first_line(seeds):
    """Shuozhou 2022: ordinary outpatient visits (most claims) touch the head and one basic
    column, all in the row's first cache line; inpatient stays touch every layer."""
    c = seeds
    p = c.policy_ids.index("shuozhou-resident-2022")
    outpatient = profile_code(VISIT_TYPES.index("outpatient"), FACILITY_LEVELS.index("primary"),
                              LOCALITIES.index("county"))
    inpatient = profile_code(VISIT_TYPES.index("inpatient"), FACILITY_LEVELS.index("secondary"),
                             LOCALITIES.index("county"))
    assert c.state_lines[p, outpatient] == 1
    assert int(c.state_lines[p, inpatient]).bit_count() == c.state_width // LINE_FIELDS > 1


def test_first_layer_behaviour_is_data_in_the_layer_table():
    """What spec 5.2 says of the first layer is in its row, not in the loop's layer index."""
    c = compile_policies(engine.load_policies(None))
    kinds = _kernel.BASE_KINDS
    for p in c.policies:
        rows = c.layers[p["layer_start"]:p["layer_start"] + p["layer_count"]]
        assert rows["base_kind"].tolist() == [kinds["in_scope"]] + [kinds["remaining"]] * (len(rows) - 1)
        for flag in ("required", "repeat_applies", "reports_deductible"):
            assert rows[flag].tolist() == [1] + [0] * (len(rows) - 1)
