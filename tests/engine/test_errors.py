"""Errors (spec section 7), schema errors (section 2) and the amount bounds
(section 1). Every settle goes through `run_both` (engine == reference on every
field and the closing accumulators) unless it is a call that must raise."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

import engine
import reference as ref
from conftest import (Y, acc_from_table, claims_table, layer, policy, policy_set, rule,
                      run_both, compare)

IDS = ("extreme_poverty", "low_income")
MAX = 10**12


def basic_policy(**kw):
    kw.setdefault("identities", IDS)
    return policy([layer("basic", "basic", [rule({"visit_type": ["inpatient", "outpatient", "chronic"]},
                                                 ratio=5000, deductible=10 * Y)])], **kw)


PS = policy_set(basic_policy())
GOOD = dict(in_scope_amount=1000 * Y)


def day(d: int) -> dt.datetime:
    return dt.datetime(2024, 3, 1, 9) + dt.timedelta(days=d)


def statuses(res):
    return [r["status"] for r in res]


def assert_error_row(r, status):
    """Section 3: every amount 0, identity / policy_id null, cap_hit false, empty layer_pays."""
    assert r["status"] == status
    for f in ref.AMOUNT_RESULT_FIELDS:
        assert r[f] == 0, f
    assert r["identity"] is None and r["policy_id"] is None
    assert r["cap_hit"] is False
    assert r["layer_pays"] == []


def check_one_bad(bad: dict, status: str, ps=PS):
    """The bad row gets `status` and an all-zero result; the good rows around it settle
    as if it were not there, and the accumulators are those without it."""
    good = [dict(GOOD, claim_id="g0", settle_time=day(0)), dict(GOOD, claim_id="g1", settle_time=day(2))]
    bad = dict({"claim_id": "bad", "settle_time": day(1)}, **bad)
    res, acc = run_both(ps, [good[0], bad, good[1]])
    assert statuses(res) == ["ok", status, "ok"]
    assert_error_row(res[1], status)
    if "claim_id" in bad and bad["claim_id"] is None:
        assert res[1]["claim_id"] is None
    res_without, acc_without = run_both(ps, good)
    assert [res[0], res[2]] == res_without
    assert acc == acc_without


# ============================================================== one code each

REQUIRED = ["claim_id", "person_id", "region", "scheme", "settle_time", "visit_type", "facility_level",
            "locality", "total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
            "in_scope_amount"]


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_field(field):
    bad = dict(GOOD, **{field: None})
    if field in ("self_funded_amount", "over_limit_amount", "class_b_copay_amount", "in_scope_amount"):
        bad["total_amount"] = 1000 * Y  # keep the rest consistent
    check_one_bad(bad, "MISSING_FIELD")


@pytest.mark.parametrize("field", ["referred", "disease_code", "age", "identities", "in_scope_class_b_amount"])
def test_nullable_fields_are_not_missing(field):
    res, _ = run_both(PS, [dict(GOOD, **{field: None})])
    # ratio 50 % above a 10-yuan deductible on 1,000: 495.
    assert (res[0]["status"], res[0]["basic_pay"]) == ("ok", 495 * Y)


@pytest.mark.parametrize("field,value", [
    ("scheme", "farmer"), ("scheme", "Resident"), ("visit_type", "surgery"), ("visit_type", "INPATIENT"),
    ("facility_level", "quaternary"), ("locality", "abroad"), ("locality", ""),
])
def test_invalid_value(field, value):
    check_one_bad(dict(GOOD, **{field: value}), "INVALID_VALUE")


@pytest.mark.parametrize("field", ["total_amount", "self_funded_amount", "over_limit_amount",
                                   "class_b_copay_amount", "in_scope_amount", "in_scope_class_b_amount"])
def test_invalid_amount(field):
    check_one_bad(dict(GOOD, **{field: -1}), "INVALID_AMOUNT")


@pytest.mark.parametrize("field", ["total_amount", "self_funded_amount", "over_limit_amount",
                                   "class_b_copay_amount", "in_scope_amount", "in_scope_class_b_amount"])
def test_amount_out_of_range(field):
    bad = dict(in_scope_amount=0)
    bad[field] = MAX + 1
    if field != "total_amount":
        bad["total_amount"] = MAX + 1 if field != "in_scope_class_b_amount" else 0
    if field == "in_scope_class_b_amount":
        bad["in_scope_amount"] = MAX  # B > in scope too, but out of range comes first
        bad["total_amount"] = MAX
    check_one_bad(bad, "AMOUNT_OUT_OF_RANGE")


def test_amounts_at_the_bound_are_in_range():
    res, _ = run_both(PS, [dict(total_amount=MAX, in_scope_amount=MAX, in_scope_class_b_amount=MAX)])
    # 50 % of (10^12 - 1,000 fen deductible) = 499,999,999,500 fen.
    assert (res[0]["status"], res[0]["basic_pay"]) == ("ok", (MAX - 1000) // 2)


@pytest.mark.parametrize("bad", [
    dict(total_amount=1000 * Y + 1, in_scope_amount=1000 * Y),               # total one fen more
    dict(total_amount=1000 * Y, self_funded_amount=1, in_scope_amount=1000 * Y),
    dict(total_amount=0, over_limit_amount=5, in_scope_amount=0),
    dict(in_scope_amount=100, in_scope_class_b_amount=101),                    # class B > in scope
], ids=["total+1", "self_funded", "over_limit", "class_b>in_scope"])
def test_amount_mismatch(bad):
    check_one_bad(bad, "AMOUNT_MISMATCH")


def test_class_b_equal_to_in_scope_is_fine():
    res, _ = run_both(PS, [dict(in_scope_amount=100 * Y, in_scope_class_b_amount=100 * Y)])
    assert res[0]["status"] == "ok"


@pytest.mark.parametrize("bad", [
    dict(region="999999"), dict(scheme="employee"), dict(settle_time=dt.datetime(2023, 12, 31, 23, 59)),
    dict(settle_time=dt.datetime(2025, 1, 1)),
], ids=["region", "scheme", "year-before", "year-after"])
def test_unknown_policy(bad):
    check_one_bad(dict(GOOD, **bad), "UNKNOWN_POLICY")


@pytest.mark.parametrize("held", [["orphan"], ["low_income", "orphan"], ["LOW_INCOME"]])
def test_unknown_identity(held):
    check_one_bad(dict(GOOD, identities=held), "UNKNOWN_IDENTITY")


def test_no_benefit_rule():
    check_one_bad(dict(GOOD, visit_type="maternity"), "NO_BENEFIT_RULE")


# ============================================================== duplicates


def test_duplicate_claim_later_occurrence():
    res, acc = run_both(PS, [dict(GOOD, claim_id="x", settle_time=day(0)),
                             dict(GOOD, claim_id="x", settle_time=day(1))])
    assert statuses(res) == ["ok", "DUPLICATE_CLAIM"]
    assert_error_row(res[1], "DUPLICATE_CLAIM")
    assert acc[("p1", "000001", "resident", 2024)]["compliant_total"] == 1000 * Y  # once


def test_duplicate_first_occurrence_in_input_order_not_settle_order():
    # The later row sorts first by settle_time (and is another person, another key),
    # but the first occurrence is found in input order over the whole call.
    res, _ = run_both(PS, [dict(GOOD, claim_id="x", settle_time=day(5)),
                           dict(GOOD, claim_id="x", settle_time=day(0), person_id="p2")])
    assert statuses(res) == ["ok", "DUPLICATE_CLAIM"]


@pytest.mark.parametrize("first", [
    dict(total_amount=1),               # AMOUNT_MISMATCH
    dict(visit_type="maternity"),       # NO_BENEFIT_RULE (rejected during settlement)
    dict(identities=["orphan"]),        # UNKNOWN_IDENTITY
    dict(person_id=None),               # MISSING_FIELD (the claim_id is there)
], ids=["mismatch", "no-rule", "identity", "missing"])
def test_duplicate_when_first_occurrence_rejected(first):
    res, acc = run_both(PS, [dict(GOOD, claim_id="x", settle_time=day(0), **first),
                             dict(GOOD, claim_id="x", settle_time=day(1))])
    assert statuses(res)[1] == "DUPLICATE_CLAIM"
    assert statuses(res)[0] != "ok"
    assert acc == {} or ref.normalize_accumulators(acc) == {}


def test_duplicate_across_chunks_of_a_stream():
    t1 = claims_table([dict(GOOD, claim_id="x", settle_time=day(0)), dict(GOOD, claim_id="y", settle_time=day(1))])
    t2 = claims_table([dict(GOOD, claim_id="z", settle_time=day(2)), dict(GOOD, claim_id="x", settle_time=day(3))])
    batches = t1.to_batches() + t2.to_batches()
    assert len(batches) == 2
    res = engine.settle(iter(batches), PS)
    r = res.results.to_pylist()
    assert statuses(r) == ["ok", "ok", "ok", "DUPLICATE_CLAIM"]
    ref_rows, ref_acc = ref.settle_stream(PS, [t1.to_pylist(), t2.to_pylist()])
    compare(r, ref_rows, acc_from_table(res.accumulators), ref_acc)
    # the same through a RecordBatchReader and through Settler
    reader = pa.RecordBatchReader.from_batches(engine.CLAIMS_SCHEMA, batches)
    assert engine.settle(reader, PS).results.to_pylist() == r
    s = engine.Settler(PS)
    out = [s.settle_batch(b).to_pylist() for b in batches]
    assert out[0] + out[1] == r
    assert acc_from_table(s.accumulators()) == acc_from_table(res.accumulators)


def test_duplicate_across_chunks_first_rejected():
    t1 = claims_table([dict(GOOD, claim_id="x", total_amount=5)])
    t2 = claims_table([dict(GOOD, claim_id="x", settle_time=day(1))])
    res = engine.settle(t1.to_batches() + t2.to_batches(), PS)
    assert statuses(res.results.to_pylist()) == ["AMOUNT_MISMATCH", "DUPLICATE_CLAIM"]


# ============================================================== compliant_total limit


def test_compliant_total_limit_with_carry():
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 0, "compliant_total": 10**14 - 100, "layers": {}}}
    rows = [dict(claim_id="a", settle_time=day(0), in_scope_amount=60),   # 10^14 - 40
            dict(claim_id="b", settle_time=day(1), in_scope_amount=41),   # would be 10^14 + 1: rejected
            dict(claim_id="c", settle_time=day(2), in_scope_amount=40),   # exactly 10^14: fine
            dict(claim_id="d", settle_time=day(3), in_scope_amount=0)]    # K = 0: fine
    res, acc = run_both(PS, rows, carry)
    assert statuses(res) == ["ok", "AMOUNT_OUT_OF_RANGE", "ok", "ok"]
    assert acc[key]["compliant_total"] == 10**14


def test_compliant_total_limit_counts_k_with_copay():
    ps = policy_set(basic_policy(compliant_includes_class_b_copay=True))
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 0, "compliant_total": 10**14 - 100, "layers": {}}}
    # K = 60 in scope + 41 copay = 101 > 100 left.
    res, _ = run_both(ps, [dict(class_b_copay_amount=41, in_scope_amount=60)], carry)
    assert statuses(res) == ["AMOUNT_OUT_OF_RANGE"]


def test_compliant_total_limit_within_one_call():
    # 100 claims of 10^12 reach exactly 10^14; the 101st is out of range; other keys unaffected.
    rows = [dict(claim_id=f"c{i:03d}", settle_time=day(i % 200), total_amount=MAX, in_scope_amount=MAX,
                 visit_type="outpatient") for i in range(101)]
    rows.append(dict(claim_id="other", person_id="p2", total_amount=MAX, in_scope_amount=MAX))
    res, acc = run_both(PS, rows)
    assert statuses(res) == ["ok"] * 100 + ["AMOUNT_OUT_OF_RANGE", "ok"]
    assert acc[("p1", "000001", "resident", 2024)]["compliant_total"] == 10**14


# ============================================================== precedence


PRECEDENCE = [
    # (claim, expected): each claim has the expected error and the next one(s) in the list.
    (dict(person_id=None, scheme="farmer"), "MISSING_FIELD"),
    (dict(in_scope_amount=None, total_amount=-5), "MISSING_FIELD"),
    (dict(visit_type="surgery", in_scope_amount=-1), "INVALID_VALUE"),
    (dict(locality="moon", total_amount=MAX + 1), "INVALID_VALUE"),
    (dict(self_funded_amount=-1, in_scope_amount=MAX + 1, total_amount=MAX + 1), "INVALID_AMOUNT"),
    (dict(over_limit_amount=-1, total_amount=7), "INVALID_AMOUNT"),
    (dict(in_scope_amount=MAX + 1, total_amount=3), "AMOUNT_OUT_OF_RANGE"),
    (dict(total_amount=3, region="999999"), "AMOUNT_MISMATCH"),
    (dict(in_scope_amount=5, in_scope_class_b_amount=6, identities=["orphan"]), "AMOUNT_MISMATCH"),
    (dict(region="999999", identities=["orphan"]), "UNKNOWN_POLICY"),
    (dict(region="999999", visit_type="maternity"), "UNKNOWN_POLICY"),
    (dict(identities=["orphan"], visit_type="maternity"), "UNKNOWN_IDENTITY"),
]


@pytest.mark.parametrize("claim,expected", PRECEDENCE, ids=[f"{i}-{e}" for i, (_, e) in enumerate(PRECEDENCE)])
def test_precedence(claim, expected):
    check_one_bad(dict(GOOD, **claim), expected)


def test_precedence_around_duplicates_and_the_compliant_limit():
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 0, "compliant_total": 10**14 - 10, "layers": {}}}
    rows = [
        dict(claim_id="a", settle_time=day(0), in_scope_amount=5),
        dict(claim_id="a", settle_time=day(1), identities=["orphan"]),           # UNKNOWN_IDENTITY > DUPLICATE
        dict(claim_id="a", settle_time=day(2), visit_type="maternity"),         # DUPLICATE > NO_BENEFIT_RULE
        dict(claim_id="a", settle_time=day(3), in_scope_amount=100),            # DUPLICATE > compliant limit
        dict(claim_id="b", settle_time=day(4), in_scope_amount=100, visit_type="maternity"),  # limit > NO_BENEFIT
        dict(claim_id="c", settle_time=day(5), in_scope_amount=5, visit_type="maternity"),    # NO_BENEFIT_RULE
    ]
    res, _ = run_both(PS, rows, carry)
    assert statuses(res) == ["ok", "UNKNOWN_IDENTITY", "DUPLICATE_CLAIM", "DUPLICATE_CLAIM",
                             "AMOUNT_OUT_OF_RANGE", "NO_BENEFIT_RULE"]


# ============================================================== error rows change nothing


def test_bad_rows_change_no_accumulator_and_the_rest_settles():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, ratio=6000, deductible=100 * Y,
                                      repeat_admission=True, cap_group="g"),
                                 rule({"visit_type": ["chronic"]}, axis="year", ratio=5000, deductible=100 * Y)],
              cap_groups={"g": 1500 * Y}),
        layer("aid", "medical_aid", [rule({}, axis="year", ratio=5000, cap_group="y")], cap_groups={"y": 300 * Y}),
    ], identities=IDS, repeat_factors=(10000, 5000)))
    good = [dict(claim_id=f"g{i}", settle_time=day(2 * i), visit_type=v, in_scope_amount=1000 * Y)
            for i, v in enumerate(["inpatient", "chronic", "inpatient", "chronic", "inpatient"])]
    bad = [
        dict(claim_id="b0", settle_time=day(1), person_id=None, in_scope_amount=1000 * Y),
        dict(claim_id="b1", settle_time=day(3), visit_type="x", in_scope_amount=1000 * Y),
        dict(claim_id="b2", settle_time=day(3), in_scope_amount=-1),
        dict(claim_id="b3", settle_time=day(5), in_scope_amount=MAX + 1),
        dict(claim_id="b4", settle_time=day(5), in_scope_amount=1000 * Y, total_amount=1),
        dict(claim_id="b5", settle_time=day(7), in_scope_amount=1000 * Y, scheme="employee"),
        dict(claim_id="b6", settle_time=day(7), in_scope_amount=1000 * Y, identities=["orphan"]),
        dict(claim_id="g1", settle_time=day(1), in_scope_amount=1000 * Y),   # duplicate of g1
        dict(claim_id="b8", settle_time=day(1), in_scope_amount=1000 * Y, visit_type="maternity"),
    ]
    mixed = []
    for i, g in enumerate(good):
        mixed.append(g)
        mixed.extend(bad[2 * i:2 * i + 2])
    res, acc = run_both(ps, mixed)
    res_good, acc_good = run_both(ps, good)
    by = {(r["claim_id"], r["status"]): r for r in res}
    for g in res_good:
        assert by[(g["claim_id"], "ok")] == g
    for r in res:
        if r["status"] != "ok":
            assert_error_row(r, r["status"])
    assert sorted(statuses(res)) == sorted(["ok"] * 5 + ["MISSING_FIELD", "INVALID_VALUE", "INVALID_AMOUNT",
                                                         "AMOUNT_OUT_OF_RANGE", "AMOUNT_MISMATCH", "UNKNOWN_POLICY",
                                                         "UNKNOWN_IDENTITY", "DUPLICATE_CLAIM", "NO_BENEFIT_RULE"])
    assert acc == acc_good
    # the same with accumulator deltas: error rows add nothing
    d = engine.settle(claims_table(mixed), ps, deltas=True).results.to_pylist()
    for r in d:
        if r["status"] != "ok":
            assert r["delta_admissions"] == 0 and r["delta_compliant_total"] == 0
            assert not r["delta_layers"]


def test_all_rows_bad():
    res, acc = run_both(PS, [dict(GOOD, scheme="x"), dict(GOOD, region="0")])
    assert statuses(res) == ["INVALID_VALUE", "UNKNOWN_POLICY"]
    assert ref.normalize_accumulators(acc) == {}


def test_empty_table():
    res, acc = run_both(PS, [])
    assert res == [] and acc == {}


# ============================================================== schema errors


@pytest.mark.parametrize("column", [f.name for f in engine.CLAIMS_SCHEMA])
def test_missing_column_raises_naming_it(column):
    t = claims_table([GOOD])
    t = t.drop_columns([column])
    with pytest.raises(engine.ClaimsSchemaError, match=column):
        engine.settle(t, PS)


WRONG_TYPES = [
    ("settle_time", pa.timestamp("us", tz="UTC")),
    ("settle_time", pa.timestamp("us", tz="Asia/Shanghai")),
    ("settle_time", pa.timestamp("ns")),
    ("settle_time", pa.string()),
    ("total_amount", pa.float64()),
    ("in_scope_amount", pa.int32()),
    ("in_scope_class_b_amount", pa.string()),
    ("age", pa.int64()),
    ("referred", pa.string()),
    ("identities", pa.string()),
    ("claim_id", pa.int64()),
    ("person_id", pa.large_string()),
    ("region", pa.int32()),
]


@pytest.mark.parametrize("column,type_", WRONG_TYPES, ids=[f"{c}-{t}" for c, t in WRONG_TYPES])
def test_wrong_column_type_raises_naming_it(column, type_):
    assert issubclass(engine.ClaimsSchemaError, ValueError)
    t = claims_table([dict(GOOD, region="000001", claim_id="1")])
    i = t.schema.get_field_index(column)
    if pa.types.is_timestamp(type_) and type_.tz:
        arr = pa.array([dt.datetime(2024, 3, 1, 9, tzinfo=dt.timezone.utc)], type=type_)
    elif type_ == pa.string() and column == "identities":
        arr = pa.array(["low_income"], type=type_)
    elif type_ == pa.string() and column == "referred":
        arr = pa.array(["false"], type=type_)
    else:
        arr = t.column(i).cast(type_)
    t = t.set_column(i, pa.field(column, type_), arr)
    with pytest.raises(engine.ClaimsSchemaError, match=column):
        engine.settle(t, PS)


def test_schema_error_in_a_stream():
    bad = claims_table([dict(GOOD, claim_id="b")]).drop_columns(["locality"])
    with pytest.raises(engine.ClaimsSchemaError, match="locality"):
        engine.Settler(PS).settle_batch(bad.to_batches()[0])
    with pytest.raises(engine.ClaimsSchemaError, match="locality"):
        engine.settle(bad.to_batches(), PS)


def test_other_columns_ignored_and_order_free():
    t = claims_table([GOOD])
    t2 = t.append_column("note", pa.array(["whatever"]))
    t3 = t.select(list(reversed(t.column_names)))
    want = engine.settle(t, PS).results.to_pylist()
    assert engine.settle(t2, PS).results.to_pylist() == want
    assert engine.settle(t3, PS).results.to_pylist() == want


# ============================================================== big amounts exactly


def test_amounts_at_1e12_settle_exactly():
    ps = policy_set(policy([
        layer("basic", "basic", [rule({}, segments=[(3 * 10**11, 9999), (7 * 10**11, 8765), (None, 1)],
                                      deductible=12345)]),
        layer("ci", "critical_illness", [rule({}, axis="year", deductible=10**9,
                                              segments=[(10**12, 3333), (None, 10000)])]),
        layer("aid", "medical_aid", [rule({}, max_personal_share=1)]),
    ], compliant_includes_class_b_copay=True))
    rows = [dict(claim_id=f"c{i}", settle_time=day(i), total_amount=MAX, class_b_copay_amount=MAX // 3,
                 in_scope_amount=MAX - MAX // 3, in_scope_class_b_amount=MAX // 7) for i in range(3)]
    rows.append(dict(claim_id="top", settle_time=day(9), total_amount=MAX, in_scope_amount=MAX))
    res, acc = run_both(ps, rows)
    assert statuses(res) == ["ok"] * 4
    # the first claim by hand: in scope 666,666,666,667; basic: D 12,345;
    #   [12,345, 3e11) x 0.9999 + [3e11, 666,666,666,667) x 0.8765, rounded once.
    in_scope = MAX - MAX // 3
    f = (3 * 10**11 - 12345) * 9999 + (in_scope - 3 * 10**11) * 8765
    assert res[0]["basic_pay"] == (f + 5000) // 10000
    # the 10^12 claim with a 10^14 - scale position on the year axis still exact
    key = ("p1", "000001", "resident", 2024)
    assert acc[key]["compliant_total"] == 3 * MAX + MAX


def test_year_axis_near_1e14_carry():
    # (policy money is at most 10^10 yuan = 10^12 fen, so the last segment starts at 10^12)
    ps = policy_set(policy([layer("basic", "basic", [rule({}, axis="year", segments=[(MAX, 3), (None, 9999)])])]))
    key = ("p1", "000001", "resident", 2024)
    carry = {key: {"admissions": 0, "compliant_total": 10**14 - MAX,
                   "layers": {("basic", None): [10**14 - MAX // 2, 10**13, 0]}}}
    res, acc = run_both(ps, [dict(total_amount=MAX, in_scope_amount=MAX, visit_type="outpatient")], carry)
    # position [10^14 - 5e11, 10^14 + 5e11), all in the last segment: 99.99 % of 10^12, exactly.
    start, end = 10**14 - MAX // 2, 10**14 + MAX // 2
    F = lambda y: MAX * 3 + (y - MAX) * 9999  # noqa: E731
    assert res[0]["basic_pay"] == (F(end) + 5000) // 10000 - (F(start) + 5000) // 10000 == MAX * 9999 // 10000
    assert acc[key]["compliant_total"] == 10**14
