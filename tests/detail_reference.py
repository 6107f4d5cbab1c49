"""The column-wise status_detail that engine/detail.py replaced: the reference it is checked
against (tests/engine/test_cli_detail.py), sentence for sentence.

Every sentence is built with Arrow compute over the rows of one status at a time, a
few dozen calls per status and batch; engine/detail.py has the same sentences written
in C (engine/_detail.pyx), row by row, for the error rows only (cheaper at 1 % of rows).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import detail
from engine.model import PolicySet
from engine.schema import (AMOUNT_COLUMNS, FACILITY_LEVELS, LOCALITIES, MAX_AMOUNT, REQUIRED_COLUMNS, SCHEMES,
                           STATUSES, VISIT_TYPES)

_ENUMS = (("scheme", SCHEMES), ("visit_type", VISIT_TYPES), ("facility_level", FACILITY_LEVELS),
          ("locality", LOCALITIES))
_PARTS = (("self_funded", "self_funded_amount"), ("over_limit", "over_limit_amount"),
          ("class_b_copay", "class_b_copay_amount"), ("in_scope", "in_scope_amount"))


_text = detail._text  # any column as strings, null as 'null' (the helpers, not the sentences)
_join = detail._join  # element-wise concatenation; a null part drops the row's text


def _any_of(pieces: list, sep: str, n: int) -> pa.Array:
    """Per row, the non-null pieces joined by `sep` (null when there are none); None pieces
    (a check no row of these failed) are skipped: fewer calls, each costs a pass and the GIL."""
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        return pa.nulls(n, pa.string())
    out = pieces[0]
    for piece in pieces[1:]:
        out = pc.coalesce(_join(out, sep, piece), out, piece)
    return out


def _column(c, name: str) -> pa.Array:
    col = c.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _valid(arr: pa.Array) -> np.ndarray:
    """The validity of `arr` as numpy bools, off its bitmap (no compute call: the error rows of
    a batch are few, so each call's fixed cost is most of what a check costs)."""
    if not arr.null_count:
        return np.ones(len(arr), dtype=bool)
    bits = np.unpackbits(np.frombuffer(arr.buffers()[0], dtype=np.uint8), count=arr.offset + len(arr),
                         bitorder="little")
    return bits[arr.offset:].astype(bool)


def _values(arr: pa.Array) -> np.ndarray:
    """The values buffer of a fixed-width array (what sits under a null is arbitrary: mask it)."""
    dtype = arr.type.to_pandas_dtype()
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=arr.offset + len(arr))[arr.offset:]


def _when(mask: np.ndarray, text) -> Optional[pa.Array]:
    """`text()` where `mask`, else null; None when no row is masked (text() is then not built)."""
    if not mask.any():
        return None
    return pc.if_else(pa.array(mask), text(), pa.scalar(None, pa.string()))


def _missing(c: pa.Table) -> pa.Array:
    """The null required fields of each row, named in one sentence built once per pattern of
    nulls (a handful), not once per row."""
    nulls = [(name, ~_valid(col)) for name in REQUIRED_COLUMNS if (col := _column(c, name)).null_count]
    if not nulls:
        return pa.nulls(c.num_rows, pa.string())
    pattern = np.zeros(c.num_rows, dtype=np.int64)
    for bit, (_, null) in enumerate(nulls):
        pattern |= null.astype(np.int64) << bit
    kinds, inverse = np.unique(pattern, return_inverse=True)
    texts = [", ".join(name for bit, (name, _) in enumerate(nulls) if k >> bit & 1) + " is null; a required field"
             if k else None for k in kinds.tolist()]
    return pa.array(texts, pa.string()).take(pa.array(inverse.reshape(-1)))


def _not_in(col: pa.Array, values: tuple[str, ...]) -> np.ndarray:
    """Rows whose non-null value is not one of `values`: a dictionary column is checked on its
    few entries, then its indices."""
    valid = _valid(col)
    if pa.types.is_dictionary(col.type):
        entries = col.dictionary.cast(pa.string()).to_pylist()
        bad_entry = np.array([v not in values for v in entries] + [False], dtype=bool)
        indices = np.where(valid, _values(col.indices), len(entries))
        return bad_entry[indices]
    return ~np.asarray(pc.is_in(col, value_set=pa.array(values)).fill_null(True), dtype=bool) & valid


def _invalid_value(c: pa.Table) -> pa.Array:
    pieces = []
    for name, values in _ENUMS:
        col = _column(c, name)
        pieces.append(_when(_not_in(col, values), lambda name=name, col=col, values=values: _join(
            f"{name} '", _text(col), f"' is not one of {', '.join(values)}")))
    return _any_of(pieces, "; ", c.num_rows)


