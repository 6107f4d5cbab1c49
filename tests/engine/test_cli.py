"""The `medsettle` command line end to end (engine/cli/), through `main([...])`
in temporary folders: file formats in and out give the results of
`engine.settle` on the same table, the summary, accumulators out and in,
out-of-order files, `policies check`, `explain`, and errors as one
line on stderr with exit code 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import engine
from engine.cli import ClaimsFile, main, to_csv_table
from engine.generate import generate_claims

N = 6000
FUNDS = ("basic_pay", "supplementary_pay", "critical_illness_pay", "medical_aid_pay", "guarantee_pay")


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies(None)


@pytest.fixture(scope="module")
def claims(ps):
    return generate_claims(ps, N, seed=31, invalid_rate=0.05)


@pytest.fixture(scope="module")
def expected(ps, claims):
    return engine.settle(claims, ps)


@pytest.fixture(scope="module")
def files(tmp_path_factory, claims):
    d = tmp_path_factory.mktemp("claims")
    out = {}
    pq.write_table(claims, d / "claims.parquet", row_group_size=1000)
    out["parquet"] = d / "claims.parquet"
    with pa.ipc.new_file(d / "claims.arrow", claims.schema) as w:
        w.write_table(claims, max_chunksize=777)
    out["arrow"] = d / "claims.arrow"
    with pa.ipc.new_stream(d / "claims.ipc", claims.schema) as w:  # the stream format too
        w.write_table(claims, max_chunksize=1234)
    out["ipc"] = d / "claims.ipc"
    pcsv.write_csv(to_csv_table(claims), d / "claims.csv")
    out["csv"] = d / "claims.csv"
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _read_any(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix in (".arrow", ".feather", ".ipc"):
        return pa.ipc.open_file(path).read_all()
    raise AssertionError(path)


def spec(t: pa.Table) -> pa.Table:
    """The results' spec section 3 columns (the command line adds status_detail and kept columns)."""
    assert t.schema.names[:len(engine.RESULTS_SCHEMA)] == engine.RESULTS_SCHEMA.names
    assert "status_detail" in t.schema.names
    return t.select(engine.RESULTS_SCHEMA.names)


def assert_error(code, out, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medsettle: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# --------------------------------------------------------------------------- settle: formats


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "ipc", "csv"])
@pytest.mark.parametrize("out_ext", ["parquet", "arrow"])
def test_settle_formats_match_the_api(capsys, tmp_path, files, expected, fmt, out_ext):
    out = tmp_path / f"results.{out_ext}"
    code, stdout, err = run(capsys, "settle", files[fmt], "-o", out, "--batch-size", 1000)
    assert code == 0, err
    assert err == ""
    got = _read_any(out)
    assert spec(got).schema.equals(engine.RESULTS_SCHEMA)
    assert spec(got).equals(expected.results)
    if out_ext == "parquet":  # never-null columns are stored as required: no definition levels
        columns = pq.ParquetFile(out).metadata.schema
        levels = {columns.column(i).path: columns.column(i).max_definition_level for i in range(len(columns))}
        assert levels["basic_pay"] == levels["status"] == levels["cap_hit"] == 0
        assert levels["layer_pays.list.element.pay"] == 1  # the list may be empty
        assert levels["claim_id"] == levels["policy_id"] == 1
        # integers delta-packed, low-cardinality names dictionary-encoded, ids plain
        meta = pq.ParquetFile(out).metadata.row_group(0)
        encodings = {meta.column(i).path_in_schema: set(meta.column(i).encodings) for i in range(meta.num_columns)}
        assert "DELTA_BINARY_PACKED" in encodings["basic_pay"]
        assert "DELTA_BINARY_PACKED" in encodings["layer_pays.list.element.pay"]
        assert "RLE_DICTIONARY" in encodings["policy_id"] and "RLE_DICTIONARY" in encodings["layer_pays.list.element.layer"]
        assert "RLE_DICTIONARY" not in encodings["claim_id"] and "RLE_DICTIONARY" not in encodings["status_detail"]
        # min/max where a reader can prune row groups by them (ids, amounts), not on the names
        stats = {meta.column(i).path_in_schema: meta.column(i).is_stats_set for i in range(meta.num_columns)}
        assert stats["claim_id"] and stats["basic_pay"] and stats["layer_pays.list.element.pay"]
        assert not stats["status"] and not stats["policy_id"] and not stats["layer_pays.list.element.layer"]
        assert not stats["status_detail"]  # sentences: nothing to prune by


