"""The kernel's modules: the interner (exact ids for byte strings, whatever their length or
shared prefix), the bound tables and columns, the calendar and version lookup, the limits."""
import datetime as dt
import pickle

import numpy as np
import pyarrow as pa
import pytest

import engine
from engine import _columns, _kernel, schema
from engine import compile as comp
from engine._hashing import AccumulatorKeys, ClaimIds
from engine._tables import PolicyTables
from engine.arrow_io import PreparedClaims, string_buffers
from engine.compile import compile_policies
from engine.settle import Settler, _state_table

# around the key bytes kept in a slot (19, with the 4 bytes of policy: 15 of the id), the
# hash's 8-byte words, and the 255 cap of a slot's length byte
LENGTHS = [0, 1, 2, 7, 8, 9, 14, 15, 16, 18, 19, 20, 27, 31, 32, 33, 63, 64, 200, 250, 251, 252, 254, 255, 256,
           257, 300, 1000]


def _keys() -> list[str]:
    keys = []
    for n in LENGTHS:
        base = "k" * n
        keys.append(base)
        if n:
            keys.append(base[:-1] + "z")      # differs in the last byte only
            keys.append("z" + base[1:])       # differs in the first byte only
    return list(dict.fromkeys(keys))


def _intern(interner, keys, policy=None, claim_ids=False):
    """Claim ids through intern_ids, or accumulator keys (policy, key) through intern_keys."""
    arr = pa.array(keys, pa.string())
    offsets, data, _ = string_buffers(arr)
    out = np.empty(len(keys), np.int64)
    if claim_ids:
        interner.intern_ids(offsets, data, out)
    else:
        pol = np.zeros(len(keys), np.int32) if policy is None else np.asarray(policy, np.int32)
        interner.intern_keys(offsets, data, pol, out)
    return out


@pytest.mark.parametrize("policy_keys", [False, True])
def test_distinct_keys_get_dense_ids_in_first_seen_order(policy_keys):
    keys = _keys()
    assert len(set(keys)) == len(keys)
    it = (AccumulatorKeys() if policy_keys else ClaimIds())
    ids = _intern(it, keys, claim_ids=not policy_keys)
    assert ids.tolist() == list(range(len(keys)))
    assert len(it) == len(keys)
    # again, shuffled: every key finds its own id
    perm = np.random.default_rng(1).permutation(len(keys))
    again = _intern(it, [keys[i] for i in perm], claim_ids=not policy_keys)
    assert again.tolist() == perm.tolist()
    assert len(it) == len(keys)


@pytest.mark.parametrize("policy_keys", [False, True])
def test_ids_survive_table_growth(policy_keys):
    """Growth rehashes claim ids from the arena and keys from their slots' hashes."""
    keys = [f"P{i:09d}" for i in range(50_000)] + [f"{'x' * 40}{i}" for i in range(5_000)]
    it = (AccumulatorKeys() if policy_keys else ClaimIds())
    first = _intern(it, keys, claim_ids=not policy_keys)
    assert first.tolist() == list(range(len(keys)))
    assert _intern(it, keys[::-1], claim_ids=not policy_keys).tolist() == list(range(len(keys)))[::-1]


def test_policy_is_part_of_the_key():
    it = AccumulatorKeys()
    ids = _intern(it, ["p1", "p1", "p1", "p2"], policy=[0, 1, 0, -1])
    assert ids.tolist() == [0, 1, 0, -1]  # policy -1: no key


def test_each_table_takes_only_its_kind_of_key():
    """Two types over one arena: a claim-id table has no key interning and the reverse."""
    assert not hasattr(ClaimIds(), "intern_keys")
    assert not hasattr(AccumulatorKeys(), "intern_ids")
    ids, keys = ClaimIds(), AccumulatorKeys()
    _intern(ids, ["a", "b"], claim_ids=True)
    _intern(keys, ["a"])
    assert (len(ids), len(keys)) == (2, 1)
    assert ids.export()[1].tobytes() == b"ab" and keys.export()[1].tobytes() == b"\0\0\0\0a"


def test_check_rows_takes_the_two_tables_in_their_places():


    c = compile_policies(engine.load_policies(None))
    prep = PreparedClaims.from_rows([], c)
    status, slot = np.zeros(0, np.int8), np.zeros(0, np.int64)
    _kernel.check_rows(prep.columns, c.tables, ClaimIds(), AccumulatorKeys(), status, slot)
    with pytest.raises(TypeError):
        _kernel.check_rows(prep.columns, c.tables, AccumulatorKeys(), ClaimIds(), status, slot)


