"""engine/settle.py: a stream of chunks through `Settler.settle_batches` (kernel on a worker thread)."""
import pytest

import engine
from engine.generate import generate_claims


@pytest.fixture(scope="module")
def claims():
    ps = engine.load_policies()
    table = generate_claims(ps, 6000, seed=11, invalid_rate=0.03).combine_chunks()
    return ps, table.to_batches(max_chunksize=1000)


def test_stream_equals_chunk_after_chunk(claims):
    ps, batches = claims
    one_by_one = engine.Settler(ps, deltas=True)
    want = [one_by_one.settle_batch(b) for b in batches]
    piped = engine.Settler(ps, deltas=True)
    got = list(piped.settle_batches(iter(batches)))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.equals(w)
    assert piped.accumulators().equals(one_by_one.accumulators())


def test_stream_with_dictionary_results(claims):
    ps, batches = claims
    plain = list(engine.Settler(ps).settle_batches(batches))
    encoded = list(engine.Settler(ps).settle_batches(batches, dictionary=True))
    assert [b.to_pylist() for b in encoded] == [b.to_pylist() for b in plain]


def test_accumulators_as_dictionary_arrays(claims, tmp_path):
    """`accumulators(dictionary=True)`: the same table with region, scheme, layer and cap group
    as dictionaries of distinct names, which Parquet stores as dictionary pages and reads back
    as the plain strings of spec section 4."""
    import pyarrow.parquet as pq

    from engine.cli import write_table

    ps, batches = claims
    s = engine.Settler(ps)
    for b in batches:
        s.settle_batch(b)
    plain, encoded = s.accumulators(), s.accumulators(dictionary=True)
    assert encoded.schema.equals(engine.accumulators_schema(dictionary=True))
    assert encoded.cast(engine.ACCUMULATORS_SCHEMA).equals(plain)
    layers = encoded.column("layers").combine_chunks().values
    for name in ("layer", "cap_group"):
        values = layers.field(name).dictionary.to_pylist()
        assert len(values) == len(set(values)) and None not in values
    assert layers.field("cap_group").null_count > 0  # columns without a cap group
    path = tmp_path / "acc.parquet"
    write_table(encoded, path)
    assert pq.read_table(path).equals(plain)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["layers.list.element.layer"]
    assert "RLE_DICTIONARY" in encodings["region"]


def test_abandoned_stream_has_settled_one_chunk_ahead(claims):
    """Read-ahead: the chunk after the last result taken is already settled."""
    ps, batches = claims
    s = engine.Settler(ps)
    stream = s.settle_batches(iter(batches[:4]))
    first = next(stream)
    stream.close()  # waits for the chunk in flight
    want = engine.Settler(ps)
    assert first.equals(want.settle_batch(batches[0]))
    want.settle_batch(batches[1])
    assert s.accumulators().equals(want.accumulators())


def test_error_in_the_input_stops_the_stream(claims):
    ps, batches = claims

    def source():
        yield batches[0]
        yield batches[1]
        raise OSError("disk gone")

    s = engine.Settler(ps)
    taken = []
    with pytest.raises(OSError, match="disk gone"):
        for res in s.settle_batches(source()):
            taken.append(res)
    assert len(taken) == 1  # the second chunk was settled, its result never built
    bad = batches[2].drop_columns(["locality"])
    with pytest.raises(engine.ClaimsSchemaError, match="locality"):
        list(engine.Settler(ps).settle_batches([batches[0], bad]))


def test_expected_claims_reserves_the_accumulator_table(claims):
    """With the call's size known, the accumulator table is sized once and never copied to grow."""
    ps, batches = claims
    s = engine.Settler(ps, expected_claims=sum(b.num_rows for b in batches))
    table = s._state
    got = list(s.settle_batches(batches))
    assert s._state is table
    plain = engine.Settler(ps)
    want = list(plain.settle_batches(batches))
    assert len(plain._state) < len(table)  # grown by doubling to its keys
    assert all(g.equals(w) for g, w in zip(got, want))
    assert s.accumulators().equals(plain.accumulators())


def test_large_accumulator_tables_are_private_memory():
    """A shared anonymous mapping (mmap's default) is shmem and gets no transparent huge
    pages: the loop's random row reads then miss the TLB (10M claims settled at half speed)."""
    from pathlib import Path

    from engine._memory import HUGE_TABLE_BYTES
    from engine.settle import _state_table

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    table = _state_table(HUGE_TABLE_BYTES // 8, 8)  # 64 MiB
    table[-1, -1] = 1
    address = table.ctypes.data
    for line in maps.read_text().splitlines():
        span, perms = line.split()[:2]
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            assert perms.endswith("p"), line
            break
    else:
        raise AssertionError("the table's mapping is not in /proc/self/maps")