def test_csv_claims_round_trip(files, claims):
    back = ClaimsFile(files["csv"]).read_all()
    assert back.equals(claims)


def test_csv_results(capsys, tmp_path, files, expected):
    out = tmp_path / "results.csv"
    code, _, err = run(capsys, "settle", files["parquet"], "-o", out)
    assert code == 0, err
    got = pcsv.read_csv(out, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    want = expected.results
    assert got.column("claim_id").to_pylist() == want.column("claim_id").to_pylist()
    assert got.column("status").to_pylist() == want.column("status").to_pylist()
    for f in (*FUNDS, "fund_pay_total", "personal_pay"):
        assert got.column(f).to_pylist() == want.column(f).to_pylist()
    text = [";".join(f"{e['layer']}:{e['pay']}" for e in lp)
            for lp in want.column("layer_pays").to_pylist()]
    assert [t or "" for t in got.column("layer_pays").to_pylist()] == text
    assert any(";" in t for t in text)


def test_csv_identities_text(tmp_path, ps):
    """`identities` in CSV: `a;b`, empty = no identity, missing = null."""
    t = generate_claims(ps, 300, seed=2)
    path = tmp_path / "c.csv"
    pcsv.write_csv(to_csv_table(t), path)
    text = path.read_text()
    assert ";" in text or any(x for x in t.column("identities").to_pylist())
    assert ClaimsFile(path).read_all().column("identities").to_pylist() == t.column("identities").to_pylist()


def test_tail_sizes_halve_the_last_rows():
    from engine.cli import rebatch, tail_sizes

    assert list(tail_sizes(125_000, 1_000_000)) == [125_000] * 7 + [62_500, 31_250, 15_625, 15_625]
    assert list(tail_sizes(1000, 5000)) == [1000] * 5  # no batch under TAIL_MIN rows
    assert list(tail_sizes(125_000, 10_000)) == [10_000] and list(tail_sizes(125_000, 0)) == []
    for total in (1, 17, 40_000, 250_001, 1_000_003):
        sizes = list(tail_sizes(50_000, total))
        assert sum(sizes) == total and all(0 < s <= 50_000 for s in sizes)
    unknown = tail_sizes(50_000, None)
    assert [next(unknown) for _ in range(3)] == [50_000] * 3
    batch = pa.RecordBatch.from_pydict({"x": list(range(10))})
    assert [b.num_rows for b in rebatch([batch.slice(0, 3), batch.slice(3)], iter([4, 2]))] == [4, 2, 2, 2]


def test_batch_size_does_not_change_results(capsys, tmp_path, files, expected):
    for bs in (7, 999, 100_000):
        out = tmp_path / f"r{bs}.parquet"
        code, _, err = run(capsys, "settle", files["parquet"], "-o", out, "--batch-size", bs)
        assert code == 0, err
        assert spec(pq.read_table(out)).equals(expected.results)


# --------------------------------------------------------------------------- settle: summary


def test_progress_bar_on_request(capsys, tmp_path, files):
    code, out, err = run(capsys, "settle", files["parquet"], "-o", tmp_path / "r.parquet", "--progress",
                         "--batch-size", 1000)
    assert code == 0
    assert "settle [" in err and "100.0%" in err
    assert "claims 6,000" in out


# --------------------------------------------------------------------------- settle: order, accumulators


def test_unordered_file_is_settled_whole(capsys, tmp_path, claims, ps):
    shuffled = claims.take(pa.array(list(range(N))[::-1]))  # newest first
    path = tmp_path / "shuffled.parquet"
    pq.write_table(shuffled, path)
    out = tmp_path / "r.parquet"
    code, _, err = run(capsys, "settle", path, "-o", out, "--batch-size", 1000)
    assert code == 0
    assert "not in (settle_time, claim_id) order" in err and "whole file" in err
    assert spec(pq.read_table(out)).equals(engine.settle(shuffled, ps).results)


def test_late_disorder_restarts_whole_with_carry_in(capsys, tmp_path, ps):
    """Ordered for several batches, then one out of order: the streamed start is thrown
    away and the file settled whole, carried-in accumulators counted once."""
    clean = generate_claims(ps, N, seed=43)
    head, tail = clean.slice(0, 1000), clean.slice(1000)
    acc_in = tmp_path / "acc_in.parquet"
    pq.write_table(engine.settle(head, ps).accumulators, acc_in)
    idx = list(range(len(tail)))
    idx[3500:4000], idx[500:1000] = idx[500:1000], idx[3500:4000]  # batch 1 jumps ahead; batch 2 is then behind
    late = tail.take(pa.array(idx))
    path, out, acc_out = tmp_path / "late.parquet", tmp_path / "r.parquet", tmp_path / "acc_out.parquet"
    pq.write_table(late, path)
    code, _, err = run(capsys, "settle", path, "-o", out, "--batch-size", 500,
                       "--accumulators-in", acc_in, "--accumulators-out", acc_out)
    assert code == 0 and "whole file" in err
    whole = engine.settle(late, ps, engine.settle(head, ps).accumulators)
    assert spec(pq.read_table(out)).equals(whole.results)
    key = [("person_id", "ascending"), ("region", "ascending"), ("scheme", "ascending"), ("year", "ascending")]
    assert pq.read_table(acc_out).sort_by(key).equals(whole.accumulators.sort_by(key))


def test_batch_bounds_follow_the_spec_order(claims):
    """(settle_time, claim_id bytes) as the spec orders claims, rows with a null in either left out."""
    from engine.cli import batch_bounds

    batch = claims.combine_chunks().to_batches()[0]
    ties = batch.slice(0, 50).set_column(4, "settle_time", pa.array([7] * 50, pa.int64()).cast(pa.timestamp("us")))
    # nulls in either column at rows of their own, read off the bitmaps at an offset not a multiple of 8
    n = batch.num_rows
    holes = batch.set_column(4, "settle_time", pa.array(
        [None if i % 7 == 0 else v for i, v in enumerate(batch.column(4).cast(pa.int64()).to_pylist())],
        pa.int64()).cast(pa.timestamp("us")))
    holes = holes.set_column(0, "claim_id", pa.array([None if i % 5 == 0 else v
                                                      for i, v in enumerate(batch.column(0).to_pylist())], pa.string()))
    assert holes.column(4).null_count > n // 8 and holes.column(0).null_count > n // 6
    for b in (batch, batch.slice(3, 1001), ties, ties.slice(5), holes, holes.slice(3), holes.slice(13, 500)):
        rows = [(r["settle_time"], r["claim_id"]) for r in b.select(["settle_time", "claim_id"]).to_pylist()]
        keyed = [(int(pa.scalar(t, pa.timestamp("us")).cast(pa.int64()).as_py()), c.encode())
                 for t, c in rows if t is not None and c is not None]
        assert batch_bounds(b) == (min(keyed), max(keyed))
    nulls = batch.slice(0, 3).set_column(0, "claim_id", pa.nulls(3, pa.string()))
    assert batch_bounds(nulls) is None and batch_bounds(batch.slice(0, 0)) is None


def test_order_within_a_batch_is_free(capsys, tmp_path, claims, ps):
    """Rows out of order inside one batch only: streamed, same results as one call."""
    idx = []
    for start in range(0, N, 1000):
        idx.extend(reversed(range(start, min(start + 1000, N))))
    mixed = claims.take(pa.array(idx))
    path = tmp_path / "mixed.parquet"
    pq.write_table(mixed, path)
    out = tmp_path / "r.parquet"
    code, _, err = run(capsys, "settle", path, "-o", out, "--batch-size", 1000)
    assert code == 0 and err == ""
    assert spec(pq.read_table(out)).equals(engine.settle(mixed, ps).results)


def test_accumulators_out_then_in(capsys, tmp_path, ps):
    clean = generate_claims(ps, N, seed=41)  # no duplicates: carried accumulators hold no claim ids
    half = N // 2
    first, second = tmp_path / "a.parquet", tmp_path / "b.arrow"
    pq.write_table(clean.slice(0, half), first)
    with pa.ipc.new_file(second, clean.schema) as w:
        w.write_table(clean.slice(half))
    acc = tmp_path / "acc.parquet"
    code, _, err = run(capsys, "settle", first, "-o", tmp_path / "r1.parquet", "--accumulators-out", acc)
    assert code == 0, err
    acc2 = tmp_path / "acc2.arrow"
    code, _, err = run(capsys, "settle", second, "-o", tmp_path / "r2.parquet", "--accumulators-in", acc,
                       "--accumulators-out", acc2)
    assert code == 0, err
    whole = engine.settle(clean, ps)
    got = pa.concat_tables([pq.read_table(tmp_path / "r1.parquet"), pq.read_table(tmp_path / "r2.parquet")])
    assert spec(got).equals(whole.results)
    closing = pa.ipc.open_file(acc2).read_all()
    key = ["person_id", "region", "scheme", "year"]
    assert closing.sort_by([(k, "ascending") for k in key]).equals(
        whole.accumulators.sort_by([(k, "ascending") for k in key]))


# --------------------------------------------------------------------------- generate


def test_generate_command(capsys, tmp_path, ps):
    out, persons = tmp_path / "g.parquet", tmp_path / "persons.parquet"
    code, stdout, err = run(capsys, "generate", "-o", out, "--claims", 2500, "--seed", 9,
                            "--invalid-rate", 0.1, "--persons", persons, "--block", 1000)
    assert code == 0, err
    assert pq.read_table(out).equals(generate_claims(ps, 2500, seed=9, invalid_rate=0.1))
    assert pq.ParquetFile(out).metadata.num_row_groups == 3
    reg = pq.read_table(persons)
    assert set(pq.read_table(out).column("person_id").drop_null().to_pylist()) <= set(
        reg.column("person_id").to_pylist())
    assert "claims: 2500" in stdout and "persons: " in stdout


def _codecs(path: Path) -> set[str]:
    meta = pq.ParquetFile(path).metadata
    return {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)}