def test_reserve_then_intern_keeps_ids():
    """Reserving 600k keys moves the tables to huge-page-advised memory (> 8 MiB)."""
    it = AccumulatorKeys()
    a = _intern(it, ["a", "b", "c"])
    it.reserve(600_000, 1_000_000)
    b = _intern(it, ["c", "d", "a"])
    assert a.tolist() == [0, 1, 2] and b.tolist() == [2, 3, 0]
    starts, arena = it.export()
    assert starts.tolist()[:5] == [0, 5, 10, 15, 20]  # 4 bytes of policy, then the id
    assert bytes(arena[4:5]) == b"a" and bytes(arena[19:20]) == b"d"


def test_large_state_table_is_zeroed_and_keeps_rows_when_grown():

    t = _state_table(100_000, 26)  # 20.8 MB: the huge-page-advised path
    assert t.shape == (100_000, 26) and t.dtype == np.int64 and not t.any()
    t[-1, -1] = 7
    s = Settler(engine.load_policies(None))
    s._reserve(10)
    s._state[3, :] = np.arange(s._state.shape[1])
    s._reserve(200_000)
    assert s._state.shape[0] >= 200_000
    assert s._state[3].tolist() == list(range(s._state.shape[1]))
    assert not s._state[4:].any()


def test_match_encodings_agree_with_compile():
    """compile.py encodes absent match conditions so that the kernel's tests pass them;
    the two sides must use the same sentinels."""

    assert comp.MAX_AGE_ANY == _kernel.MAX_AGE_ANY
    assert comp.ANY_HOLDS == _kernel.ANY_HOLDS == -(1 << 63)
    assert comp.UNDECLARED_IDENTITY_BIT == 63  # the bit ANY_HOLDS reuses
    assert 150 < comp.MAX_AGE_ANY  # above any real max_age


def test_calendar_years_and_year_starts_match_the_calendar():
    """The kernel's calendar arithmetic against Python's, around year ends and before 1970."""

    epoch = dt.datetime(1970, 1, 1)
    years = np.array([2, 4, 99, 100, 400, 1600, 1899, 1900, 1969, 1970, 1999, 2000, 2016, 2020, 2024, 2100, 9998],
                     np.int64)
    starts = np.empty(len(years), np.int64)
    _columns.year_starts(years, starts)
    assert starts.tolist() == [(dt.datetime(int(y), 1, 1) - epoch) // dt.timedelta(microseconds=1) for y in years]
    micros = np.concatenate([starts - 1, starts, starts + 1,
                             np.random.default_rng(5).integers(starts[0], starts[-1], 20_000)])
    got = np.empty(len(micros), np.int32)
    _columns.calendar_years(micros, got)
    assert got.tolist() == [(epoch + dt.timedelta(microseconds=int(m))).year for m in micros]


def test_policy_rows_take_each_row_year_whatever_the_order():
    """The year of the row before is reused only while a row falls inside it."""
    table = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4)  # region x scheme x year (2019..2022)
    starts = np.empty(6, np.int64)
    _columns.year_starts(np.arange(2018, 2024, dtype=np.int64), starts)
    micros = np.array([starts[1], starts[2] - 1, starts[2], starts[0], starts[5], starts[4] + 5, starts[1] + 7,
                       starts[3]], np.int64)
    region = np.array([0, 1, 1, 0, 1, 0, -1, 1], np.int32)
    scheme = np.array([0, 2, 1, 0, 0, 2, 0, -2], np.int32)
    out, key = np.empty(len(micros), np.int32), np.empty(len(micros), np.int32)
    one = np.arange(24, dtype=np.int32)  # each year one version, in force from before the year
    lookup = _columns.PolicyLookup(table, 2019, one, np.ones(24, np.int32), np.full(24, -(1 << 62), np.int64), one)
    lookup.rows(region, scheme, micros, out, key)
    expected = [table[0, 0, 0], table[1, 2, 0], table[1, 1, 1], -1, -1, table[0, 2, 3], -1, -1]
    assert out.tolist() == expected and key.tolist() == expected


