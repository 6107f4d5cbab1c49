"""`status_detail`: one sentence per error row naming the field and the values.

A result row carries only its status code; an office reading a results file
alone needs to know which field and which amounts made a claim fail, without a
join back to the claims. The sentence is rebuilt from the claim's columns and
its status (spec section 7, in precedence order: the check that failed is the
first one that the claim fails for its status), for the error rows only (1 %
of the README's job): the columns a sentence reads are read as Python values
at those rows (off the Arrow buffers, a numpy gather), and each sentence is one
f-string. Formatting those few rows in Python costs less than the hundreds of
Arrow compute calls per batch that building the sentences column-wise took
(docs/DECISIONS.md); a file of valid claims costs one comparison.
"""
from __future__ import annotations

import datetime
import functools
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .model import PolicySet
from .schema import (AMOUNT_COLUMNS, FACILITY_LEVELS, LOCALITIES, MAX_AMOUNT, REQUIRED_COLUMNS, SCHEMES,
                     STATUSES, VISIT_TYPES)

STATUS_DETAIL = pa.field("status_detail", pa.string())

_ENUMS = (("scheme", SCHEMES), ("visit_type", VISIT_TYPES), ("facility_level", FACILITY_LEVELS),
          ("locality", LOCALITIES))
_PARTS = (("self_funded", "self_funded_amount"), ("over_limit", "over_limit_amount"),
          ("class_b_copay", "class_b_copay_amount"), ("in_scope", "in_scope_amount"))


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


def _column(c, name: str) -> pa.Array:
    col = c.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _pylist(arr: pa.Array) -> list:
    """An array's values as Python objects, None for null: a dictionary array through its few
    entries (Arrow converts one of those at ~1 us a value, a plain array at ~20 ns)."""
    if pa.types.is_dictionary(arr.type):
        entries = arr.dictionary.to_pylist()
        return [None if i is None else entries[i] for i in arr.indices.to_pylist()]
    return arr.to_pylist()


def _str(v) -> str:
    """A value as Arrow's cast to string writes it: null as 'null', booleans as true/false."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def _wrap64(v: int) -> int:
    """`v` as int64 arithmetic wraps it (Arrow's unchecked add, which the sum in the sentence is)."""
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


class _ErrorRows:
    """The claim columns of a batch's error rows, read as Python values on first use: off the
    Arrow buffers at those rows for dictionary, integer, timestamp and boolean columns (a numpy
    gather), with one `take` for the others (strings, lists)."""

    def __init__(self, claims: pa.Table, rows: np.ndarray):
        self.claims = claims
        self.rows = rows
        self._values: dict[str, list] = {}
        self._columns: dict[str, pa.Array] = {}
        self._valid: dict[str, np.ndarray] = {}
        self._days: dict[int, tuple[str, Optional[int], int]] = {}

    def column(self, name: str) -> pa.Array:
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = _column(self.claims, name)
        return col

    def valid(self, name: str) -> np.ndarray:
        """Per error row, whether `name` is not null there (read once per column)."""
        valid = self._valid.get(name)
        if valid is None:
            col = self.column(name)
            valid = (np.ones(len(self.rows), dtype=bool) if not col.null_count
                     else _bits_at(col.buffers()[0], col.offset, self.rows))
            self._valid[name] = valid
        return valid

    def __call__(self, name: str) -> list:
        """`name` at every error row, read once (for the columns several codes read)."""
        if name not in self._values:
            self._values[name] = self._read(self.column(name), self.rows)
        return self._values[name]

    def at(self, name: str, at: list[int]) -> list:
        """`name` at the error rows `at` only (for a column one code reads)."""
        return self._read(self.column(name), self.rows[np.asarray(at, dtype=np.intp)])

    def _read(self, col: pa.Array, rows: np.ndarray) -> list:
        if pa.types.is_dictionary(col.type):
            entries = self.derived((" entries", id(col)), col.dictionary.to_pylist)
            values = [entries[i] for i in _values(col.indices)[rows].tolist()]
        elif pa.types.is_integer(col.type):
            values = _values(col)[rows].tolist()
        elif pa.types.is_timestamp(col.type):  # microseconds, as int
            values = _values(col, np.int64)[rows].tolist()
        elif pa.types.is_boolean(col.type):
            values = _bits_at(col.buffers()[1], col.offset, rows).tolist()
        else:
            return col.take(pa.array(rows)).to_pylist()
        if col.null_count:
            valid = _bits_at(col.buffers()[0], col.offset, rows)
            values = [v if ok else None for v, ok in zip(values, valid.tolist())]
        return values

    def derived(self, key: str, make: Callable[[], list]) -> list:
        """A list computed for the error rows, made once."""
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]

    def days(self, at: list[int]) -> dict[int, tuple[str, Optional[int], int]]:
        """Error rows `at`'s settle_time as (its date as pc.strftime's '%Y-%m-%d' writes it, its
        year, its day since 1970-01-01): ('null', None, 0) when null. Each row's made once (a few
        codes read them), its day by numpy, each distinct day formatted once."""
        known = self._days
        need = [i for i in at if i not in known]
        if need:
            col = self.column("settle_time")
            day = np.floor_divide(_values(col, np.int64)[self.rows[np.asarray(need, dtype=np.intp)]], _DAY_US)
            valid = self.valid("settle_time")[need]
            typ = col.type
            dates = {d: (*_date(d, typ), d) for d in np.unique(day[valid]).tolist()}
            for i, d, ok in zip(need, day.tolist(), valid.tolist()):
                known[i] = dates[d] if ok else _NULL_DAY
        return known


