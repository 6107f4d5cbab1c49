"""`status_detail` and `--keep-columns` (issue 13 item 2): results that explain themselves."""
from __future__ import annotations

import datetime as dt

import detail_reference
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import engine
from engine.cli import main
from engine.detail import status_detail, with_detail
from engine.generate import generate_claims


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies(None)


@pytest.fixture(scope="module")
def claims(ps):
    c = generate_claims(ps, 20_000, seed=3, invalid_rate=0.2)
    return pa.concat_tables([c, c.slice(100, 1)])  # and a duplicate


@pytest.fixture(scope="module")
def settled(ps, claims):
    return engine.settle(claims, ps).results


def _any_status(claims, seed: int) -> pa.Table:
    """Results whose statuses are drawn at random, every code and an unknown one and null on
    any claim: status_detail reads only the status and the claim, so each sentence meets
    every kind of value (a null where it names one, a valid claim under an error code)."""
    rng = np.random.default_rng(seed)
    names = [*engine.STATUSES, "A_NEWER_CODE", None]
    status = [names[i] for i in rng.integers(0, len(names), claims.num_rows)]
    policy = [None if rng.random() < 0.5 else "pol-x" for _ in range(claims.num_rows)]
    return pa.table({"status": status, "policy_id": pa.array(policy, pa.string())})


