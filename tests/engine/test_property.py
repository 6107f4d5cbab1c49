"""Property tests: random small policies (built as `engine.model` objects) and
random claim batches (several persons, several claims each, some invalid rows).

* the engine equals the reference (tests/reference.py) on every result field
  and on the closing accumulators;
* a stream of chunks (split so that later chunks sort after earlier ones per
  key) equals one call; so does settling part 1, then part 2 from part 1's
  accumulators;
* on the year axis a key's yearly total pay does not depend on how the same
  total is split into claims.

Default example counts keep the file well under 30 s; the `slow` variants
run many more.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import engine
import reference as ref
from conftest import acc_from_table, claims_table, compare, fill_claim, run_both
from engine import model as M

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings(max_examples=30, **SETTINGS)
SLOW = settings(max_examples=400, **SETTINGS)

IDENTITY_POOL = ("i_a", "i_b", "i_c", "i_d")
CATEGORIES = ("A00", "C18", "E10", "E14", "I10", "I15", "J45", "N18", "Z99")
CODES = (None, "", "I1", "I10", "i12.9", " E11.2 ", "E14", "C18.7", "N18", "J45.9", "Z99", "K35")

ratio_bp = st.one_of(st.integers(0, 10_000), st.sampled_from([0, 5_000, 7_000, 9_999, 10_000]))
money = st.one_of(st.integers(0, 400_000), st.sampled_from([0, 1, 99, 100_000, 1_000_000]))
amount = st.one_of(st.integers(0, 1_500_000), st.sampled_from([0, 1, 3, 100_000]))


@functools.lru_cache(maxsize=None)
def subset(pool, min_size=1):
    return st.lists(st.sampled_from(pool), min_size=min_size, max_size=len(pool), unique=True).map(tuple)


# ============================================================== policies


MATCH_KEYS = ("visit_type", "facility_level", "locality", "referred", "min_age", "max_age", "identity",
              "holds", "disease_group")


@st.composite
def matches(draw, identities, groups):
    """A conjunction of 0-3 random keys (few keys, so rules match often enough)."""
    keys = draw(st.lists(st.sampled_from(MATCH_KEYS), max_size=3, unique=True))
    kw = {}
    for k in keys:
        if k == "visit_type":
            kw[k] = draw(subset(M.VISIT_TYPES))
        elif k == "facility_level":
            kw[k] = draw(subset(M.FACILITY_LEVELS))
        elif k == "locality":
            kw[k] = draw(subset(M.LOCALITIES))
        elif k == "referred":
            kw[k] = draw(st.booleans())
        elif k in ("min_age", "max_age"):
            kw[k] = draw(st.integers(0, 90))
        elif k in ("identity", "holds") and identities:
            kw[k] = draw(subset(identities))
        elif k == "disease_group" and groups:
            kw[k] = draw(subset(tuple(groups)))
    return M.Match(**kw)


@st.composite
def segments(draw):
    uptos = sorted(set(draw(st.lists(st.integers(1, 1_200_000), max_size=3))))
    ratios = draw(st.lists(ratio_bp, min_size=len(uptos) + 1, max_size=len(uptos) + 1))
    return tuple(M.Segment(u, r) for u, r in zip(uptos + [None], ratios))


@st.composite
def rules(draw, first, cap_groups, identities, groups, year_only=False):
    m = draw(matches(identities, groups))
    # none, one, or nested cap groups (revision 2: each limits, each grows, the first holds the position)
    caps = draw(st.lists(st.sampled_from(cap_groups), max_size=len(cap_groups), unique=True).map(tuple)
                ) if cap_groups else ()
    kinds = ["segments"] * 4 + (["class_ratio"] if first else []) + ["fixed_amount", "max_personal_share"]
    kind = "segments" if year_only else draw(st.sampled_from(kinds))
    if kind == "fixed_amount":
        return M.Rule(m, M.KIND_FIXED_AMOUNT, fixed_amount=draw(money), cap_groups=caps)
    if kind == "max_personal_share":
        return M.Rule(m, M.KIND_MAX_PERSONAL_SHARE, max_personal_share=draw(ratio_bp), cap_groups=caps)
    deductible = draw(st.one_of(st.just(0), money))
    if kind == "class_ratio":
        return M.Rule(m, M.KIND_CLASS_RATIO, class_ratio=(draw(ratio_bp), draw(ratio_bp)), deductible=deductible,
                      repeat_admission=draw(st.booleans()), cap_groups=caps)
    axis = "year" if year_only else draw(st.sampled_from(M.AXES))
    # repeat_admission on either axis (on the year axis it must not change the deductible)
    repeat = first and draw(st.booleans())
    return M.Rule(m, M.KIND_SEGMENTS, segments=draw(segments()), deductible=deductible, axis=axis,
                  bounds=draw(st.sampled_from(M.BOUNDS)), repeat_admission=repeat, cap_groups=caps)


@st.composite
def adjustments(draw, identities, groups):
    m = draw(matches(identities, groups))
    fields = draw(st.lists(st.sampled_from(["deductible_factor", "ratio", "ratio_add", "cap_factor", "uncapped"]),
                           min_size=1, max_size=3, unique=True))
    kw = {}
    for f in fields:
        if f == "ratio_add":
            kw[f] = draw(st.integers(-10_000, 10_000))
        elif f == "cap_factor":  # [0, 10]; products above 100 meet the 10^6 bound
            kw[f] = draw(st.one_of(st.integers(0, 100_000), st.sampled_from([0, 5_000, 15_000, 100_000])))
        elif f == "uncapped":
            kw[f] = draw(st.booleans())
        else:
            kw[f] = draw(ratio_bp)
    return M.Adjustment(m, **kw)


@st.composite
def layers(draw, i, identities, groups, year_only=False):
    cap_groups = {f"cg{j}": draw(st.one_of(money, st.integers(0, 3_000_000)))
                  for j in range(draw(st.integers(0, 3)))}
    names = tuple(cap_groups)
    rs = draw(st.lists(rules(i == 0, names, identities, groups, year_only), min_size=1, max_size=3))
    if i == 0 and draw(st.integers(0, 3)):  # usually a catch-all, so few NO_BENEFIT_RULE
        rs.append(dataclasses.replace(draw(rules(True, names, (), {}, year_only)), match=M.Match()))
    adjs = draw(st.lists(adjustments(identities, groups), max_size=2))
    fund = "basic" if i == 0 else draw(st.sampled_from(M.FUNDS))
    return M.Layer(name=f"L{i}", fund=fund, rules=tuple(rs), cap_groups=cap_groups, adjustments=tuple(adjs))


@st.composite
def policies(draw, year=2024, scheme="resident", year_only=False, effective_from=None, version=""):
    identities = tuple(draw(st.permutations(IDENTITY_POOL)))[: draw(st.sampled_from([4, 4, 4, 3, 2, 0]))]
    groups = {}
    for g in range(draw(st.integers(0, 2))):
        ranges = []
        for _ in range(draw(st.integers(1, 2))):
            lo, hi = sorted(draw(st.lists(st.sampled_from(CATEGORIES), min_size=2, max_size=2)))
            ranges.append((lo, hi))
        groups[f"dg{g}"] = tuple(ranges)
    n = draw(st.integers(1, 3))
    ls = tuple(draw(layers(i, identities, groups, year_only)) for i in range(n))
    factors = tuple(draw(st.lists(ratio_bp, min_size=1, max_size=3)))
    return M.Policy(id=f"pol-{scheme}-{year}{version}", region="000001", scheme=scheme, year=year, layers=ls,
                    effective_from=effective_from,
                    identities=identities, compliant_includes_class_b_copay=draw(st.booleans()),
                    repeat_factors=factors, repeat_floor=draw(st.one_of(st.just(0), money)),
                    disease_groups=groups)


# Claims fall on 2024-03-01 .. 03-04: versions from these days split them; a first version
# from March 2 leaves the claims of March 1 before it (UNKNOWN_POLICY).
VERSION_DAYS = [dt.date(2024, 3, d) for d in (2, 3, 4)]


@st.composite
def policy_sets(draw):
    """One to three versions of (000001, resident, 2024), drawn independently, so that they
    share some (layer, cap group) names and identities and not others; other years and schemes."""
    days = sorted(draw(st.lists(st.sampled_from(VERSION_DAYS), max_size=2, unique=True)))
    first = draw(st.sampled_from([None] * 3 + [VERSION_DAYS[0]]))
    days = [first] + [d for d in days if first is None or d > first]
    ps = [draw(policies(2024, effective_from=d, version=f"-v{k}" if k else "")) for k, d in enumerate(days)]
    if draw(st.booleans()):
        ps.append(draw(policies(2023)))
    if draw(st.booleans()):
        ps.append(draw(policies(2024, "employee")))
    return engine.PolicySet(policies=tuple(ps))


# ============================================================== claims

MUTATIONS = [
    lambda c: c.update(total_amount=c["total_amount"] + 1),
    lambda c: c.update(person_id=None),
    lambda c: c.update(settle_time=None),
    lambda c: c.update(visit_type="surgery"),
    lambda c: c.update(in_scope_amount=-1),
    lambda c: c.update(in_scope_amount=10**12 + 1),
    lambda c: c.update(in_scope_class_b_amount=c["in_scope_amount"] + 1),
    lambda c: c.update(region="999999"),
    lambda c: c.update(identities=(c["identities"] or []) + ["unknown_identity"]),
    lambda c: c.update(identities=(c["identities"] or []) + [None]),  # revision 2: UNKNOWN_IDENTITY
]


BASE_TIME = dt.datetime(2024, 3, 1, 8)
C = dict(  # claim field strategies, built once
    id_prefix=st.sampled_from(["c", "C", "é", "z", "c1", "\uff21"]),
    person=st.sampled_from(["p0", "p1", "p2"]),
    scheme=st.sampled_from(["resident"] * 4 + ["employee"]),
    year=st.sampled_from([2024] * 10 + [2023, 2025]),
    day=st.integers(0, 3),
    micro=st.integers(0, 2),
    visit=st.sampled_from(M.VISIT_TYPES),
    level=st.sampled_from(M.FACILITY_LEVELS),
    locality=st.sampled_from(M.LOCALITIES),
    referred=st.sampled_from([True, False, None]),
    code=st.sampled_from(CODES),
    age=st.one_of(st.none(), st.integers(0, 100)),
    identities=st.one_of(st.none(), st.lists(st.sampled_from(IDENTITY_POOL), max_size=3, unique=True)),
    class_b_pct=st.one_of(st.none(), st.integers(0, 100)),
    extra=st.one_of(st.just(0), money),
    over=st.sampled_from([0, 0, 1, 5_000]),
    mutate=st.integers(0, 9),
    mutation=st.sampled_from(range(len(MUTATIONS))),
    dup=st.integers(0, 11),
)


@st.composite
def claim_rows(draw, n_min=1, n_max=14):
    n = draw(st.integers(n_min, n_max))
    rows = []
    for i in range(n):
        in_scope = draw(amount)
        pct = draw(C["class_b_pct"])
        row = dict(
            claim_id=draw(C["id_prefix"]) + str(i),
            person_id=draw(C["person"]),
            region="000001",
            scheme=draw(C["scheme"]),
            settle_time=BASE_TIME.replace(year=draw(C["year"]))
            + dt.timedelta(days=draw(C["day"]), microseconds=draw(C["micro"])),
            visit_type=draw(C["visit"]),
            facility_level=draw(C["level"]),
            locality=draw(C["locality"]),
            referred=draw(C["referred"]),
            disease_code=draw(C["code"]),
            age=draw(C["age"]),
            identities=draw(C["identities"]),
            in_scope_amount=in_scope,
            in_scope_class_b_amount=None if pct is None else in_scope * pct // 100,
            class_b_copay_amount=draw(C["extra"]),
            self_funded_amount=draw(C["extra"]),
            over_limit_amount=draw(C["over"]),
        )
        row = fill_claim(row, i)
        if draw(C["mutate"]) == 7:  # (not 0: hypothesis favours small values)
            MUTATIONS[draw(C["mutation"])](row)
        rows.append(row)
    # some duplicates: a later row takes an earlier row's claim_id
    for i in range(1, n):
        if draw(C["dup"]) == 7:
            rows[i]["claim_id"] = rows[draw(st.integers(0, i - 1))]["claim_id"]
    return rows


def settle_order(row):
    t = row["settle_time"] or dt.datetime.min
    return (t, (row["claim_id"] or "").encode())


def merge_acc(a: dict, b: dict) -> dict:
    out = dict(a)
    out.update(b)
    return out


# ============================================================== engine == reference


def check_engine_equals_reference(ps, rows):
    table = claims_table(rows)
    run_both(ps, table)


@FAST
@given(ps=policy_sets(), rows=claim_rows())
def test_engine_equals_reference(ps, rows):
    check_engine_equals_reference(ps, rows)


@pytest.mark.slow
@SLOW
@given(ps=policy_sets(), rows=claim_rows(n_max=40))
def test_engine_equals_reference_many(ps, rows):
    check_engine_equals_reference(ps, rows)


@FAST
@given(ps=policy_sets(), rows=claim_rows(n_min=1, n_max=8), carry_rows=claim_rows(n_min=1, n_max=8))
def test_engine_equals_reference_from_carried_accumulators(ps, rows, carry_rows):
    """Accumulators produced by one batch (by the reference) carried into another."""
    for r in carry_rows:
        r["claim_id"] = f"old-{r['claim_id']}"
    _, carry = ref.settle(ps, claims_table(carry_rows).to_pylist())
    run_both(ps, claims_table(rows), carry)


def scale_policy(p: M.Policy, k: int) -> M.Policy:
    """Every money value of the policy times k (ratios unchanged)."""
    def sm(v):
        return None if v is None else v * k

    layers = []
    for L in p.layers:
        rules = tuple(dataclasses.replace(
            r, segments=tuple(M.Segment(sm(s.upto), s.ratio) for s in r.segments),
            fixed_amount=sm(r.fixed_amount), deductible=r.deductible * k) for r in L.rules)
        layers.append(dataclasses.replace(L, rules=rules, cap_groups={g: c * k for g, c in L.cap_groups.items()}))
    return dataclasses.replace(p, layers=tuple(layers), repeat_floor=p.repeat_floor * k)


BIG = 300_000  # policy money up to 9e11 fen (<= 10^10 yuan), claim amounts up to ~1e12


def scale_rows(rows, k):
    out = []
    for r in rows:
        r = dict(r)
        for f in ref.AMOUNTS:
            if r.get(f) is not None and 0 <= r[f] <= 10**12:
                r[f] = r[f] * k
        out.append(r)
    return out


@FAST
@given(ps=policy_sets(), rows=claim_rows(n_max=10), carry_rows=claim_rows(n_max=6),
       offsets=st.tuples(st.integers(0, 10**14), st.integers(0, 10**14 - 10**13)))
def test_engine_equals_reference_big_amounts(ps, rows, carry_rows, offsets):
    """Amounts near 10^12, positions and compliant totals carried in near 10^14:
    exact integers, no overflow."""
    ps = engine.PolicySet(policies=tuple(scale_policy(p, BIG) for p in ps.policies))
    for r in carry_rows:
        r["claim_id"] = f"old-{r['claim_id']}"
    _, carry = ref.settle(ps, claims_table(scale_rows(carry_rows, BIG)).to_pylist())
    ct_offset, pos_offset = offsets
    for a in carry.values():
        a["compliant_total"] = min(10**14, a["compliant_total"] + ct_offset)
        for e in a["layers"].values():
            e[0] = min(10**14, e[0] + pos_offset)
    run_both(ps, claims_table(scale_rows(rows, BIG)), carry)


# ============================================================== chunks and carry


def check_stream_equals_whole(ps, rows, cuts):
    rows = sorted(rows, key=settle_order)
    bounds = sorted({min(c, len(rows)) for c in cuts} | {0, len(rows)})
    chunks = [rows[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    whole = engine.settle(claims_table(rows), ps)
    whole_rows = whole.results.to_pylist()
    whole_acc = acc_from_table(whole.accumulators)
    batches = [claims_table(c).to_batches()[0] for c in chunks]
    stream = engine.settle(iter(batches), ps)
    assert stream.results.to_pylist() == whole_rows
    assert ref.normalize_accumulators(acc_from_table(stream.accumulators)) == ref.normalize_accumulators(whole_acc)
    s = engine.Settler(ps)
    out = []
    for b in batches:
        out.extend(s.settle_batch(b).to_pylist())
    assert out == whole_rows
    assert ref.normalize_accumulators(acc_from_table(s.accumulators())) == ref.normalize_accumulators(whole_acc)
    # and the reference, streamed
    ref_rows, ref_acc = ref.settle_stream(ps, [claims_table(c).to_pylist() for c in chunks])
    compare(whole_rows, ref_rows, whole_acc, ref_acc)


@FAST
@given(ps=policy_sets(), rows=claim_rows(n_min=2, n_max=16), cuts=st.lists(st.integers(1, 15), max_size=4))
def test_stream_of_chunks_equals_one_call(ps, rows, cuts):
    check_stream_equals_whole(ps, rows, cuts)


def check_carry_equals_whole(ps, rows, cut):
    for i, r in enumerate(rows):  # unique ids: carried accumulators hold no claim ids
        if r["claim_id"] is not None:
            r["claim_id"] = f"{r['claim_id']}#{i}"
    rows = sorted(rows, key=settle_order)
    cut = min(cut, len(rows))
    whole = engine.settle(claims_table(rows), ps)
    p1 = engine.settle(claims_table(rows[:cut]), ps)
    p2 = engine.settle(claims_table(rows[cut:]), ps, p1.accumulators)
    assert p1.results.to_pylist() + p2.results.to_pylist() == whole.results.to_pylist()
    merged = merge_acc(acc_from_table(p1.accumulators), acc_from_table(p2.accumulators))
    assert ref.normalize_accumulators(merged) == ref.normalize_accumulators(acc_from_table(whole.accumulators))
    # the reference agrees on the carried call too
    ref_rows, ref_acc = ref.settle(ps, claims_table(rows[cut:]).to_pylist(), acc_from_table(p1.accumulators))
    compare(p2.results.to_pylist(), ref_rows, merge_acc(acc_from_table(p1.accumulators),
                                                        acc_from_table(p2.accumulators)), ref_acc)


@FAST
@given(ps=policy_sets(), rows=claim_rows(n_min=2, n_max=16), cut=st.integers(0, 16))
def test_settle_with_carry_equals_one_call(ps, rows, cut):
    check_carry_equals_whole(ps, [dict(r) for r in rows], cut)


def check_split_by_key(ps, rows):
    """Keys are independent: one call per person gives the same rows (claim ids
    unique, as duplicates are found over the whole call before any split)."""
    for i, r in enumerate(rows):
        if r["claim_id"] is not None:
            r["claim_id"] = f"{r['claim_id']}#{i}"
    whole = engine.settle(claims_table(rows), ps)
    whole_rows = whole.results.to_pylist()
    acc = {}
    for person in {r["person_id"] for r in rows}:
        idx = [i for i, r in enumerate(rows) if r["person_id"] == person]
        part = engine.settle(claims_table([rows[i] for i in idx]), ps)
        for i, r in zip(idx, part.results.to_pylist()):
            assert r == whole_rows[i]
        acc.update(acc_from_table(part.accumulators))
    assert ref.normalize_accumulators(acc) == ref.normalize_accumulators(acc_from_table(whole.accumulators))


@FAST
@given(ps=policy_sets(), rows=claim_rows(n_min=2, n_max=16))
def test_split_by_key_equals_one_call(ps, rows):
    check_split_by_key(ps, [dict(r) for r in rows])


@pytest.mark.slow
@SLOW
@given(ps=policy_sets(), rows=claim_rows(n_min=2, n_max=40), cuts=st.lists(st.integers(1, 39), max_size=6),
       cut=st.integers(0, 40))
def test_chunks_and_carry_many(ps, rows, cuts, cut):
    check_stream_equals_whole(ps, [dict(r) for r in rows], cuts)
    check_carry_equals_whole(ps, [dict(r) for r in rows], cut)
    check_split_by_key(ps, [dict(r) for r in rows])


# ============================================================== the year axis


def split_strategy():
    return st.tuples(st.integers(0, 3_000_000), st.lists(st.integers(0, 10_000), min_size=1, max_size=6))


def check_year_axis_split(ps, claim, total, weights):
    parts = [0] * len(weights)
    s = sum(weights)
    if s:  # split `total` in proportion to the weights, exactly
        acc = 0
        for i, w in enumerate(weights):
            acc += w
            parts[i] = total * acc // s
        parts = [b - a for a, b in zip([0] + parts[:-1], parts)]
    else:
        parts[-1] = total
    assert sum(parts) == total

    def totals(amounts):
        rows = [dict(claim, claim_id=f"k{i:02d}", settle_time=dt.datetime(2024, 4, 1) + dt.timedelta(hours=i),
                     total_amount=a, in_scope_amount=a) for i, a in enumerate(amounts)]
        res, _ = run_both(ps, rows)
        assert all(r["status"] == "ok" for r in res)
        per_layer = {}
        for r in res:
            for e in r["layer_pays"]:
                per_layer[e["layer"]] = per_layer.get(e["layer"], 0) + e["pay"]
        return per_layer, sum(r["fund_pay_total"] for r in res)

    assert totals([total]) == totals(parts)


@st.composite
def year_axis_policies(draw):
    p = draw(policies(2024, year_only=True))
    # the first layer must have a rule for the claim: add a catch-all at the end
    l0 = p.layers[0]
    catch = M.Rule(M.Match(), M.KIND_SEGMENTS, segments=draw(segments()), deductible=draw(money), axis="year")
    l0 = dataclasses.replace(l0, rules=l0.rules + (catch,))
    return engine.PolicySet(policies=(dataclasses.replace(p, layers=(l0,) + p.layers[1:]),))


@st.composite
def one_claim(draw):
    return dict(person_id="py", visit_type=draw(st.sampled_from(M.VISIT_TYPES)),
                facility_level=draw(st.sampled_from(M.FACILITY_LEVELS)),
                locality=draw(st.sampled_from(M.LOCALITIES)), referred=draw(st.sampled_from([True, False])),
                disease_code=draw(st.sampled_from(CODES)), age=draw(st.one_of(st.none(), st.integers(0, 100))),
                identities=None, in_scope_class_b_amount=0)


@FAST
@given(ps=year_axis_policies(), claim=one_claim(), split=split_strategy())
def test_year_axis_total_independent_of_split(ps, claim, split):
    total, weights = split
    held = [i for i in IDENTITY_POOL if i in ps.policies[0].identities][:2]
    claim["identities"] = held or None
    check_year_axis_split(ps, claim, total, weights)


@pytest.mark.slow
@SLOW
@given(ps=year_axis_policies(), claim=one_claim(), split=split_strategy())
def test_year_axis_total_independent_of_split_many(ps, claim, split):
    held = [i for i in IDENTITY_POOL if i in ps.policies[0].identities][:2]
    claim["identities"] = held or None
    check_year_axis_split(ps, claim, *split)