def test_parquet_compression(capsys, tmp_path, files, expected):
    """LZ4 by default on every Parquet file written; --compression for readers that lack it."""
    gen = tmp_path / "g.parquet"
    assert run(capsys, "generate", "-o", gen, "--claims", 500, "--seed", 3)[0] == 0
    assert _codecs(gen) == {"LZ4"}  # Arrow writes it as Parquet's LZ4_RAW codec
    for codec, name in ((None, "LZ4"), ("snappy", "SNAPPY"), ("zstd", "ZSTD"), ("none", "UNCOMPRESSED")):
        out, acc = tmp_path / f"r-{codec}.parquet", tmp_path / f"a-{codec}.parquet"
        argv = ["settle", files["parquet"], "-o", out, "--accumulators-out", acc]
        code, _, err = run(capsys, *argv, *(["--compression", codec] if codec else []))
        assert code == 0, err
        assert _codecs(out) == _codecs(acc) == {name}
        assert spec(pq.read_table(out)).equals(expected.results)
        assert pq.read_table(acc).equals(expected.accumulators)
    code, _, err = run(capsys, "settle", files["parquet"], "-o", tmp_path / "x.parquet", "--compression", "gzip")
    assert code == 2 and "argument --compression: invalid choice: 'gzip'" in err


def test_generate_with_policy_folder_and_year(capsys, tmp_path):
    src = engine.default_policies_path()
    folder = tmp_path / "pol"
    folder.mkdir()
    one = sorted(src.glob("*.yaml"))[0]
    shutil.copy(one, folder)
    p = engine.load_policies(folder).policies[0]
    out = tmp_path / "g.csv"
    code, _, err = run(capsys, "generate", "-o", out, "--claims", 500, "--seed", 1, "--policies", folder,
                       "--year", p.year)
    assert code == 0, err
    t = ClaimsFile(out).read_all()
    assert set(t.column("region").to_pylist()) == {p.region}
    code, _, err = run(capsys, "generate", "-o", out, "--claims", 5, "--seed", 1, "--policies", folder,
                       "--year", 1900)
    assert_error(code, "", err, "year 1900")


