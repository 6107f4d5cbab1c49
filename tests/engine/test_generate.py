"""The synthetic claims generator (engine/generate.py): schema, determinism,
amounts that add up, the invalid share and kinds, persons with several claims,
declared identities, time order, the person registry, and that the bundled
policies settle the generated valid rows `ok`."""
from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import engine
from conftest import layer, policy, policy_set, rule, run_both, Y
from engine.generate import (INVALID_KINDS, PERSONS_SCHEMA, generate_claims, generate_persons, iter_claims,
                             write_claims, write_persons)

N = 40_000
RATE = 0.08


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies(None)


@pytest.fixture(scope="module")
def labelled(ps):
    return generate_claims(ps, N, seed=11, invalid_rate=RATE, label=True)


@pytest.fixture(scope="module")
def clean(ps):
    return generate_claims(ps, N, seed=12)


@pytest.fixture(scope="module")
def settled(ps, labelled):
    return engine.settle(labelled.drop_columns(["expected_status"]), ps).results


def col(t: pa.Table, name: str) -> list:
    return t.column(name).to_pylist()


# --------------------------------------------------------------------------- schema, size, determinism


def test_schema_and_size(clean, labelled):
    assert clean.schema.equals(engine.CLAIMS_SCHEMA)
    assert clean.num_rows == N
    assert labelled.schema.names == engine.CLAIMS_SCHEMA.names + ["expected_status"]
    assert labelled.num_rows == N


def test_deterministic(ps, clean):
    again = generate_claims(ps, N, seed=12)
    assert again.equals(clean)
    other = generate_claims(ps, N, seed=13)
    assert not other.equals(clean)


def test_units_concatenate_to_the_table(ps):
    table = generate_claims(ps, 5000, seed=5, invalid_rate=0.05)
    parts = list(iter_claims(ps, 5000, seed=5, invalid_rate=0.05))
    assert pa.concat_tables(parts).equals(table)


@pytest.mark.parametrize("ext", ["parquet", "arrow", "csv"])
def test_write_claims_independent_of_block(ps, tmp_path, ext):
    from engine.cli import ClaimsFile

    table = generate_claims(ps, 3000, seed=4, invalid_rate=0.1)
    for block in (700, 100_000):
        path = tmp_path / f"c{block}.{ext}"
        assert write_claims(path, ps, 3000, seed=4, invalid_rate=0.1, block=block) == 3000
        back = ClaimsFile(path).read_all()
        assert back.cast(table.schema).equals(table), (ext, block)  # Parquet strings come dictionary-encoded
    if ext == "parquet":
        meta = pq.ParquetFile(tmp_path / "c700.parquet").metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [700] * 4 + [200]


def test_empty_and_bad_arguments(ps):
    assert generate_claims(ps, 0, seed=1).num_rows == 0
    assert generate_claims(ps, 0, seed=1).schema.equals(engine.CLAIMS_SCHEMA)
    with pytest.raises(ValueError):
        generate_claims(ps, -1, seed=1)
    with pytest.raises(ValueError):
        generate_claims(ps, 10, seed=1, invalid_rate=1.5)
    with pytest.raises(ValueError, match="year 1999"):
        generate_claims(ps, 10, seed=1, year=1999)


def test_tiny_counts(ps):
    for n in (1, 2, 17):
        t = generate_claims(ps, n, seed=n, invalid_rate=0.5)
        assert t.num_rows == n


# --------------------------------------------------------------------------- amounts


def test_amounts_add_up_in_fen(clean):
    for name in ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
                 "in_scope_amount", "in_scope_class_b_amount"):
        assert clean.schema.field(name).type == pa.int64()
        assert clean.column(name).null_count == 0 or name == "in_scope_class_b_amount"
    total = clean.column("total_amount").to_numpy()
    parts = sum(clean.column(c).to_numpy() for c in ("self_funded_amount", "over_limit_amount",
                                                       "class_b_copay_amount", "in_scope_amount"))
    assert (total == parts).all()
    b = clean.column("in_scope_class_b_amount").fill_null(0).to_numpy()
    assert (b <= clean.column("in_scope_amount").to_numpy()).all()
    for c in ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
              "in_scope_amount"):
        assert (clean.column(c).to_numpy() >= 0).all()
    assert (total >= 100).all() and (total <= 10**12).all()


