"""`status_detail`: one sentence per error row naming the field and the values.

A result row carries only its status code; an office reading a results file
alone needs to know which field and which amounts made a claim fail, without a
join back to the claims. The sentence is rebuilt from the claim's columns and
its status (spec section 7, in precedence order: the check that failed is the
first one that the claim fails for its status), for the error rows only (1 %
of the README's job). This module finds those rows and their codes and hands
the C (engine/_detail.pyx) the Arrow buffers of the columns the present codes
read, a bounded number of calls per batch whatever its rows; one C call then
writes every sentence of the batch into one buffer, from which the string
array is built. Formatting them in Python, one f-string per error row, cost
23 ms CPU per 1M claims (10k error rows); the C takes 3.5-4.3 ms
(docs/DECISIONS.md). A file of valid claims costs one comparison.
"""
from __future__ import annotations

import datetime
import functools
import weakref
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _detail
from .model import PolicySet
from .schema import (AMOUNT_COLUMNS, FACILITY_LEVELS, LOCALITIES, REQUIRED_COLUMNS, SCHEMES, STATUS_DETAIL,
                     STATUSES, VISIT_TYPES)


_ENUMS = (("scheme", SCHEMES), ("visit_type", VISIT_TYPES), ("facility_level", FACILITY_LEVELS),
          ("locality", LOCALITIES))