def test_generate_argument_errors(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "-o", tmp_path / "x.parquet", "--claims", -5, "--seed", 1)
    assert code == 2 and "Traceback" not in err
    code, _, err = run(capsys, "generate", "-o", tmp_path / "x.parquet", "--claims", 5, "--seed", 1,
                       "--invalid-rate", 2)
    assert code == 2 and "Traceback" not in err
    code, _, err = run(capsys, "generate", "-o", tmp_path / "x.txt", "--claims", 5, "--seed", 1)
    assert_error(code, "", err, "x.txt", "unknown file type")


# --------------------------------------------------------------------------- policies check


def test_policies_check_bundled(capsys, ps):
    code, out, err = run(capsys, "policies", "check")
    assert code == 0, err
    for p in ps.policies:
        line = next(l for l in out.splitlines() if l.startswith(p.id + " "))
        assert p.region in line and p.scheme in line and str(p.year) in line
        for layer in p.layers:
            assert layer.name in line
        assert str(sum(len(l.rules) for l in p.layers)) in line
        for name in p.identities:
            assert name in line
    assert f"{len(ps.policies)} policies OK" in out or f"{len(ps.policies)} policy OK" in out


def test_policies_check_lists_effective_from(capsys, ps):
    """Each policy's line carries its effective_from; a year's versions (Tibet 2019: January 1,
    March 21, March 30) are listed in the order they come into force."""
    code, out, err = run(capsys, "policies", "check")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["id", "region", "scheme", "year", "effective_from"]
    for p in ps.policies:
        assert next(l for l in lines if l.startswith(p.id + " ")).split()[4] == p.effective_from.isoformat()
    tibet = [l.split()[4] for l in lines if l.startswith("tibet-resident-2019")]
    assert tibet == ["2019-01-01", "2019-03-21", "2019-03-30"]