def _amount_outside(c: pa.Table, name: str, low: bool) -> np.ndarray:
    col = _column(c, name)
    values = _values(col)
    return _valid(col) & ((values < 0) if low else (values > MAX_AMOUNT))


def _invalid_amount(c: pa.Table) -> pa.Array:
    pieces = [_when(_amount_outside(c, n, low=True),
                    lambda n=n: _join(f"{n} ", _text(c.column(n)), " < 0 (a reversal goes through the server's Reverse)"))
              for n in AMOUNT_COLUMNS]
    return _any_of(pieces, "; ", c.num_rows)


def _out_of_range(c: pa.Table) -> pa.Array:
    pieces = [_when(_amount_outside(c, n, low=False),
                    lambda n=n: _join(f"{n} ", _text(c.column(n)), " > 10^12 fen, the largest claim amount"))
              for n in AMOUNT_COLUMNS]
    amounts = _any_of(pieces, "; ", c.num_rows)
    if not amounts.null_count:
        return amounts
    year = _text(pc.year(c.column("settle_time")))
    total = _join("this claim would take the compliant total of person ", _text(c.column("person_id")), " (",
                  _text(c.column("region")), ", ", _text(c.column("scheme")), ", ", year,
                  ") above 10^14 fen, the largest accumulated amount")
    return pc.coalesce(amounts, total)


def _mismatch(c: pa.Table) -> pa.Array:
    parts = [c.column(n).combine_chunks() for _, n in _PARTS]
    total = c.column("total_amount").combine_chunks()
    s = parts[0]
    for p in parts[1:]:
        s = pc.add(s, p)
    sum_text = _join("total_amount ", _text(total), " != ", _text(s), " = ",
                     *[x for (short, _), p in zip(_PARTS, parts) for x in (f"{short} ", _text(p), " + ")][:-1])
    class_b = c.column("in_scope_class_b_amount").combine_chunks()
    b_text = _join("in_scope_class_b_amount ", _text(class_b), " > in_scope_amount ", _text(parts[3]))
    return pc.if_else(pc.not_equal(total, s).fill_null(False), sum_text, b_text)


def _unknown_policy(c: pa.Table) -> pa.Array:
    date = pc.strftime(c.column("settle_time").combine_chunks(), "%Y-%m-%d")
    return _join("no policy for region ", _text(c.column("region")), ", scheme ", _text(c.column("scheme")),
                 " on ", _text(date), " (settle_time's date picks the policy and its year)")


def _identities_text(col) -> pa.Array:
    """list<string> as 'a, b' with a null item as 'null' and an empty list as 'none'."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_large_list(arr.type):
        arr = arr.cast(pa.list_(pa.string()))
    flat = pc.list_flatten(arr).fill_null("null")
    offsets = pc.subtract(arr.offsets, arr.offsets[0]) if len(arr) else arr.offsets
    lists = pa.ListArray.from_arrays(offsets, flat)
    joined = pc.binary_join(lists, ", ")
    return pc.if_else(pc.equal(joined, ""), pa.scalar("none"), joined)


# the version in force per row is not what this reference checks: it is the engine's own
policy_rows = detail.policy_rows


def _policy_ids(c: pa.Table, policy_id: pa.Array, policies: Optional[PolicySet]) -> pa.Array:
    which = policy_rows(c, policies)
    if which is None:
        return _text(policy_id)
    ids = pa.array([p.id for p in policies.policies], pa.string())
    return pc.coalesce(policy_id.cast(pa.string()), ids.take(which), pa.scalar("null"))


def _unknown_identity(c: pa.Table, policy_id: pa.Array, policies: Optional[PolicySet]) -> pa.Array:
    """Spec section 5: an identity is unknown only when no version of the year declares it (or
    the list holds a null item), so the sentence names the year's versions and all they declare."""
    text = _join("identities [", _identities_text(c.column("identities")), "] include a null item or one that no "
                 "version of region ", _text(c.column("region")), ", scheme ", _text(c.column("scheme")), ", year ",
                 _text(pc.year(c.column("settle_time"))), " declares")
    which = policy_rows(c, policies)
    if which is None:
        return text
    declared = pa.array([", ".join(policies.year_identities(p.region, p.scheme, p.year)) or "none"
                         for p in policies.policies], pa.string())
    return pc.coalesce(_join(text, " (they declare: ", declared.take(which), ")"), text)


def _duplicate(c: pa.Table) -> pa.Array:
    return _join("claim_id ", _text(c.column("claim_id")), " came earlier in this call (the first row with it is "
                 "settled or rejected on its own); send a corrected claim in a later call")


