"""Arrow in and out: the column contract of spec sections 2-4.

Claims are checked against the schema, then turned into flat numpy columns
(codes, masks, amounts) for the kernel, all vectorized; results and
accumulators are built back as Arrow arrays from the kernel's outputs.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _columns, _kernel
from .compile import UNDECLARED_IDENTITY_BIT, CompiledPolicies, encode_category
from .schema import FACILITY_LEVELS, FUNDS, LOCALITIES, SCHEMES, VISIT_TYPES

from .schema import (ACCUMULATORS_SCHEMA, AMOUNT_COLUMNS, CLAIMS_SCHEMA, DELTA_FIELDS,  # noqa: F401  (re-exported)
                     DICTIONARY_COLUMNS, FUND_COLUMNS, LAYER_ENTRY, REQUIRED_COLUMNS, RESULTS_SCHEMA, STATUSES,
                     layer_pays_type as _layer_pays_type)

_STATUS_NAMES = pa.array(STATUSES, pa.string())


class ClaimsSchemaError(ValueError):
    """The claims table lacks a column or has one of another type; nothing was settled."""


def _is_string_dictionary(t: pa.DataType) -> bool:
    return pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)


def check_schema(schema: pa.Schema) -> None:
    for field in CLAIMS_SCHEMA:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            raise ClaimsSchemaError(f"claims: missing column '{field.name}' ({field.type})")
        got = schema.field(idx).type
        if field.name in DICTIONARY_COLUMNS and _is_string_dictionary(got):
            continue
        if not got.equals(field.type):
            raise ClaimsSchemaError(f"claims: column '{field.name}' has type {got}; expected {field.type}")


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets int32[n + 1], data uint8[>= 1], valid uint8[n]) of a string array, zero-copy where possible."""
    offsets, data = string_data(arr)
    return offsets, data, valid_mask(arr)