def test_policy_rows_take_the_version_in_force_on_the_settle_date():
    """Versions 5 (from Jan 1), 7 (from Mar 21) and 6 (from Mar 30) of one year, keyed under 5;
    a year whose only version starts in June: UNKNOWN_POLICY before it."""

    def micros(*ymd_hm):
        return (dt.datetime(*ymd_hm) - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)

    table = np.array([[[5, 8]]], np.int32)  # one region, one scheme, 2019 and 2020
    start = np.zeros(9, np.int32)
    count = np.zeros(9, np.int32)
    start[[5, 6, 7]], count[[5, 6, 7]] = 0, 3
    start[8], count[8] = 3, 1
    froms = np.array([micros(2019, 1, 1), micros(2019, 3, 21), micros(2019, 3, 30), micros(2020, 6, 1)], np.int64)
    lookup = _columns.PolicyLookup(table, 2019, start, count, froms, np.array([5, 7, 6, 8], np.int32))
    when = np.array([micros(2019, 3, 20, 23, 59), micros(2019, 3, 21), micros(2019, 3, 29, 12), micros(2019, 3, 30),
                     micros(2019, 12, 31, 23, 59), micros(2020, 5, 31, 23, 59), micros(2020, 6, 1), micros(2019, 1, 1)],
                    np.int64)
    out, key = np.empty(len(when), np.int32), np.empty(len(when), np.int32)
    lookup.rows(np.zeros(len(when), np.int32), np.zeros(len(when), np.int32), when, out, key)
    assert out.tolist() == [5, 7, 7, 6, 6, -1, 8, 5]
    assert key.tolist() == [5, 5, 5, 5, 5, -1, 8, 5]


def test_policy_tables_are_bound_once_and_survive_pickling():
    """compile builds the kernel's tables once; a process-pool worker gets them by pickle."""


    c = compile_policies(engine.load_policies(None))
    assert isinstance(c.tables, PolicyTables)
    again = pickle.loads(pickle.dumps(c.tables))
    assert all(np.array_equal(again.arrays[k], v) for k, v in c.tables.arrays.items())
    with pytest.raises(ValueError, match="C-contiguous"):
        PolicyTables(**{**c.tables.arrays, "candidate_rules": c.candidate_rules[::2]})


def test_claim_columns_refuse_a_column_of_another_width():

    c = compile_policies(engine.load_policies(None))
    prep = PreparedClaims.from_rows([], c)
    prep.total = np.zeros(0, np.int32)
    with pytest.raises(ValueError, match="'total'"):
        _kernel.ClaimColumns(prep)


def test_kernel_limits_are_the_schema_and_model_ones():
    """The C constants of the loop (engine/_kernel.pyx) against their one home in Python."""

    assert _kernel.MAX_AMOUNT_FEN == schema.MAX_AMOUNT
    assert _kernel.MAX_COMPLIANT_TOTAL_FEN == schema.MAX_CARRIED
    assert _kernel.MAX_COMBINED_CAP_FACTOR == schema.MAX_COMBINED_CAP_FACTOR


def test_time_bounds_against_a_scan():
    """time_bounds reads both validity bitmaps in place, eight rows at a time, at any bit offset
    (a sliced batch): the same rows as a scan of the present rows in (settle_time, claim_id) order."""
    from engine.arrow_io import string_data, validity_bits

    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.integers(0, 80))
        times = rng.integers(0, 6, n).tolist()  # few values: many ties broken by claim_id
        ids = [f"c{int(v)}" for v in rng.integers(0, 40, n)]
        null_rate = [0.0, 0.05, 0.5, 1.0][trial % 4]
        t_arr = pa.array([None if rng.random() < null_rate else v for v in times], pa.int64())
        c_arr = pa.array([None if rng.random() < null_rate else v for v in ids], pa.string())
        start = int(rng.integers(0, max(1, n)))
        t_arr, c_arr = t_arr.slice(start), c_arr.slice(start)
        values = np.frombuffer(t_arr.buffers()[1], dtype=np.int64, count=t_arr.offset + len(t_arr))[t_arr.offset:]
        offsets, data = string_data(c_arr)
        got = _kernel.time_bounds(values, *validity_bits(t_arr), offsets, data, *validity_bits(c_arr))
        present = [(t, c.encode(), i) for i, (t, c) in enumerate(zip(t_arr.to_pylist(), c_arr.to_pylist()))
                   if t is not None and c is not None]
        if not present:
            assert got == (-1, -1)
            continue
        def key(row):
            return int(values[row]), data[offsets[row]:offsets[row + 1]].tobytes()

        assert key(got[0]) == min(present)[:2] and key(got[1]) == max(present)[:2]