def _no_rule(c: pa.Table, policy_id: pa.Array, policies: Optional[PolicySet]) -> pa.Array:
    return _join("policy ", _policy_ids(c, policy_id, policies), " has no basic-layer rule for visit_type ",
                 _text(c.column("visit_type")), " at facility_level ", _text(c.column("facility_level")),
                 ", locality ", _text(c.column("locality")), ", referred ",
                 _text(c.column("referred").combine_chunks().fill_null(False)))


PLACE_COLUMNS = ("region", "scheme", "settle_time")  # what policy_rows reads
#: The claim columns each status's sentence reads: only those are taken for its rows.
_READS = {
    "MISSING_FIELD": REQUIRED_COLUMNS,
    "INVALID_VALUE": tuple(name for name, _ in _ENUMS),
    "INVALID_AMOUNT": AMOUNT_COLUMNS,
    "AMOUNT_OUT_OF_RANGE": (*AMOUNT_COLUMNS, "person_id", *PLACE_COLUMNS),
    "AMOUNT_MISMATCH": AMOUNT_COLUMNS,
    "UNKNOWN_POLICY": PLACE_COLUMNS,
    "UNKNOWN_IDENTITY": ("identities", *PLACE_COLUMNS),
    "DUPLICATE_CLAIM": ("claim_id",),
    "NO_BENEFIT_RULE": ("visit_type", "facility_level", "locality", "referred", *PLACE_COLUMNS),
}
_SENTENCE = {
    "MISSING_FIELD": lambda c, pid, policies: _missing(c),
    "INVALID_VALUE": lambda c, pid, policies: _invalid_value(c),
    "INVALID_AMOUNT": lambda c, pid, policies: _invalid_amount(c),
    "AMOUNT_OUT_OF_RANGE": lambda c, pid, policies: _out_of_range(c),
    "AMOUNT_MISMATCH": lambda c, pid, policies: _mismatch(c),
    "UNKNOWN_POLICY": lambda c, pid, policies: _unknown_policy(c),
    "UNKNOWN_IDENTITY": _unknown_identity,
    "DUPLICATE_CLAIM": lambda c, pid, policies: _duplicate(c),
    "NO_BENEFIT_RULE": _no_rule,
}
_STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}


def _status_codes(status) -> tuple[np.ndarray, list[str]]:
    """Per row, a code into the returned names (STATUSES first): off a dictionary array's
    indices through its few entries, else one lookup per row."""
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
    return np.asarray(remap, dtype=np.intp)[np.asarray(status.indices.fill_null(len(remap) - 1))], names


def status_detail(claims, results, policies: Optional[PolicySet] = None) -> pa.Array:
    """A string array, one per row: null where the status is ok, else one sentence naming the
    field and the values that failed (`claims` and `results` row-aligned, as `engine.settle`
    gives them; `policies` adds the declared identities to UNKNOWN_IDENTITY).

    Its cost follows the error rows: they are found from the status codes (one pass over
    small integers), grouped by status, and only their rows of only the columns each
    sentence reads are taken; a batch of valid claims costs that one pass."""
    status = results.column("status")
    if isinstance(status, pa.ChunkedArray):
        status = status.combine_chunks()
    n = len(status)
    codes, names = _status_codes(status)
    rows = np.flatnonzero(codes != _STATUS_CODE["ok"])
    if not len(rows):
        return pa.nulls(n, pa.string())
    claims_t = claims if isinstance(claims, pa.Table) else pa.Table.from_batches([claims])
    policy_id = results.column("policy_id")
    if isinstance(policy_id, pa.ChunkedArray):
        policy_id = policy_id.combine_chunks()
    # error rows grouped by status, in row order within each (a stable sort of a few codes)
    rows = rows[np.argsort(codes[rows], kind="stable")]
    kinds, starts = np.unique(codes[rows], return_index=True)
    texts = []
    for code, lo, hi in zip(kinds.tolist(), starts.tolist(), [*starts[1:].tolist(), len(rows)]):
        these = pa.array(rows[lo:hi])
        name = names[code]
        if name in _SENTENCE:
            c = claims_t.select(list(_READS[name])).take(these)
            text = _SENTENCE[name](c, policy_id.take(these), policies)
        else:  # a status this module does not know (a newer kernel): say so rather than nothing
            text = pa.array([f"status {name}"] * (hi - lo), pa.string())
        texts.append(text.cast(pa.string()))
    values = pa.concat_arrays(texts).take(pa.array(np.argsort(rows, kind="stable")))
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(mask), values)