def _text(arr) -> pa.Array:
    """Any column as strings, null as 'null' (dictionary-encoded names included)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return arr.fill_null("null")


def _join(*parts, sep: str = "") -> pa.Array:
    """Element-wise concatenation of arrays and str scalars (a null part drops the row's text)."""
    return pc.binary_join_element_wise(*[p if isinstance(p, pa.Array) else pa.scalar(p) for p in parts], sep)


@functools.lru_cache(maxsize=4096)
def _date(day: int, typ: pa.DataType) -> tuple[str, int]:
    """A day since 1970-01-01 as pc.strftime's '%Y-%m-%d' writes it, and its year. The C
    writes the days of years 1-9999 itself (as datetime.date does, checked against this);
    one outside them is made here, as Arrow writes it, when a sentence needs it."""
    try:
        date = _EPOCH + datetime.timedelta(days=day)
    except OverflowError:  # outside years 1-9999: as Arrow writes it
        at = pa.array([day * _DAY_US], pa.int64()).cast(typ)
        return pc.strftime(at, "%Y-%m-%d")[0].as_py(), pc.year(at)[0].as_py()
    return date.isoformat(), date.year


_EPOCH = datetime.date(1970, 1, 1)
_DAY_US = 86_400_000_000


def _table(texts: list[bytes]) -> tuple[np.ndarray, bytes]:
    """Byte strings as int64 offsets and their bytes, the small tables the C reads."""
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    return offsets, b"".join(texts)


_SLOT = {name: i for i, name in enumerate(_detail.COLUMNS)}
assert _detail.COLUMNS[:len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS and _detail.COLUMNS[8:14] == AMOUNT_COLUMNS
_VOCABULARY = _detail.Vocabulary([(_SLOT[name], [v.encode() for v in values]) for name, values in _ENUMS])
#: The columns each status's sentence reads: only those of the codes present are handed over.
_READS = {
    "MISSING_FIELD": REQUIRED_COLUMNS,
    "INVALID_VALUE": tuple(name for name, _ in _ENUMS),
    "INVALID_AMOUNT": AMOUNT_COLUMNS,
    "AMOUNT_OUT_OF_RANGE": (*AMOUNT_COLUMNS, "person_id", "region", "scheme", "settle_time"),
    "AMOUNT_MISMATCH": AMOUNT_COLUMNS,
    "UNKNOWN_POLICY": ("region", "scheme", "settle_time"),
    "UNKNOWN_IDENTITY": ("identities", "region", "scheme", "settle_time"),
    "DUPLICATE_CLAIM": ("claim_id",),
    "NO_BENEFIT_RULE": ("visit_type", "facility_level", "locality", "referred", "region", "scheme", "settle_time"),
}
_INTS = frozenset(["settle_time", *AMOUNT_COLUMNS])


def _strings(arr: pa.Array) -> pa.Array:
    """A text column as string or large_string, or a dictionary of those, as it comes; any
    other type cast to string (as Arrow's cast writes a value, which is what str wrote)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        if not (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
            return pc.cast(arr.dictionary_decode(), pa.string())
        if pa.types.is_unsigned_integer(t.index_type):  # the C reads signed indices
            return pa.DictionaryArray.from_arrays(pc.cast(arr.indices, pa.int64()), arr.dictionary)
        return arr
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr
    return pc.cast(arr, pa.string())


def _give_text(columns: _detail.Columns, slot: int, arr: pa.Array) -> None:
    arr = _strings(arr)
    n = len(arr)
    buffers = arr.buffers()  # a dictionary array's: its indices'
    columns.validity(slot, buffers[0], arr.offset, n)
    if pa.types.is_dictionary(arr.type):
        columns.indices(slot, buffers[1], arr.offset, arr.type.index_type.bit_width // 8)
        entries = arr.dictionary
        e = entries.buffers()
        columns.strings(slot, e[1], entries.offset, pa.types.is_large_string(entries.type), e[2], len(entries))
        columns.entry_validity(slot, e[0], entries.offset, len(entries))
    else:
        columns.strings(slot, buffers[1], arr.offset, pa.types.is_large_string(arr.type), buffers[2], n)


def _give(columns: _detail.Columns, name: str, arr) -> None:
    """Hand column `name`'s Arrow buffers to the C (no copy for the schema's types)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    slot = _SLOT[name]
    if name in _INTS:
        if not (pa.types.is_int64(arr.type) or pa.types.is_timestamp(arr.type)):
            arr = pc.cast(arr, pa.int64())
        buffers = arr.buffers()
        columns.validity(slot, buffers[0], arr.offset, len(arr))
        columns.ints(slot, buffers[1], arr.offset)
    elif name == "referred":
        if not pa.types.is_boolean(arr.type):
            arr = pc.cast(arr, pa.bool_())
        buffers = arr.buffers()
        columns.validity(slot, buffers[0], arr.offset, len(arr))
        columns.bools(slot, buffers[1], arr.offset)
    elif name == "identities":
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            arr = pc.cast(arr, pa.list_(pa.string()))
        buffers = arr.buffers()
        items = arr.values  # all of the child, its list offsets index into
        columns.validity(slot, buffers[0], arr.offset, len(arr))
        columns.lists(slot, buffers[1], arr.offset, pa.types.is_large_list(arr.type), len(items))
        _give_text(columns, _SLOT["identities.item"], items)
    else:
        _give_text(columns, slot, arr)


_PLACES: dict[int, tuple] = {}


def _places(policies: Optional[PolicySet]) -> Optional[_detail.Places]:
    """The C's tables of a policy set (made once per set, kept while it lives)."""
    if policies is None or not policies.policies:
        return None
    key = id(policies)
    got = _PLACES.get(key)
    if got is not None and got[0]() is policies:
        return got[1]
    places = _make_places(policies)
    _PLACES[key] = (weakref.ref(policies, lambda _, key=key: _PLACES.pop(key, None)), places)
    return places


def _make_places(policies: PolicySet) -> _detail.Places:
    """`_versions_table` as arrays: (region, scheme, year) -> a group on a grid, each group its
    first version and its later ones (day they start, index); per policy its id and the
    identities its year declares (', '-joined, 'none' when none)."""
    table = {k: v for k, v in _versions_table(policies).items()
             if isinstance(k[0], str) and isinstance(k[1], str) and isinstance(k[2], int)}
    regions = sorted({k[0] for k in table})
    schemes = sorted({k[1] for k in table})
    years = [k[2] for k in table] or [0]
    first_year = min(years)
    grid = np.full((len(regions), len(schemes), max(years) - first_year + 1), -1, dtype=np.int32)
    first, later_start, later_count, later_day, later_index = [], [], [], [], []
    region_code = {r: i for i, r in enumerate(regions)}
    scheme_code = {s: i for i, s in enumerate(schemes)}
    for g, ((region, scheme, year), (which, later)) in enumerate(table.items()):
        grid[region_code[region], scheme_code[scheme], year - first_year] = g
        first.append(which)
        later_start.append(len(later_day))
        later_count.append(len(later))
        for start, index in later:
            later_day.append(start)
            later_index.append(index)
    declared = [(", ".join(policies.year_identities(p.region, p.scheme, p.year)) or "none").encode()
                for p in policies.policies]
    ids = [("null" if p.id is None else str(p.id)).encode() for p in policies.policies]
    return _detail.Places(*_table([r.encode() for r in regions]), *_table([s.encode() for s in schemes]), grid,
                          first_year, np.asarray(first, np.int32), np.asarray(later_start, np.int32),
                          np.asarray(later_count, np.int32), np.asarray(later_day, np.int64),
                          np.asarray(later_index, np.int32), *_table(declared), *_table(ids))


_NO_ODD = (np.zeros(0, np.int64), np.zeros(1, np.int64), b"", np.zeros(0, np.int64))


def _odd_dates(odd: tuple, days: np.ndarray, typ: pa.DataType) -> tuple:
    """The table of dates outside years 1-9999 with `days` added (made by `_date`, as Arrow
    writes them): (days ascending, text offsets, text bytes, years)."""
    known = dict(zip(odd[0].tolist(), zip((odd[2][a:b].decode() for a, b in zip(odd[1][:-1].tolist(),
                                                                                odd[1][1:].tolist())),
                                           odd[3].tolist())))
    for day in np.unique(days).tolist():
        known[day] = _date(day, typ)
    order = sorted(known)
    offsets, data = _table([known[d][0].encode() for d in order])
    return (np.asarray(order, np.int64), offsets, data,
            np.asarray([known[d][1] for d in order], np.int64))


def policy_rows(c: pa.Table, policies: Optional[PolicySet]) -> Optional[pa.Array]:
    """Per row, the index in `policies` of the version of its (region, scheme, settle_time's year)
    in force on its settle date; the year's first version for a date before it (spec section 5)."""
    if policies is None or not policies.policies:
        return None
    index = {id(p): i for i, p in enumerate(policies.policies)}
    firsts = {}
    for p in policies.policies:
        firsts.setdefault((p.region, p.scheme, p.year), policies.versions(p.region, p.scheme, p.year))
    keys = pa.array([f"{r}|{s}|{y}" for r, s, y in firsts], pa.string())
    first_index = pa.array([index[id(v[0])] for v in firsts.values()], pa.int32())
    mine = _join(_text(c.column("region")), "|", _text(c.column("scheme")), "|",
                 _text(pc.year(c.column("settle_time"))))
    group = pc.index_in(mine, value_set=keys)
    which = first_index.take(group)
    versioned = [(g, v) for g, v in enumerate(firsts.values()) if len(v) > 1]
    if not versioned or not len(c):
        return which
    # a year with several versions: the latest one that starts on or before the row's date
    out = np.asarray(which.fill_null(-1), dtype=np.int64).copy()
    groups = np.asarray(group.fill_null(-1), dtype=np.int64)
    day = np.asarray(pc.cast(c.column("settle_time"), pa.date32()).cast(pa.int32()).fill_null(0), dtype=np.int64)
    for g, versions in versioned:
        rows = groups == g
        for v in versions[1:]:
            start = (v.effective_from - datetime.date(1970, 1, 1)).days
            out[rows & (day >= start)] = index[id(v)]
    return pa.array(out, pa.int32(), mask=out < 0)


def _versions_table(policies: PolicySet) -> dict:
    """(region, scheme, year) -> (index of the year's first version, [(day it starts, index)] of
    the later ones), indices into policies.policies, as policy_rows reads them."""
    index = {id(p): i for i, p in enumerate(policies.policies)}
    table: dict = {}
    for p in policies.policies:
        key = (p.region, p.scheme, p.year)
        if key not in table:
            versions = policies.versions(*key)
            table[key] = (index[id(versions[0])], [((w.effective_from - _EPOCH).days, index[id(w)])
                                                   for w in versions[1:]])
    return table


PLACE_COLUMNS = ("region", "scheme", "settle_time")  # what policy_rows reads
_STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}