def string_data(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int32[n + 1], data uint8[>= 1]) of a string array, zero-copy where possible."""
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=arr.offset + n + 1)[arr.offset:] if n else \
        np.zeros(1, dtype=np.int32)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else \
        np.zeros(1, dtype=np.uint8)
    if data.size == 0:
        data = np.zeros(1, dtype=np.uint8)
    return np.ascontiguousarray(offsets), data


def validity_bits(arr: pa.Array) -> tuple[np.ndarray, int]:
    """(the validity bitmap as bytes, the bit of row 0): an empty bitmap when there is no null."""
    bits = _validity(arr)
    return (_NO_BITS, 0) if bits is None else (bits, arr.offset)


_NO_BITS = np.zeros(0, dtype=np.uint8)


def _validity(arr: pa.Array) -> np.ndarray | None:
    """The Arrow validity bitmap of an array as bytes (bit arr.offset + i is row i), None if no nulls."""
    if arr.null_count == 0:
        return None
    return np.frombuffer(arr.buffers()[0], dtype=np.uint8)


def valid_mask(arr: pa.Array) -> np.ndarray:
    """uint8[n]: 1 where the value is not null."""
    bits = _validity(arr)
    if bits is None:
        return np.ones(len(arr), dtype=np.uint8)
    out = np.empty(len(arr), dtype=np.uint8)
    _columns.unpack_bits(bits, arr.offset, out)
    return out


def _booleans(arr: pa.Array) -> np.ndarray:
    """uint8[n] of a boolean column, null as 0."""
    out = np.empty(len(arr), dtype=np.uint8)
    if len(arr) == 0:
        return out
    _columns.unpack_bits(np.frombuffer(arr.buffers()[1], dtype=np.uint8), arr.offset, out)
    bits = _validity(arr)
    if bits is not None:
        out &= valid_mask(arr)
    return out


def _ages(arr: pa.Array) -> np.ndarray:
    """int32[n] of the int16 age column, -1 where null or negative."""
    n = len(arr)
    out = np.empty(n, dtype=np.int32)
    if n == 0:
        return out
    values = np.frombuffer(arr.buffers()[1], dtype=np.int16, count=arr.offset + n)[arr.offset:]
    bits = _validity(arr)
    _columns.ages(values, np.zeros(0, np.uint8) if bits is None else bits, arr.offset, out)
    return out


def _codes(arr: pa.Array, names) -> np.ndarray:
    """Index of each value in `names` as int32: -1 null, -2 not one of them."""
    if isinstance(arr, pa.DictionaryArray):
        per_value = np.append(_codes(arr.dictionary, names), np.int32(-1))
        indices = arr.indices
        return per_value[np.asarray(indices.fill_null(len(arr.dictionary)) if indices.null_count else indices)]
    out = np.empty(len(arr), dtype=np.int32)
    if len(arr) == 0:
        return out
    offsets, data, valid = string_buffers(arr)
    name_offsets, name_data = _name_buffers(tuple(names))
    _columns.string_codes(offsets, data, valid, name_offsets, name_data, out)
    return out


@functools.lru_cache(maxsize=256)
def _name_buffers(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    offsets, data, _ = string_buffers(pa.array(list(names) or [""], pa.string()))
    return (offsets if names else offsets[:1]), data


def _amount(col: pa.Array) -> np.ndarray:
    return np.asarray(col.fill_null(0) if col.null_count else col)


def _identity_masks(arr: pa.ListArray, bits: dict[str, int]) -> np.ndarray:
    n = len(arr)
    masks = np.zeros(n, dtype=np.int64)
    if n == 0:
        return masks
    flat = arr.flatten()  # respects the array's offset; a null list has no items here
    if len(flat) == 0:
        return masks
    enc = flat.dictionary_encode()
    undeclared = np.int64(np.uint64(1 << UNDECLARED_IDENTITY_BIT).view(np.int64))
    dict_bits = np.array([np.int64(1 << bits[v]) if v in bits else undeclared
                          for v in enc.dictionary.to_pylist()] + [undeclared], dtype=np.int64)
    # a null item inside a list: an identity lost in transit, declared by no policy (section 2)
    idx = np.asarray(enc.indices.fill_null(len(enc.dictionary)))
    values = dict_bits[idx]
    parents = np.asarray(pc.list_parent_indices(arr))
    np.bitwise_or.at(masks, parents, values)
    return masks


def _disease_codes(arr: pa.Array) -> np.ndarray:
    if len(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    enc = arr if isinstance(arr, pa.DictionaryArray) else arr.dictionary_encode()
    dict_codes = np.array([_disease_code(v) for v in enc.dictionary.to_pylist()] + [-1], dtype=np.int64)
    return dict_codes[np.asarray(enc.indices.fill_null(len(enc.dictionary)))]


class PreparedClaims:
    """One chunk of claims as flat numpy columns for the kernel."""

    def __init__(self, batch: pa.RecordBatch, compiled: CompiledPolicies):
        n = batch.num_rows
        self.batch = batch
        self.n = n
        self.claim_offsets, self.claim_data, self.claim_valid = string_buffers(batch.column("claim_id"))
        self.person_offsets, self.person_data, _ = string_buffers(batch.column("person_id"))

        missing = np.zeros(n, dtype=np.uint8)
        for name in REQUIRED_COLUMNS:
            col = batch.column(name)
            if col.null_count:
                _columns.mark_nulls(_validity(col), col.offset, missing)
        self.missing = missing

        self.visit = _codes(batch.column("visit_type"), VISIT_TYPES).astype(np.int8)
        self.level = _codes(batch.column("facility_level"), FACILITY_LEVELS).astype(np.int8)
        self.locality = _codes(batch.column("locality"), LOCALITIES).astype(np.int8)
        scheme = _codes(batch.column("scheme"), SCHEMES)
        self.invalid_enum = ((self.visit == -2) | (self.level == -2) | (self.locality == -2)
                             | (scheme == -2)).view(np.uint8)
        # Null enum codes only occur on MISSING_FIELD rows; keep them in range for the kernel.
        for codes in (self.visit, self.level, self.locality):
            np.maximum(codes, 0, out=codes)

        self.referred = _booleans(batch.column("referred"))
        self.age = _ages(batch.column("age"))
        (self.total, self.self_funded, self.over_limit, self.class_b_copay, self.in_scope,
         self.in_scope_class_b) = (_amount(batch.column(c)) for c in AMOUNT_COLUMNS)
        self.identity_mask = _identity_masks(batch.column("identities"),
                                             {name: i for i, name in enumerate(compiled.identity_names)})
        self.disease = _disease_codes(batch.column("disease_code"))

        st = batch.column("settle_time")
        st = st.cast(pa.int64())
        self.settle_time = np.asarray(st.fill_null(0) if st.null_count else st) if n else np.zeros(0, np.int64)
        self.policy, self.key_policy = self._policies(batch, compiled, scheme, self.settle_time)
        self.columns = _kernel.ClaimColumns(self)

    @staticmethod
    def _policies(batch, compiled: CompiledPolicies, scheme: np.ndarray,
                  settle_time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the version in force, its year's first version) per row from (region, scheme,
        settle_time); -1 none."""
        if batch.num_rows == 0 or not compiled.lookup:
            return np.full(batch.num_rows, -1, dtype=np.int32), np.full(batch.num_rows, -1, dtype=np.int32)
        return _policy_index(_codes(batch.column("region"), compiled.names.region_names), scheme, settle_time,
                             compiled)

    @classmethod
    def from_rows(cls, rows: list, compiled: CompiledPolicies) -> "PreparedClaims":
        """The same arrays from claims given as Python values, one tuple per claim in the
        column order of CLAIMS_SCHEMA (None for null; settle_time as int microseconds).

        For callers that settle a few claims at a time (the server): building a dozen
        Arrow arrays and reading them back costs more than settling the claims."""
        self = cls.__new__(cls)
        n = self.n = len(rows)
        self.batch = None
        (claim_id, person_id, region, scheme, settle_time, visit, level, locality, referred, disease, age,
         identities, *amounts) = zip(*rows) if n else [()] * len(CLAIMS_SCHEMA)
        self._claim_ids = list(claim_id)
        self.claim_offsets, self.claim_data, self.claim_valid = _string_arrays(claim_id)
        self.person_offsets, self.person_data, _ = _string_arrays(person_id)
        required = [CLAIMS_SCHEMA.names.index(name) for name in REQUIRED_COLUMNS]
        self.missing = np.array([any(r[j] is None for j in required) for r in rows], dtype=np.uint8)
        self.visit, self.level, self.locality = (_value_codes(v, names).astype(np.int8) for v, names in (
            (visit, VISIT_TYPES), (level, FACILITY_LEVELS), (locality, LOCALITIES)))
        scheme_codes = _value_codes(scheme, SCHEMES)
        self.invalid_enum = ((self.visit == -2) | (self.level == -2) | (self.locality == -2)
                             | (scheme_codes == -2)).view(np.uint8)
        for codes in (self.visit, self.level, self.locality):
            np.maximum(codes, 0, out=codes)
        self.referred = np.array([bool(v) for v in referred], dtype=np.uint8)
        self.age = np.array([-1 if v is None or v < 0 else v for v in age], dtype=np.int32)
        (self.total, self.self_funded, self.over_limit, self.class_b_copay, self.in_scope,
         self.in_scope_class_b) = (np.array([v or 0 for v in col], dtype=np.int64) for col in amounts)
        bits = compiled.identity_bits
        undeclared = _undeclared_bit()
        # a null item (None) is no declared name: UNKNOWN_IDENTITY (section 2)
        self.identity_mask = np.array([0 if ids is None else _or(bits.get(v, undeclared) for v in ids)
                                       for ids in identities], dtype=np.int64)
        self.disease = np.array([_disease_code(v) for v in disease], dtype=np.int64)
        self.settle_time = np.array([v or 0 for v in settle_time], dtype=np.int64)
        self.policy = self.key_policy = np.full(n, -1, dtype=np.int32)
        if n and compiled.lookup:
            region_names = compiled.names.region_names
            self.policy, self.key_policy = _policy_index(_value_codes(region, region_names), scheme_codes,
                                                         self.settle_time, compiled)
        self.columns = _kernel.ClaimColumns(self)
        return self

    def claim_ids(self) -> list:
        """The claim_id of each row as Python values (None for null)."""
        return self._claim_ids if self.batch is None else self.batch.column("claim_id").to_pylist()


