"""The revision-2 cases of test_revision.py and test_revision_seeds.py through `engine.settle`.

Every case settles with the engine and the reference (conftest.run_both asserts
they agree on every field and on the closing accumulators) and then checks the
hand-computed numbers. Red until the kernel implements revision 2 (issue 14).
"""
from __future__ import annotations

import pytest

import engine
import reference as ref
from conftest import acc_from_table, claims_table, run_both
from test_revision import CASES, check
from test_revision_seeds import SEED_CASES


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_case(name):
    c = CASES[name]()
    results, acc = run_both(c.ps, c.claims, c.carry)
    check(c, results, acc)


@pytest.mark.parametrize("name", sorted(SEED_CASES))
def test_engine_seed_case(name):
    c = SEED_CASES[name]()
    results, acc = run_both(c.ps, c.claims, c.carry)
    check(c, results, acc)


@pytest.mark.parametrize("name", ["versions_share_the_year_axis_and_cap",
                                  "nested_caps_limit_by_every_group_and_share_axes_by_the_first",
                                  "a_person_gaining_an_identity_keeps_one_position"])
def test_engine_chunks_with_carry_across_a_version_change_equal_one_call(name):
    c = CASES[name]()
    table = claims_table(c.claims)
    whole = engine.settle(table, c.ps)
    for cut in range(1, table.num_rows):
        first = engine.settle(table.slice(0, cut), c.ps)
        second = engine.settle(table.slice(cut), c.ps, first.accumulators)
        assert (first.results.to_pylist() + second.results.to_pylist()) == whole.results.to_pylist(), cut
        assert (ref.normalize_accumulators(acc_from_table(second.accumulators))
                == ref.normalize_accumulators(acc_from_table(whole.accumulators))), cut