def _odd_claims(ps, claims) -> pa.Table:
    """The claims with dates at the ends of what a date can be, versions in force of a
    year with several (Tibet 2019), identities with null and empty items, amounts at int64's ends
    and parts whose sum wraps."""
    n = claims.num_rows
    micros = claims.column("settle_time").cast(pa.int64()).to_pylist()
    tibet = [dt.datetime(2019, 3, 21), dt.datetime(2019, 3, 29, 23), dt.datetime(2019, 12, 31)]
    ends = [-62135596800 * 10**6, 253402300799 * 10**6 + 999999, 253402300800 * 10**6 * 2, -1]
    for i in range(0, n, 7):
        micros[i] = ends[(i // 7) % len(ends)]
    for i in range(3, n, 11):
        micros[i] = int((tibet[(i // 11) % 3] - dt.datetime(1970, 1, 1)).total_seconds()) * 10**6
    region = claims.column("region").to_pylist()
    scheme = claims.column("scheme").to_pylist()
    for i in range(3, n, 11):
        region[i], scheme[i] = "540000", "resident"
    ids = claims.column("identities").to_pylist()
    odd_ids = [None, [], [None], [""], ["", "x"], ["a", None, "b"]]
    for i in range(5, n, 13):
        ids[i] = odd_ids[(i // 13) % len(odd_ids)]
    total = claims.column("total_amount").to_pylist()
    for i in range(1, n, 17):
        total[i] = [2**63 - 1, -2**63, None][(i // 17) % 3]
    funded, in_scope = claims.column("self_funded_amount").to_pylist(), claims.column("in_scope_amount").to_pylist()
    for i in range(2, n, 19):  # a sum of the parts past int64, which Arrow's add wraps
        funded[i], in_scope[i] = 2**62, 2**62 + i
    out = claims
    for name, values, typ in (("self_funded_amount", funded, pa.int64()), ("in_scope_amount", in_scope, pa.int64()),
                              ("settle_time", pa.array(micros, pa.int64()).cast(pa.timestamp("us")), None),
                              ("region", region, pa.string()), ("scheme", scheme, pa.string()),
                              ("identities", ids, pa.list_(pa.string())), ("total_amount", total, pa.int64())):
        arr = values if typ is None else pa.array(values, typ)
        out = out.set_column(out.schema.get_field_index(name), name, arr)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_same_sentences_as_the_column_wise_reference(ps, claims, settled, seed):
    """engine/detail.py writes in C (engine/_detail.pyx) what tests/detail_reference.py builds
    with Arrow compute: the same array, for the settled claims and for any status on any claim, with the
    policies and without, from plain and dictionary-encoded columns, a sliced batch."""
    odd = _odd_claims(ps, claims)
    any_status = _any_status(claims, seed)
    encoded = odd
    for name in ("region", "scheme", "visit_type", "facility_level", "locality", "person_id"):
        i = encoded.schema.get_field_index(name)
        encoded = encoded.set_column(i, name, pc.dictionary_encode(encoded.column(name)))
    cases = [(claims, settled), (odd, any_status), (encoded, any_status),
             (odd.slice(101, 5000).combine_chunks().to_batches()[0], any_status.slice(101, 5000))]
    for c, r in cases:
        for policies in (ps, None):
            got = status_detail(c, r, policies)
            want = detail_reference.status_detail(c, r, policies)
            assert got.type == want.type == pa.string()
            assert got.to_pylist() == want.to_pylist()


def test_null_exactly_when_ok(ps, claims, settled):
    detail = status_detail(claims, settled, ps)
    assert len(detail) == claims.num_rows
    ok = pc.equal(settled.column("status"), "ok")
    assert pc.all(pc.equal(pc.is_null(detail), ok)).as_py()
    codes = set(settled.column("status").to_pylist())
    assert codes == set(engine.STATUSES) - {"NO_BENEFIT_RULE"}  # the generator covers the others


def _rows(claims, settled, detail, code):
    return [(c, d) for c, r, d in zip(claims.to_pylist(), settled.column("status").to_pylist(), detail.to_pylist())
            if r == code]


def test_each_code_names_the_field_and_values(ps, claims, settled):
    detail = status_detail(claims, settled, ps)
    for c, d in _rows(claims, settled, detail, "AMOUNT_MISMATCH"):
        parts = [c[f"{p}_amount"] for p in ("self_funded", "over_limit", "class_b_copay", "in_scope")]
        if c["total_amount"] != sum(parts):
            assert d == (f"total_amount {c['total_amount']} != {sum(parts)} = self_funded {parts[0]} + over_limit "
                         f"{parts[1]} + class_b_copay {parts[2]} + in_scope {parts[3]}")
        else:
            assert d == (f"in_scope_class_b_amount {c['in_scope_class_b_amount']} > in_scope_amount "
                         f"{c['in_scope_amount']}")
    for c, d in _rows(claims, settled, detail, "INVALID_AMOUNT"):
        neg = [n for n in engine.schema.AMOUNT_COLUMNS if c[n] is not None and c[n] < 0]
        assert neg and all(f"{n} {c[n]} < 0" in d for n in neg)
    for c, d in _rows(claims, settled, detail, "AMOUNT_OUT_OF_RANGE"):
        big = [n for n in engine.schema.AMOUNT_COLUMNS if c[n] is not None and c[n] > 10**12]
        assert big and all(f"{n} {c[n]} > 10^12" in d for n in big)
    for c, d in _rows(claims, settled, detail, "MISSING_FIELD"):
        nulls = [n for n in engine.schema.REQUIRED_COLUMNS if c[n] is None]
        assert d == f"{', '.join(nulls)} is null; a required field"
    for c, d in _rows(claims, settled, detail, "INVALID_VALUE"):
        assert any(f"{n} '{c[n]}' is not one of" in d for n in ("scheme", "visit_type", "facility_level", "locality"))
    for c, d in _rows(claims, settled, detail, "UNKNOWN_POLICY"):
        assert d.startswith(f"no policy for region {c['region']}, scheme {c['scheme']} on "
                            f"{c['settle_time']:%Y-%m-%d}")
    for c, d in _rows(claims, settled, detail, "UNKNOWN_IDENTITY"):
        year = c["settle_time"].year
        declared = ps.year_identities(c["region"], c["scheme"], year)
        assert (f"no version of region {c['region']}, scheme {c['scheme']}, year {year} declares "
                f"(they declare: {', '.join(declared) or 'none'})") in d
        assert all(i in d for i in c["identities"] if i)
    dup = _rows(claims, settled, detail, "DUPLICATE_CLAIM")
    assert dup and all(d.startswith(f"claim_id {c['claim_id']} came earlier in this call") for c, d in dup)


def test_no_benefit_rule_and_compliant_total(ps):
    """The two codes the generator does not make: a visit no basic rule covers, and a claim that
    would take the year's compliant total above 10^14 fen."""
    p = ps.policies[0]
    base = dict(claim_id="X1", person_id="P1", region=p.region, scheme=p.scheme,
                settle_time=dt.datetime(p.year, 3, 1, 9), visit_type="maternity", facility_level="primary",
                locality="national", referred=False, disease_code=None, age=40, identities=[],
                total_amount=100, self_funded_amount=0, over_limit_amount=0, class_b_copay_amount=0,
                in_scope_amount=100, in_scope_class_b_amount=0)
    claims = pa.Table.from_pylist([base], schema=engine.CLAIMS_SCHEMA)
    res = engine.settle(claims, ps).results
    if res.column("status")[0].as_py() == "NO_BENEFIT_RULE":
        assert status_detail(claims, res, ps)[0].as_py() == (
            f"policy {p.id} has no basic-layer rule for visit_type maternity at facility_level primary, "
            f"locality national, referred false")
    fake = pa.table({"status": ["AMOUNT_OUT_OF_RANGE", "NO_BENEFIT_RULE"], "policy_id": [None, "pol-x"]})
    two = pa.Table.from_pylist([base, {**base, "claim_id": "X2"}], schema=engine.CLAIMS_SCHEMA)
    d = status_detail(two, fake).to_pylist()
    assert d[0] == (f"this claim would take the compliant total of person P1 ({p.region}, {p.scheme}, {p.year}) "
                    f"above 10^14 fen, the largest accumulated amount")
    assert d[1].startswith("policy pol-x has no basic-layer rule for visit_type maternity")


def test_all_ok_costs_one_comparison(ps):
    claims = generate_claims(ps, 500, seed=1)
    res = engine.settle(claims, ps).results
    assert status_detail(claims, res).null_count == 500


def test_with_detail_appends(ps, claims, settled):
    batch = settled.slice(0, 50).combine_chunks().to_batches()[0]
    out = with_detail(batch, claims.slice(0, 50), ps, ("person_id", "settle_time"))
    assert out.schema.names == [*engine.RESULTS_SCHEMA.names, "status_detail", "person_id", "settle_time"]
    assert out.column("person_id").equals(claims.slice(0, 50).column("person_id").combine_chunks())


def test_command_line_results(capsys, tmp_path, ps, claims, settled):
    src = tmp_path / "c.parquet"
    pq.write_table(claims, src, row_group_size=3000)
    out = tmp_path / "r.parquet"
    code = main(["settle", str(src), "-o", str(out), "--batch-size", "4000",
                 "--keep-columns", "person_id,region,settle_time,identities"])
    assert code == 0, capsys.readouterr().err
    got = pq.read_table(out)
    assert got.schema.names == [*engine.RESULTS_SCHEMA.names, "status_detail", "person_id", "region",
                                "settle_time", "identities"]
    assert got.select(engine.RESULTS_SCHEMA.names).equals(settled)
    assert got.column("status_detail").to_pylist() == status_detail(claims, settled, ps).to_pylist()
    for name in ("person_id", "region", "settle_time", "identities"):
        assert got.column(name).to_pylist() == claims.column(name).to_pylist(), name
    assert got.schema.field("region").type == pa.string()  # read dictionary-encoded, written as names


def test_keep_columns_errors(capsys, tmp_path, claims):
    src = tmp_path / "c.parquet"
    pq.write_table(claims.append_column("ward", pa.array(["A"] * claims.num_rows)), src)
    for cols, fragment in (("nope", "has no column 'nope'"), ("status", "already a results column"),
                           ("claim_id", "already a results column"), ("age,age", "given twice")):
        code = main(["settle", str(src), "-o", str(tmp_path / "r.parquet"), "--keep-columns", cols])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err, err
        assert not (tmp_path / "r.parquet").exists()
    # a column of the file outside the schema is carried too
    code = main(["settle", str(src), "-o", str(tmp_path / "r.arrow"), "--keep-columns", "ward"])
    assert code == 0, capsys.readouterr().err
    assert set(pa.ipc.open_file(tmp_path / "r.arrow").read_all().column("ward").to_pylist()) == {"A"}


def _same_as_reference(c, r, ps):
    for policies in (ps, None):
        got = status_detail(c, r, policies)
        want = detail_reference.status_detail(c, r, policies)
        assert got.type == want.type == pa.string()
        assert got.to_pylist() == want.to_pylist()


def _recolumn(table: pa.Table, name: str, arr) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, arr)


def test_sentences_from_every_layout_of_the_columns(ps, claims):
    """The C reads the Arrow buffers as they come: large_string, dictionaries with 8-bit and
    unsigned indices, large_list identities, several chunks, a slice with an offset (and a
    dictionary-encoded status sliced in a record batch); the sentences are the reference's."""
    c = _odd_claims(ps, claims).slice(0, 3000)
    r = _any_status(c, 5)
    large = c
    for name in ("claim_id", "person_id", "region", "scheme", "visit_type"):
        large = _recolumn(large, name, c.column(name).cast(pa.large_string()))
    large = _recolumn(large, "identities", c.column("identities").cast(pa.large_list(pa.large_string())))
    small_index = c
    for name, index_type in (("region", pa.int8()), ("scheme", pa.uint8()), ("locality", pa.uint16()),
                             ("visit_type", pa.int64())):
        d = pc.dictionary_encode(c.column(name)).combine_chunks()
        small_index = _recolumn(small_index, name, pa.DictionaryArray.from_arrays(
            pc.cast(d.indices, index_type), d.dictionary))
    chunked = pa.concat_tables([c.slice(0, 1000), c.slice(1000, 1), c.slice(1001)])
    r_chunked = pa.concat_tables([r.slice(0, 7), r.slice(7)])
    r_encoded = r.set_column(0, "status", pc.dictionary_encode(r.column("status")).combine_chunks())
    for claims_, results in ((large, r), (small_index, r), (chunked, r_chunked),
                             (c.slice(333, 1500), r.slice(333, 1500)), (c.slice(2999, 1), r.slice(2999, 1)),
                             (c.slice(5, 0), r.slice(5, 0)),
                             (c.slice(17, 2000), r_encoded.slice(17, 2000).to_batches()[0])):
        _same_as_reference(claims_, results, ps)


def test_non_ascii_values_are_copied_as_utf8(ps, claims):
    c = claims.slice(0, 600)
    n = c.num_rows
    c = _recolumn(c, "claim_id", pa.array([f"理赔-{i}-é" for i in range(n)]))
    c = _recolumn(c, "person_id", pa.array([f"参保人{i}" for i in range(n)]))
    region, scheme = c.column("region").to_pylist(), c.column("scheme").to_pylist()
    c = _recolumn(c, "region", pa.array(["北京市" if i % 3 else r for i, r in enumerate(region)]))
    c = _recolumn(c, "scheme", pa.array(["居民" if i % 4 == 0 else s for i, s in enumerate(scheme)]))
    c = _recolumn(c, "identities", pa.array([["退休", None, "🙂"] if i % 2 else [] for i in range(n)],
                                            pa.list_(pa.string())))
    r = _any_status(c, 9)
    _same_as_reference(c, r, ps)
    got = status_detail(c, pa.table({"status": ["DUPLICATE_CLAIM"] * n, "policy_id": [None] * n}), ps)
    assert got[1].as_py().startswith("claim_id 理赔-1-é came earlier")


def test_dates_at_every_edge_of_the_calendar(ps, claims):
    """The C's civil-from-days against datetime.date for days around leap years, century
    years, the epoch and the ends of years 1-9999; beyond those Arrow's writing (made in
    Python), a negative year included."""
    edges = [-719162, -719161, 2932895, 2932896, -1, 0, 1, 59, 60, 365, 10956, 11016, 11017, -25508, -25509,
             -135081, -135080, 2932897, 3000000, -719163, -800000]
    leap = [(dt.date(y, 2, 28) - dt.date(1970, 1, 1)).days + k for y in (1600, 1700, 1900, 2000, 2004, 2100, 9996)
            for k in range(3)]
    days = edges + leap + list(range(-719162, 2932897, 7919))
    n = len(days)
    c = claims.slice(0, n)
    micros = [d * 86_400_000_000 + (i % 5) * 3_600_000_000 for i, d in enumerate(days)]
    c = _recolumn(c, "settle_time", pa.array(micros, pa.int64()).cast(pa.timestamp("us")))
    r = pa.table({"status": ["UNKNOWN_POLICY"] * n, "policy_id": pa.array([None] * n, pa.string())})
    got = status_detail(c, r, ps).to_pylist()
    for d, text in zip(days, got):
        if -719162 <= d <= 2932896:
            assert f" on {(dt.date(1970, 1, 1) + dt.timedelta(days=d)).isoformat()} (" in text
    _same_as_reference(c, r, ps)
    years = pa.table({"status": ["UNKNOWN_IDENTITY"] * n, "policy_id": pa.array([None] * n, pa.string())})
    _same_as_reference(c, years, ps)


def test_null_and_unknown_statuses(ps, claims):
    c = claims.slice(0, 4)
    status = pa.array([None, "ok", "SOMETHING_NEW", None], pa.string())
    r = pa.table({"status": status, "policy_id": pa.array([None] * 4, pa.string())})
    assert status_detail(c, r, ps).to_pylist() == ["status null", None, "status SOMETHING_NEW", "status null"]
    encoded = pa.table({"status": pc.dictionary_encode(status), "policy_id": r.column("policy_id")})
    assert status_detail(c, encoded, ps).to_pylist() == ["status null", None, "status SOMETHING_NEW", "status null"]


def test_a_null_dictionary_entry_is_said_null(ps, claims):
    """A dictionary whose entry is null: the value is null in the sentence (not a missing field,
    the row itself being valid, as the Python sentences had it)."""
    c = claims.slice(0, 2)
    region = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array([None, "nowhere"]))
    c = _recolumn(c, "region", region)
    r = pa.table({"status": ["UNKNOWN_POLICY", "MISSING_FIELD"], "policy_id": pa.array([None] * 2, pa.string())})
    got = status_detail(c, r, ps).to_pylist()
    assert got[0].startswith("no policy for region null, scheme ")
    assert got[1] is None  # nothing null in the row: no sentence


def test_columns_shorter_than_the_results_raise(ps, claims):
    """A claim column shorter than the results is said (ValueError), never read past its end."""
    c = claims.slice(0, 10)
    for code in ("DUPLICATE_CLAIM", "INVALID_AMOUNT", "UNKNOWN_POLICY", "UNKNOWN_IDENTITY", "NO_BENEFIT_RULE"):
        r = pa.table({"status": [code] * 11, "policy_id": pa.array([None] * 11, pa.string())})
        with pytest.raises(ValueError, match="has 10 rows, the results 11"):
            status_detail(c, r, ps)