def _policy_index(region: np.ndarray, scheme: np.ndarray, settle_time: np.ndarray,
                  compiled: CompiledPolicies) -> tuple[np.ndarray, np.ndarray]:
    """(the version in force, its year's first version) per row; -1 none."""
    policy = np.empty(len(settle_time), dtype=np.int32)
    key_policy = np.empty(len(settle_time), dtype=np.int32)
    compiled.names.policy_lookup.rows(region.astype(np.int32, copy=False), scheme.astype(np.int32, copy=False),
                                      settle_time, policy, key_policy)
    return policy, key_policy


def _string_arrays(values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """string_buffers() of Python strings (None: null, stored empty)."""
    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
    return offsets, data, np.array([v is not None for v in values], dtype=np.uint8)


@functools.lru_cache(maxsize=256)
def _code_table(names: tuple) -> dict:
    return {name: i for i, name in enumerate(names)}


def _value_codes(values, names) -> np.ndarray:
    """_codes() of Python strings: index in `names`, -1 None, -2 not one of them."""
    table = _code_table(tuple(names))
    return np.array([-1 if v is None else table.get(v, -2) for v in values], dtype=np.int32)


def _undeclared_bit() -> int:
    return int(np.int64(np.uint64(1 << UNDECLARED_IDENTITY_BIT).view(np.int64)))


def _or(values) -> int:
    out = 0
    for v in values:
        out |= v
    return out


@functools.lru_cache(maxsize=4096)
def _disease_code(value) -> int:
    code = (value or "").strip().upper()
    return encode_category(code) if len(code) >= 3 else -1


def _derived(prep: PreparedClaims, out: _kernel.KernelOutputs, compiled: CompiledPolicies,
             totals: Optional[np.ndarray] = None) -> dict:
    """The result values computed from the kernel's outputs, shared by both result builders:
    policy (-1 on error rows), fund_total, personal, compliant_personal, and the list
    offsets [n + 1] of layer_pays with its entries (global layer index, amount). `totals`
    (policies + 1 rows, schema.PAID_TOTALS columns): each policy's paid amounts added to it."""
    n = prep.n
    layer_pay = out.layer_pay
    d = {"policy": pool_array(n, np.int32), "fund_total": pool_array(n, np.int64), "personal": pool_array(n, np.int64),
         "compliant_personal": pool_array(n, np.int64), "layer_offsets": pool_array(n + 1, np.int32)}
    entries = _columns.result_columns(out.status, prep.policy, prep.total, out.fund_pay, out.compliant,
                                     layer_pay, d["policy"], d["fund_total"], d["personal"],
                                     d["compliant_personal"], d["layer_offsets"], out.deductible_applied,
                                     _NO_TOTALS if totals is None else totals)
    d["layer"], d["pay"] = pool_array(entries, np.int32), pool_array(entries, np.int64)
    _columns.layer_entries(layer_pay, d["policy"], compiled.policies, d["layer"], d["pay"])
    return d


_NO_TOTALS = np.zeros((0, 0), dtype=np.int64)


def _delta_heads(prep: PreparedClaims, out: _kernel.KernelOutputs) -> tuple[np.ndarray, np.ndarray]:
    """delta_admissions and delta_compliant_total of each row (0 on error rows)."""
    ok = out.status == 0
    return ((prep.visit == 0) & ok).astype(np.int64), np.where(ok, out.compliant, 0)


def pool_array(shape, dtype) -> np.ndarray:
    """An output array from Arrow's memory pool, which the results then wrap zero-copy.

    The pool keeps freed memory, so chunk after chunk reuses warm pages
    instead of faulting in fresh ones (page clearing was a third of the
    kernel's time with numpy's allocator).
    """
    dtype = np.dtype(dtype)
    count = shape if isinstance(shape, int) else shape[0] * shape[1]
    if count < 4096:  # a few claims: the pool's bookkeeping costs more than it saves
        return np.empty(shape, dtype=dtype)
    buf = pa.allocate_buffer(max(count * dtype.itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


NAME_COLUMNS = ("status", "policy_id", "identity")


def results_schema(deltas: bool = False, dictionary: bool = False) -> pa.Schema:
    """RESULTS_SCHEMA (plus the delta columns); with `dictionary`, the name columns and
    layer_pays' layer as dictionary<int32, string> (the same strings, see build_results)."""
    schema = RESULTS_SCHEMA
    if dictionary:
        dict_type = pa.dictionary(pa.int32(), pa.string())
        for name in NAME_COLUMNS:
            i = schema.get_field_index(name)
            schema = schema.set(i, schema.field(i).with_type(dict_type))
        i = schema.get_field_index("layer_pays")
        schema = schema.set(i, schema.field(i).with_type(_layer_pays_type(dict_type)))
    for name, typ in (DELTA_FIELDS if deltas else ()):
        schema = schema.append(pa.field(name, typ))
    return schema


def _named(codes: np.ndarray, names: pa.Array, dictionary: bool) -> pa.Array:
    """names[codes] (code -1: null), as strings or as a dictionary array over `names`."""
    codes = codes.astype(np.int32, copy=False)
    if dictionary:
        nulls = codes < 0
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=nulls if nulls.any() else None), names)
    return names.take(pa.array(codes, mask=codes < 0))


def build_results(prep: PreparedClaims, compiled: CompiledPolicies, out: _kernel.KernelOutputs, deltas: bool,
                  dictionary: bool = False, totals: Optional[np.ndarray] = None) -> pa.RecordBatch:
    """The results chunk (spec section 3) from the kernel's outputs, in input order.

    With `dictionary`, the name columns come as dictionary arrays over the
    policy set's names: the same values, without copying a string per row,
    which a Parquet writer then stores as its dictionary pages directly.
    """
    status, fund_pay = out.status, out.fund_pay
    d = _derived(prep, out, compiled, totals)
    policy = d["policy"]
    names = compiled.names
    schema = results_schema(deltas, dictionary)
    layer_pays_type = schema.field("layer_pays").type
    layer_pays = pa.ListArray.from_arrays(
        pa.array(d["layer_offsets"]),
        pa.StructArray.from_arrays([_named(names.layer_codes[d["layer"]], names.layers, dictionary),
                                    pa.array(d["pay"])],
                                   fields=list(layer_pays_type.value_type)),
        type=layer_pays_type)

    columns = [
        prep.batch.column("claim_id"),
        _named(status, _STATUS_NAMES, dictionary),
        _named(policy, names.policy_ids, dictionary),
        _named(out.effective, names.identities, dictionary),
        pa.array(out.deductible_applied),
        *[pa.array(fund_pay[j]) for j in range(len(FUNDS))],
        pa.array(d["fund_total"]),
        pa.array(d["personal"]),
        pa.array(d["compliant_personal"]),
        layer_pays,
        pa.array(out.cap_hit.view(np.bool_)),
    ]
    if deltas:
        columns += [*map(pa.array, _delta_heads(prep, out)), _delta_layers(out.deltas, policy, compiled)]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def result_rows(prep: PreparedClaims, compiled: CompiledPolicies, out: _kernel.KernelOutputs,
                deltas: bool) -> list[dict]:
    """The rows `build_results(...).to_pylist()` gives, built without Arrow arrays.

    For callers that settle a few claims at a time (the server's groups), where
    building and reading back a dozen Arrow arrays costs more than the claims."""
    d = _derived(prep, out, compiled)
    c = compiled
    claim_ids = prep.claim_ids()
    status = out.status.tolist()
    policy = d["policy"].tolist()
    effective = out.effective.tolist()
    ded = out.deductible_applied.tolist()
    fund_pay = out.fund_pay.T.tolist()
    fund_total, personal, compliant_personal = (d[k].tolist() for k in ("fund_total", "personal",
                                                                        "compliant_personal"))
    layer_offsets, layer, pay = d["layer_offsets"].tolist(), d["layer"].tolist(), d["pay"].tolist()
    cap_hit = out.cap_hit.view(np.bool_).tolist()
    policy_ids, identity_names, layer_names = c.policy_ids, c.identity_names, c.layer_names
    if deltas:
        d_adm, d_ct = (v.tolist() for v in _delta_heads(prep, out))
        values = out.deltas
    rows = []
    for i in range(prep.n):
        p = policy[i]
        row = {
            "claim_id": claim_ids[i],
            "status": STATUSES[status[i]],
            "policy_id": policy_ids[p] if p >= 0 else None,
            "identity": identity_names[effective[i]] if effective[i] >= 0 else None,
            "deductible_applied": ded[i],
            **dict(zip(FUND_COLUMNS, fund_pay[i])),
            "fund_pay_total": fund_total[i],
            "personal_pay": personal[i],
            "compliant_personal_pay": compliant_personal[i],
            "layer_pays": [{"layer": layer_names[layer[k]], "pay": pay[k]}
                           for k in range(layer_offsets[i], layer_offsets[i + 1])],
            "cap_hit": cap_hit[i],
        }
        if deltas:
            columns = c.acc_columns[max(p, 0)]
            row["delta_admissions"] = d_adm[i]
            row["delta_compliant_total"] = d_ct[i]
            row["delta_layers"] = [
                {"layer": columns[j][0], "cap_group": columns[j][1], "position": v[0], "paid": v[1],
                 "deductible_charged": v[2]}
                for j in np.flatnonzero(values[i].any(axis=1)).tolist() for v in (values[i, j].tolist(),)]
        rows.append(row)
    return rows


def _layer_entries(values: np.ndarray, policy: np.ndarray, compiled: CompiledPolicies) -> pa.ListArray:
    """list<LAYER_ENTRY> per row from a [rows, width, 3] array; entries that are all 0 left out."""
    n = values.shape[0]
    nonzero = (values != 0).any(axis=2)
    rows, cols = np.nonzero(nonzero)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(nonzero.sum(axis=1), out=offsets[1:])
    width = values.shape[1]
    key = policy[rows].astype(np.int64) * width + cols
    names = compiled.names
    layer_col = _named(names.acc_layer_codes[key], names.acc_layer_names, False)
    cap_col = _named(names.acc_cap_codes[key], names.acc_cap_names, False)
    entries = pa.StructArray.from_arrays(
        [layer_col, cap_col, pa.array(values[rows, cols, 0]), pa.array(values[rows, cols, 1]),
         pa.array(values[rows, cols, 2])], fields=list(LAYER_ENTRY))
    return pa.ListArray.from_arrays(pa.array(offsets), entries, type=pa.list_(LAYER_ENTRY))


def _delta_layers(deltas: np.ndarray, policy: np.ndarray, compiled: CompiledPolicies) -> pa.ListArray:
    return _layer_entries(deltas, np.maximum(policy, 0), compiled)


def accumulators_schema(dictionary: bool = False) -> pa.Schema:
    """ACCUMULATORS_SCHEMA; with `dictionary`, region, scheme and the layer entries' layer and
    cap_group as dictionary<int32, string> (the same strings, as results_schema does)."""
    if not dictionary:
        return ACCUMULATORS_SCHEMA
    dict_type = pa.dictionary(pa.int32(), pa.string())
    schema = ACCUMULATORS_SCHEMA
    for name in ("region", "scheme"):
        i = schema.get_field_index(name)
        schema = schema.set(i, schema.field(i).with_type(dict_type))
    entry = pa.struct([f.with_type(dict_type) if f.name in ("layer", "cap_group") else f for f in LAYER_ENTRY])
    i = schema.get_field_index("layers")
    return schema.set(i, schema.field(i).with_type(pa.list_(entry)))


def _with_names(names: pa.Array, codes: np.ndarray, more: list) -> tuple[pa.Array, np.ndarray]:
    """(names, codes) with codes for `more` appended (None: -1), each name once in the names."""
    listed = names.to_pylist()
    extra = sorted({v for v in more if v is not None} - set(listed))
    listed += extra
    index = {v: k for k, v in enumerate(listed)}
    more_codes = np.array([-1 if v is None else index[v] for v in more], dtype=codes.dtype)
    return pa.array(listed, pa.string()), np.concatenate([codes, more_codes])


def accumulators_table(keys_starts: np.ndarray, keys_arena: np.ndarray, compiled: CompiledPolicies,
                       state: np.ndarray, aside: dict | None = None, dictionary: bool = False,
                       foreign: tuple = ()) -> pa.Table:
    """Closing accumulators (spec section 4), one row per key that holds anything.

    Two Cython passes over the state rows (count, then fill), so that a year's
    millions of keys cost no temporary the size of the table.
    `aside`: (slot, column, field) -> value of carried-in fields the state rows do not keep;
    a column acc_width + k is the carried-in entry `foreign[k]` ((layer, cap group)) that no
    version of its key's year names, returned as it came.
    `dictionary`: names as dictionary arrays (`accumulators_schema(dictionary=True)`)."""
    count = len(keys_starts) - 1
    schema = accumulators_schema(dictionary)
    if count == 0:
        return schema.empty_table()
    c = compiled
    items = sorted((aside or {}).items())
    aside_slot = np.array([k[0] for k, _ in items], dtype=np.int64)
    aside_rows = np.array([(k[1], k[2], v) for k, v in items], dtype=np.int64).reshape(len(items), 3)
    acc = _columns.ClosingAccumulators(keys_starts, keys_arena if len(keys_arena) else np.zeros(1, np.uint8), state,
                                       c.state_index, c.policies, c.acc_width, aside_slot, aside_rows)
    held, column = acc.held, acc.column
    position, paid, charged = acc.position, acc.paid, acc.deductible_charged
    person = pa.LargeStringArray.from_buffers(held, pa.py_buffer(acc.person_offsets), pa.py_buffer(acc.person_data))
    pol = acc.key_policy
    names = c.names
    layer_names, layer_codes = names.acc_layer_names, names.acc_layer_codes
    cap_names, cap_codes = names.acc_cap_names, names.acc_cap_codes
    if foreign:  # entry codes from len(policies) * acc_width on: the foreign entries, in order
        layer_names, layer_codes = _with_names(layer_names, layer_codes, [f[0] for f in foreign])
        cap_names, cap_codes = _with_names(cap_names, cap_codes, [f[1] for f in foreign])
    layers_type = schema.field("layers").type
    entries_arr = pa.StructArray.from_arrays(
        [_named(layer_codes[column], layer_names, dictionary),
         _named(cap_codes[column], cap_names, dictionary),
         pa.array(position), pa.array(paid), pa.array(charged)], fields=list(layers_type.value_type))
    return pa.table([
        person.cast(pa.string()), _named(names.region_codes[pol], names.region_dictionary, dictionary),
        _named(names.scheme_codes[pol], names.scheme_dictionary, dictionary),
        pa.array(names.years[pol]), pa.array(acc.admissions), pa.array(acc.compliant_total),
        pa.ListArray.from_arrays(pa.array(acc.entry_offsets), entries_arr, type=layers_type),
    ], schema=schema)