def test_costs_long_tailed_by_visit_type(clean):
    total = clean.column("total_amount").to_numpy()
    vt = np.array(col(clean, "visit_type"))
    med = {v: np.median(total[vt == v]) for v in ("inpatient", "outpatient", "chronic")}
    assert med["outpatient"] < med["chronic"] < med["inpatient"]
    inpatient = total[vt == "inpatient"]
    assert np.percentile(inpatient, 99.5) > 8 * np.median(inpatient)  # long tail
    # Every component occurs: some self-funded, over-limit and class-B copays.
    for c in ("self_funded_amount", "over_limit_amount", "class_b_copay_amount"):
        assert (clean.column(c).to_numpy() > 0).mean() > 0.05


def test_attribute_mix(clean):
    counts = collections.Counter(col(clean, "visit_type"))
    assert set(counts) == {"inpatient", "outpatient", "chronic", "maternity"}
    assert counts["outpatient"] > counts["inpatient"] > counts["maternity"] > 0
    assert set(col(clean, "facility_level")) == {"primary", "secondary", "tertiary"}
    assert set(col(clean, "locality")) == {"county", "region", "province", "national"}
    referred = collections.Counter(col(clean, "referred"))
    assert referred[True] > 0 and referred[False] > 0 and referred[None] > 0
    ages = [a for a in col(clean, "age") if a is not None]
    assert min(ages) >= 0 and max(ages) <= 110 and np.median(ages) > 20


# --------------------------------------------------------------------------- persons, identities, codes


def test_several_claims_per_person(clean):
    counts = pc.value_counts(clean.column("person_id")).field("counts").to_numpy()
    assert counts.mean() >= 2.5
    assert counts.max() >= 10
    assert (counts == 1).mean() < 0.5


def test_identities_declared_and_mostly_none(ps, clean):
    ids = col(clean, "identities")
    none = sum(1 for x in ids if not x) / len(ids)
    assert 0.80 <= none <= 0.96
    assert any(x == [] for x in ids) and any(x is None for x in ids)
    for (region, scheme, t, held) in zip(col(clean, "region"), col(clean, "scheme"),
                                         col(clean, "settle_time"), ids):
        if held:
            p = ps.find(region, scheme, t.year)
            assert set(held) <= set(p.identities)
            assert len(set(held)) == len(held)


def test_disease_codes_from_groups_and_elsewhere(ps, clean):
    codes = col(clean, "disease_code")
    assert any(c is None for c in codes)
    cats = [c.strip().upper()[:3] for c in codes if c]
    in_group = 0
    for cat, region, scheme, t in zip(cats, col(clean, "region"), col(clean, "scheme"),
                                      col(clean, "settle_time")):
        p = ps.find(region, scheme, t.year)
        if any(lo <= cat <= hi for ranges in p.disease_groups.values() for lo, hi in ranges):
            in_group += 1
    assert 0.05 < in_group / len(cats) < 0.8
    assert any(c != c.strip() or c != c.upper() for c in codes if c)  # a few untidy codes


def test_regions_schemes_years_from_the_set(ps, clean):
    keys = {(p.region, p.scheme, p.year) for p in ps.policies}
    seen = set(zip(col(clean, "region"), col(clean, "scheme"), [t.year for t in col(clean, "settle_time")]))
    assert seen <= keys
    assert len(seen) == len(keys)  # every policy gets claims


def test_year_filter(ps):
    year = max(p.year for p in ps.policies)
    t = generate_claims(ps, 3000, seed=2, year=year)
    assert {x.year for x in col(t, "settle_time")} == {year}


# --------------------------------------------------------------------------- time order, ids


def test_sorted_by_time_and_id(labelled):
    t = labelled.column("settle_time").cast(pa.int64()).to_numpy(zero_copy_only=False)
    ids = col(labelled, "claim_id")
    rows = [(int(a), b.encode()) for a, b, v in zip(t, ids, labelled.column("settle_time").is_valid().to_pylist())
            if v and b is not None]
    assert rows == sorted(rows)
    times = [x for x in col(labelled, "settle_time") if x is not None]
    assert all(x.microsecond == 0 for x in times[:1000])
    months = collections.Counter(x.month for x in times)
    assert len(months) == 12  # spread over the year