def _values(arr: pa.Array, dtype=None) -> np.ndarray:
    """The values buffer of a fixed-width array (what sits under a null is arbitrary: mask it)."""
    dtype = dtype or arr.type.to_pandas_dtype()
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=arr.offset + len(arr))[arr.offset:]


def _bits_at(buffer: pa.Buffer, offset: int, rows: np.ndarray) -> np.ndarray:
    """Bits offset + rows of an Arrow bitmap, as bools."""
    bits = np.frombuffer(buffer, dtype=np.uint8)
    at = rows + offset
    return ((bits[at >> 3] >> (at & 7)) & 1).astype(bool)


_NULL_DAY = ("null", None, 0)


@functools.lru_cache(maxsize=4096)
def _date(day: int, typ: pa.DataType) -> tuple[str, int]:
    """A day since 1970-01-01 as pc.strftime's '%Y-%m-%d' writes it, and its year (cached: the
    error rows of a file fall on a few hundred days)."""
    try:
        date = _EPOCH + datetime.timedelta(days=day)
    except OverflowError:  # outside years 1-9999: as Arrow writes it
        at = pa.array([day * _DAY_US], pa.int64()).cast(typ)
        return pc.strftime(at, "%Y-%m-%d")[0].as_py(), pc.year(at)[0].as_py()
    return date.isoformat(), date.year


_EPOCH = datetime.date(1970, 1, 1)
_DAY_US = 86_400_000_000


def _missing(v: _ErrorRows, at: list[int]) -> list:
    """The null required fields of each row, named in one sentence built once per pattern of
    nulls (a handful), not once per row."""
    rows = np.asarray(at, dtype=np.intp)
    pattern = np.zeros(len(rows), dtype=np.int64)
    for bit, name in enumerate(REQUIRED_COLUMNS):
        if v.column(name).null_count:
            pattern |= (~v.valid(name)[rows]).astype(np.int64) << bit
    texts: dict = {}
    for k in pattern.tolist():
        if k not in texts:
            names = [name for bit, name in enumerate(REQUIRED_COLUMNS) if k >> bit & 1]
            texts[k] = ", ".join(names) + " is null; a required field" if names else None
    return [texts[k] for k in pattern.tolist()]


def _invalid_value(v: _ErrorRows, at: list[int]) -> list:
    columns = [(name, f"' is not one of {', '.join(values)}", frozenset(values), v.at(name, at))
               for name, values in _ENUMS]
    out = []
    for i in range(len(at)):
        pieces = [f"{name} '{col[i]}{tail}" for name, tail, values, col in columns
                  if col[i] is not None and col[i] not in values]
        out.append("; ".join(pieces) or None)
    return out


def _flagged(v: _ErrorRows, at: list[int], test) -> list[list[tuple[str, int]]]:
    """Per row of `at`, the (amount column, value) pairs whose non-null value passes `test`
    (a numpy comparison), in column order: found with numpy, so only those are formatted."""
    rows = v.rows[np.asarray(at, dtype=np.intp)]
    out: list[list[tuple[str, int]]] = [[] for _ in at]
    for name in AMOUNT_COLUMNS:
        col = v.column(name)
        values = _values(col, np.int64)[rows]
        hit = test(values)
        if col.null_count:
            hit &= _bits_at(col.buffers()[0], col.offset, rows)
        for k in np.flatnonzero(hit).tolist():
            out[k].append((name, int(values[k])))
    return out