def _error_rows(status) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The rows whose status is not ok, and per such row a code into the returned names
    (STATUSES first): off a dictionary array's indices through its few entries (one C pass
    over the indices), else the array is dictionary-encoded first."""
    if not pa.types.is_dictionary(status.type):
        status = status.dictionary_encode()
    names = list(STATUSES)
    remap = []
    for name in status.dictionary.cast(pa.string()).to_pylist():
        if name not in _STATUS_CODE and name not in names:
            names.append(name)
        remap.append(names.index(name))
    remap.append(len(names))  # a null status: not ok, said as "status null"
    names.append("null")
    indices = status.indices
    if pa.types.is_unsigned_integer(indices.type):  # the C reads signed indices
        indices = pc.cast(indices, pa.int64())
    buffers = indices.buffers()
    rows, kinds = _detail.error_rows(buffers[1], indices.offset, indices.type.bit_width // 8, buffers[0],
                                     indices.offset, len(indices), np.asarray(remap, dtype=np.int64),
                                     _STATUS_CODE["ok"])
    return rows, kinds, names


@functools.lru_cache(maxsize=64)
def _status_texts(names: tuple) -> tuple[np.ndarray, bytes]:
    """Per status code, 'status NAME' for a code past STATUSES (a status this module does not
    know, from a newer kernel, or null): said so rather than nothing."""
    return _table([b"" if i < len(STATUSES) else f"status {name}".encode() for i, name in enumerate(names)])


def status_detail(claims, results, policies: Optional[PolicySet] = None) -> pa.Array:
    """A string array, one per row: null where the status is ok, else one sentence naming the
    field and the values that failed (`claims` and `results` row-aligned, as `engine.settle`
    gives them; `policies` adds the declared identities to UNKNOWN_IDENTITY).

    Its cost follows the error rows: they are found from the status codes (one pass over
    small integers), the buffers of the columns the present codes read are handed to the C
    (a few calls per column, whatever the rows), and one C call writes every sentence;
    a batch of valid claims costs that one pass."""
    status = results.column("status")
    if isinstance(status, pa.ChunkedArray):
        status = status.combine_chunks()
    n = len(status)
    rows, kinds, names = _error_rows(status)
    if not len(rows):
        return pa.nulls(n, pa.string())
    present = {names[code] for code in np.flatnonzero(np.bincount(kinds, minlength=len(names))).tolist()}
    columns = _detail.Columns(n)
    reads = {name for code in present for name in _READS.get(code, ())}
    for name in _detail.COLUMNS:
        if name in reads:
            _give(columns, name, claims.column(name))
    if "NO_BENEFIT_RULE" in present:
        _give(columns, "policy_id", results.column("policy_id"))
    statuses = _status_texts(tuple(names))
    places = _places(policies)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    kinds = np.ascontiguousarray(kinds, dtype=np.int64)
    odd = _NO_ODD
    for _ in range(2):
        made = _detail.sentences(columns, _VOCABULARY, places, rows, kinds, *statuses, *odd)
        if isinstance(made, tuple):
            offsets, data, bitmap, nulls = made
            return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data),
                                               pa.py_buffer(bitmap) if nulls else None, nulls)
        # a date outside years 1-9999 (as good as never): made in Python, then again
        odd = _odd_dates(odd, made, claims.schema.field("settle_time").type)
    raise RuntimeError("status_detail: a date the C asked for was not made")


def with_detail(results: pa.RecordBatch, claims, policies: Optional[PolicySet] = None,
                keep: tuple[str, ...] = ()) -> pa.RecordBatch:
    """`results` with `status_detail` and the claim columns `keep` appended (the command
    line's results; the API's stay spec section 3 as they are)."""
    arrays = list(results.columns) + [status_detail(claims, results, policies)]
    fields = list(results.schema) + [STATUS_DETAIL]
    for name in keep:
        col = claims.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        arrays.append(col)
        fields.append(claims.schema.field(name))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