def test_claim_ids_unique_but_duplicates(labelled):
    ids = col(labelled, "claim_id")
    expected = col(labelled, "expected_status")
    first = [i for i, e in zip(ids, expected) if e != "DUPLICATE_CLAIM" and i is not None]
    assert len(first) == len(set(first))
    assert all(i.startswith("C") for i in first)
    seen = set()
    for i, e in zip(ids, expected):
        if e == "DUPLICATE_CLAIM":
            assert i in seen
        if i is not None:
            seen.add(i)


# --------------------------------------------------------------------------- invalid rows


def test_invalid_share_and_kinds(labelled):
    expected = collections.Counter(col(labelled, "expected_status"))
    invalid = sum(expected[k] for k in INVALID_KINDS)
    assert abs(invalid / N - RATE) < 0.01
    for k in INVALID_KINDS:
        assert abs(expected[k] / invalid - 1 / len(INVALID_KINDS)) < 0.04, (k, expected)


def test_engine_gives_the_expected_status(labelled, settled):
    got = col(settled, "status")
    want = col(labelled, "expected_status")
    diff = collections.Counter((w, g) for w, g in zip(want, got) if w != g)
    assert not diff


def test_bundled_policies_settle_valid_rows_ok(ps, clean):
    status = collections.Counter(col(engine.settle(clean, ps).results, "status"))
    assert status["ok"] / N >= 0.995, status
    assert set(status) <= {"ok", "NO_BENEFIT_RULE"}


def test_first_layer_gaps_are_redrawn():
    """A first layer covering inpatient stays only: no other visit types are generated."""
    p = policy([layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, ratio=7000, deductible=300 * Y)])],
               id="inpatient-only", region="000001", year=2024)
    ps = policy_set(p)
    t = generate_claims(ps, 2000, seed=3)
    assert set(col(t, "visit_type")) == {"inpatient"}
    assert set(col(engine.settle(t, ps).results, "status")) == {"ok"}


def test_engine_matches_reference_on_generated_claims(ps):
    t = generate_claims(ps, 1500, seed=21, invalid_rate=0.1)
    run_both(ps, t)


# --------------------------------------------------------------------------- the person registry


@pytest.fixture(scope="module")
def persons(ps):
    return generate_persons(ps, N, seed=12)


def test_persons_schema_and_determinism(ps, persons):
    assert persons.schema.equals(PERSONS_SCHEMA)
    assert generate_persons(ps, N, seed=12).equals(persons)
    assert pc.count_distinct(persons.column("person_id")).as_py() == persons.num_rows


def test_persons_match_the_claims(ps, clean, persons):
    reg = {r["person_id"]: r for r in persons.to_pylist()}
    for c in clean.to_pylist():
        p = reg[c["person_id"]]
        assert (p["region"], p["scheme"]) == (c["region"], c["scheme"])
        day = c["settle_time"].date()
        if c["age"] is not None:
            b = p["birth_date"]
            age = day.year - b.year - ((day.month, day.day) < (b.month, b.day))
            assert c["age"] == age
        held = {s["identity"] for s in p["identities"] if s["valid_from"] <= day <= s["valid_to"]}
        assert set(c["identities"] or []) == held


def test_persons_spells(persons):
    spells = [s for lst in col(persons, "identities") for s in lst]
    assert spells
    assert all(s["valid_from"] <= s["valid_to"] for s in spells)
    holders = sum(1 for lst in col(persons, "identities") if lst)
    assert 0.02 < holders / persons.num_rows < 0.2


def test_write_persons(ps, tmp_path, persons):
    path = tmp_path / "persons.parquet"
    assert write_persons(path, ps, N, seed=12) == persons.num_rows
    assert pq.read_table(path).equals(persons)


# --------------------------------------------------------------------------- policy versions and spells (revision 2)

import datetime as dt  # noqa: E402

import reference as ref  # noqa: E402
from conftest import adj  # noqa: E402


def _reference_statuses(ps, t: pa.Table) -> list:
    results, _ = ref.settle(ps, t.drop_columns(["expected_status"]).to_pylist())
    return [r["status"] for r in results]