def _invalid_amount(v: _ErrorRows, at: list[int]) -> list:
    return ["; ".join(f"{name} {value} < 0 (a reversal goes through the server's Reverse)" for name, value in hits)
            or None for hits in _flagged(v, at, lambda x: x < 0)]


def _out_of_range(v: _ErrorRows, at: list[int]) -> list:
    out = []
    for i, hits in zip(at, _flagged(v, at, lambda x: x > MAX_AMOUNT)):
        text = "; ".join(f"{name} {value} > 10^12 fen, the largest claim amount" for name, value in hits)
        if not text:
            days = v.days([i])
            text = (f"this claim would take the compliant total of person {_str(v('person_id')[i])} "
                    f"({_str(v('region')[i])}, {_str(v('scheme')[i])}, {_str(days[i][1])}) above 10^14 fen, "
                    f"the largest accumulated amount")
        out.append(text)
    return out


def _mismatch(v: _ErrorRows, at: list[int]) -> list:
    total, class_b = v.at("total_amount", at), v.at("in_scope_class_b_amount", at)
    parts = [v.at(name, at) for _, name in _PARTS]
    out = []
    for i in range(len(at)):
        p = [col[i] for col in parts]
        s = None if None in p else _wrap64(p[0] + p[1] + p[2] + p[3])
        if total[i] is not None and s is not None and total[i] != s:
            out.append(f"total_amount {total[i]} != {s} = self_funded {p[0]} + over_limit {p[1]} + "
                       f"class_b_copay {p[2]} + in_scope {p[3]}")
        else:
            out.append(f"in_scope_class_b_amount {_str(class_b[i])} > in_scope_amount {_str(p[3])}")
    return out


def _unknown_policy(v: _ErrorRows, at: list[int]) -> list:
    region, scheme, days = v("region"), v("scheme"), v.days(at)
    return [f"no policy for region {_str(region[i])}, scheme {_str(scheme[i])} on {days[i][0]} "
            f"(settle_time's date picks the policy and its year)" for i in at]


def _identities_text(items: Optional[list]) -> str:
    """list<string> as 'a, b' with a null item as 'null' and an empty list (or a null one) as 'none'."""
    joined = ", ".join("null" if x is None else x for x in items or ())
    return joined or "none"


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




def _versions(v: _ErrorRows, policies: PolicySet, at: list[int]) -> dict[int, Optional[int]]:
    """policy_rows of error rows `at`, looked up in Python (a few rows of a batch need it: a
    dozen compute calls cost more): the version of its (region, scheme, year) in force on its date."""
    table = v.derived(" versions", lambda: _versions_table(policies))
    region, scheme, days = v("region"), v("scheme"), v.days(at)
    out = {}
    for i in at:
        _, year, day = days[i]
        found = table.get((region[i], scheme[i], year))
        which = None
        if found is not None:
            which, later = found
            for start, index in later:
                if day >= start:
                    which = index
        out[i] = which
    return out


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


def _unknown_identity(v: _ErrorRows, at: list[int], policy_id: list, policies: Optional[PolicySet]) -> list:
    """Spec section 5: an identity is unknown only when no version of the year declares it (or
    the list holds a null item), so the sentence names the year's versions and all they declare."""
    identities = dict(zip(at, v.at("identities", at)))
    region, scheme, days = v("region"), v("scheme"), v.days(at)
    known = policies is not None and bool(policies.policies)
    declared = [", ".join(policies.year_identities(p.region, p.scheme, p.year)) or "none"
                for p in policies.policies] if known else []
    versions = _versions(v, policies, at) if known else {}
    out = []
    for i in at:
        text = (f"identities [{_identities_text(identities[i])}] include a null item or one that no version of "
                f"region {_str(region[i])}, scheme {_str(scheme[i])}, year {_str(days[i][1])} declares")
        which = versions.get(i)
        if which is not None:
            text += f" (they declare: {declared[which]})"
        out.append(text)
    return out


def _duplicate(v: _ErrorRows, at: list[int]) -> list:
    return [f"claim_id {_str(claim_id)} came earlier in this call (the first row with it is settled or "
            f"rejected on its own); send a corrected claim in a later call" for claim_id in v.at("claim_id", at)]


