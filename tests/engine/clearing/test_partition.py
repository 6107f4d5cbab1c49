"""The partition's per-row hashing (engine.clearing._buckets) and the year-wide duplicate search."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.clearing import _buckets, partition as part


def test_string_hashes_follow_the_bytes_not_the_buffer():
    ids = pa.array([f"C{i:09d}" for i in range(1000)] + ["", "é中"])
    h, valid = part.string_hashes(ids, _buckets.CLAIM_SEED)
    assert valid.all() and len(np.unique(h)) == len(h)
    # a slice (offset buffers), a chunked column, a large_string and a dictionary give the same
    assert (part.string_hashes(ids.slice(7, 20), 0)[0] == h[7:27]).all()
    assert (part.string_hashes(pa.chunked_array([ids.slice(0, 500), ids.slice(500)]), 0)[0] == h).all()
    assert (part.string_hashes(ids.cast(pa.large_string()), 0)[0] == h).all()
    assert (part.string_hashes(ids.dictionary_encode(), 0)[0] == h).all()
    # the person seed is another hash
    assert (part.string_hashes(ids, _buckets.PERSON_SEED)[0] != h).all()
    _, valid = part.string_hashes(pa.array(["a", None, "b"]), 0)
    assert valid.tolist() == [True, False, True]


def test_bucket_numbers_in_range_and_stable():
    persons = pa.array([f"P{i % 300:08d}" for i in range(3000)] + [None])
    b = part.bucket_numbers(persons, 7)
    assert b.dtype == np.uint16 and b.max() < 7 and len(np.unique(b[:-1])) == 7
    assert (b[:300] == b[300:600]).all()  # a person's rows share a bucket
    assert b[-1] == part.bucket_numbers(pa.array([""]), 7)[0]  # a null person: the empty string's


def test_in_set_equals_isin():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 1 << 63, 100_000, dtype=np.uint64)
    keys = np.unique(np.concatenate([values[rng.integers(0, len(values), 500)],
                                     rng.integers(0, 1 << 63, 500, dtype=np.uint64)]))
    assert (_buckets.in_set(values, keys) == np.isin(values, keys)).all()
    assert not _buckets.in_set(values, np.zeros(0, np.uint64)).any()


def test_cross_bucket_duplicates_compare_ids_exactly(tmp_path, monkeypatch):
    """Hashes only nominate: with a hash that collides on purpose (first character only), only
    ids that are equal are later duplicates, and only those outside their first row's bucket."""
    ids = ["A1", "A2", "A1", "B7", "B7", "A3", "B7"]
    buckets = np.array([0, 1, 1, 2, 2, 0, 3], dtype=np.uint16)
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(pa.table({"claim_id": ids[:4]}), files[0])
    pq.write_table(pa.table({"claim_id": ids[4:]}), files[1])
    starts = np.array([0, 4, 7])
    coarse = np.array([ord(s[0]) for s in ids], dtype=np.uint64) | np.uint64(1)
    forced = part.cross_bucket_duplicates(files, coarse, buckets, starts)
    # A1: first row 0 (bucket 0), row 2 in bucket 1 -> forced; A2, A3 collide with A1 but differ;
    # B7: first row 3 (bucket 2), row 4 in bucket 2 is left to the bucket's call, row 6 (bucket 3) forced
    assert forced.to_pylist() == [{"bucket": 1, "ord": 2}, {"bucket": 3, "ord": (1 << part.FILE_SHIFT) | 2}]


def test_partition_refuses_a_claims_file_without_a_column(tmp_path):
    pq.write_table(pa.table({"claim_id": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(part.ClearingError, match="c.parquet"):
        part.check_claims_files([tmp_path / "c.parquet"])


def test_repeated_hashes_by_slices_equal_one_sort():
    rng = np.random.default_rng(1)
    h = rng.integers(0, np.iinfo(np.uint64).max, 200_000, dtype=np.uint64, endpoint=True)
    h[::7] = 0  # not a claim id of the year
    h[5:100] = h[1000:1095]
    h[3] = h[4] = np.uint64(1 << 63)  # a slice's edge
    values, counts = np.unique(h[h != 0], return_counts=True)
    assert np.array_equal(np.sort(part.repeated_hashes(h)), values[counts > 1])