def test_claims_follow_the_version_in_force():
    # v1 pays admissions only, v2 (from July 1) outpatient visits only: a claim's visit is drawn
    # until the first layer of the version in force on its day has a rule for it.
    v1 = policy([layer("basic", "basic", [rule({"visit_type": ["inpatient"]}, ratio=5000)])], id="v1")
    v2 = policy([layer("basic", "basic", [rule({"visit_type": ["outpatient"]}, ratio=5000)])], id="v2",
                effective_from=dt.date(2024, 7, 1))
    ps = policy_set(v1, v2)
    t = generate_claims(ps, 3000, seed=5, label=True)
    july = dt.datetime(2024, 7, 1)
    rows = t.to_pylist()
    before = {r["visit_type"] for r in rows if r["settle_time"] < july}
    after = {r["visit_type"] for r in rows if r["settle_time"] >= july}
    assert before == {"inpatient"} and after == {"outpatient"}
    assert set(col(t, "expected_status")) == {"ok"}
    assert _reference_statuses(ps, t) == col(t, "expected_status")
    assert generate_claims(ps, 3000, seed=5, label=True).equals(t)  # deterministic with versions too


def test_days_before_the_first_version_are_unknown_policy():
    v = policy([layer("basic", "basic", [rule({}, ratio=5000)])], id="from-march",
               effective_from=dt.date(2024, 3, 1))
    ps = policy_set(v)
    t = generate_claims(ps, 2000, seed=6, invalid_rate=0.1, label=True)
    march = dt.datetime(2024, 3, 1)
    status = col(t, "expected_status")
    early = [s for r, s in zip(t.to_pylist(), status) if r["settle_time"] is not None and r["settle_time"] < march]
    assert early and set(early) == {"UNKNOWN_POLICY"}  # and no other defect on those rows
    assert "ok" in status
    assert _reference_statuses(ps, t) == status


def test_an_identity_declared_by_another_version_of_the_year():
    # v1 declares poor only; v2 (from July 1) declares farmer too: persons may hold farmer all
    # year; under v1 it is not held (ok, identity null), under v2 it is their identity.
    v1 = policy([layer("basic", "basic", [rule({}, ratio=5000)])], id="v1", identities=("poor",))
    v2 = policy([layer("basic", "basic", [rule({}, ratio=5000)], adjustments=[adj({"identity": ["farmer"]},
                                                                                    ratio=9000)])],
                id="v2", identities=("farmer", "poor"), effective_from=dt.date(2024, 7, 1))
    ps = policy_set(v1, v2)
    t = generate_claims(ps, 6000, seed=7, label=True)
    july = dt.datetime(2024, 7, 1)
    rows = t.to_pylist()
    assert any("farmer" in (r["identities"] or []) and r["settle_time"] < july for r in rows)
    assert set(col(t, "expected_status")) == {"ok"}
    results, _ = ref.settle(ps, t.drop_columns(["expected_status"]).to_pylist())
    for r, res in zip(rows, results):
        assert res["status"] == "ok"
        if r["identities"] == ["farmer"]:
            assert res["identity"] == (None if r["settle_time"] < july else "farmer")


def test_bundled_claims_on_both_sides_of_the_tibet_versions(ps, clean):
    tibet = [r["settle_time"] for r in clean.select(["region", "settle_time"]).to_pylist()
             if r["region"] == "540000" and r["settle_time"].year == 2019]
    versions = ps.versions("540000", "resident", 2019)
    assert len(versions) == 3
    for p, nxt in zip(versions, versions[1:] + (None,)):
        start = dt.datetime.combine(p.effective_from, dt.time())
        end = dt.datetime.combine(nxt.effective_from, dt.time()) if nxt else dt.datetime(2020, 1, 1)
        assert any(start <= t < end for t in tibet), p.id


def test_persons_gain_and_lose_identities_within_a_year(clean):
    # the claims follow the spells: some person's claims of one year go from no identity to one
    # (recognised in the middle of the year) and some the other way
    seen = collections.defaultdict(list)
    for r in clean.select(["person_id", "settle_time", "identities"]).to_pylist():
        seen[(r["person_id"], r["settle_time"].year)].append((r["settle_time"], bool(r["identities"])))
    gained = lost = 0
    for claims in seen.values():
        flags = [held for _, held in sorted(claims)]
        gained += any(not a and b for a, b in zip(flags, flags[1:]))
        lost += any(a and not b for a, b in zip(flags, flags[1:]))
    assert gained > 5 and lost > 5