def _no_rule(v: _ErrorRows, at: list[int], policy_id: list, policies: Optional[PolicySet]) -> list:
    visit, level, locality, referred = v("visit_type"), v("facility_level"), v("locality"), v("referred")
    versions = _versions(v, policies, at) if policies is not None and policies.policies else {}
    out = []
    for i in at:
        pid = policy_id[i]
        if pid is None and versions.get(i) is not None:
            pid = policies.policies[versions[i]].id
        out.append(f"policy {_str(pid)} has no basic-layer rule for visit_type {_str(visit[i])} at facility_level "
                   f"{_str(level[i])}, locality {_str(locality[i])}, referred {_str(bool(referred[i]))}")
    return out


PLACE_COLUMNS = ("region", "scheme", "settle_time")  # what policy_rows reads
_SENTENCE = {
    "MISSING_FIELD": lambda v, at, pid, policies: _missing(v, at),
    "INVALID_VALUE": lambda v, at, pid, policies: _invalid_value(v, at),
    "INVALID_AMOUNT": lambda v, at, pid, policies: _invalid_amount(v, at),
    "AMOUNT_OUT_OF_RANGE": lambda v, at, pid, policies: _out_of_range(v, at),
    "AMOUNT_MISMATCH": lambda v, at, pid, policies: _mismatch(v, at),
    "UNKNOWN_POLICY": lambda v, at, pid, policies: _unknown_policy(v, at),
    "UNKNOWN_IDENTITY": _unknown_identity,
    "DUPLICATE_CLAIM": lambda v, at, pid, policies: _duplicate(v, at),
    "NO_BENEFIT_RULE": _no_rule,
}
_STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}


def _error_rows(status) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The rows whose status is not ok, and per such row a code into the returned names
    (STATUSES first): off a dictionary array's indices through its few entries (the ok rows
    skipped by one comparison of the indices), else the array is dictionary-encoded first."""
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
    remap = np.asarray(remap, dtype=np.intp)
    indices = status.indices
    index = _values(indices)
    if indices.null_count:
        index = np.where(np.asarray(indices.is_valid(), dtype=bool), index.astype(np.intp), len(remap) - 1)
    ok = np.flatnonzero(remap == _STATUS_CODE["ok"])
    rows = np.flatnonzero(index != ok[0]) if len(ok) == 1 else np.flatnonzero(remap[index] != _STATUS_CODE["ok"])
    return rows, remap[index[rows]], names


def _placed(n: int, rows: np.ndarray, texts: list) -> pa.Array:
    """A string array of n rows: texts[k] at rows[k] (None: null), null elsewhere, built from
    its buffers (no Python object per row of the batch)."""
    data = [b"" if t is None else t.encode() for t in texts]
    lengths = np.zeros(n, dtype=np.int32)
    lengths[rows] = [len(d) for d in data]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    valid = np.zeros(n, dtype=bool)
    valid[rows[np.array([t is not None for t in texts], dtype=bool)]] = True
    nulls = n - int(np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b"".join(data)), bitmap, nulls)


def status_detail(claims, results, policies: Optional[PolicySet] = None) -> pa.Array:
    """A string array, one per row: null where the status is ok, else one sentence naming the
    field and the values that failed (`claims` and `results` row-aligned, as `engine.settle`
    gives them; `policies` adds the declared identities to UNKNOWN_IDENTITY).

    Its cost follows the error rows: they are found from the status codes (one pass over
    small integers), the columns their sentences read are taken for them once, and each
    sentence is formatted in Python; a batch of valid claims costs that one pass."""
    status = results.column("status")
    if isinstance(status, pa.ChunkedArray):
        status = status.combine_chunks()
    n = len(status)
    rows, kinds, names = _error_rows(status)
    if not len(rows):
        return pa.nulls(n, pa.string())
    present = [(code, names[code]) for code in np.unique(kinds).tolist()]
    values = _ErrorRows(claims, rows)
    policy_id: list = []
    if any(name == "NO_BENEFIT_RULE" for _, name in present):
        col = results.column("policy_id")
        policy_id = _pylist((col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).take(pa.array(rows)))
    texts: list = [None] * len(rows)
    for code, name in present:
        at = np.flatnonzero(kinds == code).tolist()
        if name in _SENTENCE:
            got = _SENTENCE[name](values, at, policy_id, policies)
        else:  # a status this module does not know (a newer kernel): say so rather than nothing
            got = [f"status {name}"] * len(at)
        for i, text in zip(at, got):
            texts[i] = text
    return _placed(n, rows, texts)


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