def test_policies_check_folder_and_error(capsys, tmp_path):
    folder = tmp_path / "pol"
    folder.mkdir()
    src = sorted(engine.default_policies_path().glob("*.yaml"))[0]
    shutil.copy(src, folder)
    code, out, err = run(capsys, "policies", "check", folder)
    assert code == 0, err
    assert "1 policy OK" in out
    bad = folder / "zz-bad.yaml"
    bad.write_text(src.read_text() + "\nunknown_key: 1\n")
    code, out, err = run(capsys, "policies", "check", folder)
    assert_error(code, out, err, "zz-bad.yaml", "unknown_key")
    code, out, err = run(capsys, "policies", "check", tmp_path / "missing")
    assert_error(code, out, err, "missing")


# --------------------------------------------------------------------------- explain


def test_explain(capsys, files, expected, claims):
    res = expected.results
    ok_inpatient = [r["claim_id"] for r, c in zip(res.to_pylist(), claims.to_pylist())
                    if r["status"] == "ok" and c["visit_type"] == "inpatient" and r["deductible_applied"] > 0]
    cid = ok_inpatient[len(ok_inpatient) // 2]
    for fmt in ("parquet", "csv"):
        code, out, err = run(capsys, "explain", files[fmt], "--claim-id", cid)
        assert code == 0, err
        assert cid in out
        assert "layer" in out and "deductible" in out
    # The same text as the API on the whole table.
    want = engine.format_explanation(engine.explain(claims, engine.load_policies(None), cid))
    assert out.strip() == want.strip()


def test_explain_error_rows_and_unknown_id(capsys, files, expected):
    bad = next(r["claim_id"] for r in expected.results.to_pylist()
               if r["status"] not in ("ok", "MISSING_FIELD", "DUPLICATE_CLAIM") and r["claim_id"])
    code, out, err = run(capsys, "explain", files["parquet"], "--claim-id", bad)
    assert code == 0, err
    assert bad in out
    code, out, err = run(capsys, "explain", files["parquet"], "--claim-id", "no-such-claim")
    assert_error(code, out, err, "no-such-claim")


# --------------------------------------------------------------------------- errors


def test_missing_claims_file(capsys, tmp_path):
    code, out, err = run(capsys, "settle", tmp_path / "nope.parquet", "-o", tmp_path / "r.parquet")
    assert_error(code, out, err, "nope.parquet", "no such file")
    assert not (tmp_path / "r.parquet").exists()


def test_schema_error_names_the_column(capsys, tmp_path, claims):
    path = tmp_path / "c.parquet"
    pq.write_table(claims.drop_columns(["locality"]), path)
    code, out, err = run(capsys, "settle", path, "-o", tmp_path / "r.parquet")
    assert_error(code, out, err, "locality")
    assert not (tmp_path / "r.parquet").exists()
    path2 = tmp_path / "c2.parquet"
    pq.write_table(claims.set_column(claims.schema.get_field_index("age"), "age",
                                     claims.column("age").cast(pa.int32())), path2)
    code, out, err = run(capsys, "settle", path2, "-o", tmp_path / "r.parquet")
    assert_error(code, out, err, "age")


def test_bad_policy_folder(capsys, tmp_path, files):
    folder = tmp_path / "pol"
    folder.mkdir()
    (folder / "broken.yaml").write_text("id: x\nregion: '1'\n")
    code, out, err = run(capsys, "settle", files["parquet"], "-o", tmp_path / "r.parquet", "--policies", folder)
    assert_error(code, out, err, "broken.yaml")


def test_bad_accumulators(capsys, tmp_path, files):
    acc = tmp_path / "acc.csv"
    acc.write_text("person_id\n")
    code, out, err = run(capsys, "settle", files["parquet"], "-o", tmp_path / "r.parquet",
                         "--accumulators-in", acc)
    assert_error(code, out, err, "acc.csv")
    acc = tmp_path / "acc.parquet"
    pq.write_table(pa.table({"person_id": ["p"]}), acc)
    code, out, err = run(capsys, "settle", files["parquet"], "-o", tmp_path / "r.parquet",
                         "--accumulators-in", acc)
    assert_error(code, out, err, "accumulators")


def test_corrupt_file(capsys, tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"not a parquet file at all")
    code, out, err = run(capsys, "settle", path, "-o", tmp_path / "r.parquet")
    assert_error(code, out, err)


def test_usage_errors(capsys):
    code, _, err = run(capsys, "settle")
    assert code == 2 and "usage" in err
    code, _, _ = run(capsys, "--help")
    assert code == 0
    code, _, err = run(capsys)
    assert code == 2


def test_representation_differences_are_cast(capsys, tmp_path, claims, expected):
    """Large strings / lists and a nanosecond timestamp (pandas, polars) read as the schema's types."""
    cols = {}
    for f in claims.schema:
        c = claims.column(f.name)
        if f.name in ("claim_id", "person_id", "visit_type"):
            c = c.cast(pa.large_string())
        elif f.name == "identities":
            c = c.cast(pa.large_list(pa.large_string()))
        elif f.name == "settle_time":
            c = c.cast(pa.timestamp("ns"))
        cols[f.name] = c
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table(cols), path)
    out = tmp_path / "r.parquet"
    code, _, err = run(capsys, "settle", path, "-o", out)
    assert code == 0, err
    assert spec(pq.read_table(out)).equals(expected.results)


def test_time_zone_aware_settle_time_is_a_schema_error(capsys, tmp_path, claims):
    i = claims.schema.get_field_index("settle_time")
    t = claims.set_column(i, "settle_time", claims.column(i).cast(pa.timestamp("us", tz="Asia/Shanghai")))
    path = tmp_path / "c.parquet"
    pq.write_table(t, path)
    code, out, err = run(capsys, "settle", path, "-o", tmp_path / "r.parquet")
    assert_error(code, out, err, "settle_time")


def test_generate_label_then_settle(capsys, tmp_path):
    out = tmp_path / "g.csv"
    code, _, err = run(capsys, "generate", "-o", out, "--claims", 3000, "--seed", 4, "--invalid-rate", 0.2,
                       "--label")
    assert code == 0, err
    res = tmp_path / "r.parquet"
    code, _, err = run(capsys, "settle", out, "-o", res)
    assert code == 0, err
    want = pcsv.read_csv(out).column("expected_status").to_pylist()
    assert pq.read_table(res).column("status").to_pylist() == want
