"""The settlement call: chunks of claims in, results and accumulators out.

A `Settler` is one call of spec section 4: it keeps the claim ids seen (for
DUPLICATE_CLAIM) and the accumulators of every key across the chunks fed to
it. The per-claim work is all in `_kernel`; this layer only moves arrays.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _kernel
from ._hashing import AccumulatorKeys, ClaimIds
from ._memory import zeroed_int64
from .arrow_io import (
    ACCUMULATORS_SCHEMA,
    CLAIMS_SCHEMA,
    PreparedClaims,
    accumulators_table,
    build_results,
    check_schema,
    pool_array,
    result_rows,
    string_buffers,
)
from .compile import CompiledPolicies, compile_policies
from .model import PolicySet
from .schema import FUNDS, MAX_CARRIED, PAID_TOTALS


ClaimsInput = Union[pa.Table, pa.RecordBatch, pa.RecordBatchReader, Iterable[pa.RecordBatch]]


class AccumulatorError(ValueError):
    """Carried-in accumulators that cannot be used; the message names the key."""


class Chunk(NamedTuple):
    """A chunk ready for the kernel: its arrays, pre-kernel statuses, key slots, order."""

    prep: PreparedClaims
    status: np.ndarray
    slot: np.ndarray
    order: np.ndarray


class Settlement(NamedTuple):
    results: pa.Table
    accumulators: pa.Table


_compiled_cache: dict[int, tuple[PolicySet, CompiledPolicies]] = {}


def compiled(policies: Union[PolicySet, CompiledPolicies]) -> CompiledPolicies:
    """The compiled form of a policy set, compiled once per set object."""
    if isinstance(policies, CompiledPolicies):
        return policies
    hit = _compiled_cache.get(id(policies))
    if hit is not None and hit[0] is policies:
        return hit[1]
    result = compile_policies(policies)
    if len(_compiled_cache) > 64:
        _compiled_cache.clear()
    _compiled_cache[id(policies)] = (policies, result)
    return result


class Settler:
    """One settlement call, fed chunk after chunk (spec section 4, "Order")."""

    def __init__(self, policies: Union[PolicySet, CompiledPolicies], accumulators: pa.Table | None = None,
                 deltas: bool = False, expected_claims: int = 0):
        """`expected_claims` (e.g. a file's row count) sizes the claim-id table once, up front,
        instead of rehashing it as it fills, and the accumulator table for as many keys, so
        that it is never copied to grow (its pages are only faulted in as keys take rows);
        it is a hint, not a limit."""
        self.compiled = compiled(policies)
        self.deltas = deltas
        # each(chunk, kernel outputs, results): called by settle_batches on its thread for each
        # chunk (its prepared claims and key slots) before its results are yielded, while its
        # arrays are still in the cache (the command line's summary counts there;
        # `Summary.counted_while_settling`)
        self.each: Optional[Callable[["Chunk", _kernel.KernelOutputs, pa.RecordBatch], None]] = None
        # per policy (compiled index + 1; row 0 unused), what its ok rows paid, in
        # schema.PAID_TOTALS order, added up as the results are built (`keep_totals`)
        self.totals: Optional[np.ndarray] = None
        self._claim_ids = ClaimIds()
        if expected_claims > 0:
            self._claim_ids.reserve(expected_claims, 0)
        self._keys = AccumulatorKeys()
        self._width = self.compiled.acc_width
        # one row per accumulator key: admissions, compliant_total, then the fields of its
        # policy's accumulator columns that its rules write (compile._state_layout)
        width = self.compiled.state_width
        self._state = _state_table(min(max(expected_claims, 0), STATE_RESERVE_BYTES // (8 * width)), width)
        # carried-in values of fields the policy's rules never write, so not in its rows:
        # (slot, column, field) -> value, given back unchanged with the closing accumulators
        self._carried_aside: dict[tuple[int, int, int], int] = {}
        # carried-in (layer, cap group) entries no version of the key's year names (spec section 4:
        # kept unchanged and returned): each gets a column after the compiled ones, acc_width + index
        self._foreign: dict[tuple[str, Optional[str]], int] = {}
        if accumulators is not None:
            self._carry_in(accumulators)

    def _reserve(self, slots: int) -> None:
        have = len(self._state)
        if slots <= have:
            return
        grown = _state_table(max(slots, have * 2, 64), self._state.shape[1])
        grown[:have] = self._state
        self._state = grown

    def settle_batch(self, batch: pa.RecordBatch, trace_row: int = -1, dictionary: bool = False) -> pa.RecordBatch:
        """Settle one chunk, ordered on its own; results in its input order (with
        `dictionary`, name columns as dictionary arrays: `results_schema(dictionary=True)`)."""
        chunk = self.prepare(batch)
        return self.results(chunk, self.run_kernel(chunk, trace_row), dictionary)

    def prepare(self, batch: pa.RecordBatch) -> "Chunk":
        return self.check(self.prepare_columns(batch))

    def prepare_columns(self, batch: pa.RecordBatch) -> PreparedClaims:
        """Columns to kernel arrays. Touches no state of the call, so a pipeline may run it
        for the next chunk on another thread while this one is settled."""
        if isinstance(batch, pa.Table):
            batch = _one_batch(batch)
        check_schema(batch.schema)
        return PreparedClaims(batch.select(CLAIMS_SCHEMA.names), self.compiled)

    def check(self, prep: PreparedClaims) -> "Chunk":
        """Row statuses up to DUPLICATE_CLAIM, key slots and the order: the call's state, in chunk order."""
        status = np.zeros(prep.n, dtype=np.int8)
        slot = np.zeros(prep.n, dtype=np.int64)
        self._claim_ids.reserve(prep.n, int(prep.claim_offsets[-1] - prep.claim_offsets[0]))
        _kernel.check_rows(prep.columns, self.compiled.tables, self._claim_ids, self._keys, status, slot)
        self._reserve(len(self._keys))
        order = _kernel.order_rows(prep.settle_time, prep.claim_offsets, prep.claim_data)
        return Chunk(prep, status, slot, order)

    def settle_rows(self, rows: list) -> list[dict]:
        """Settle one chunk given as Python values, one tuple per claim in CLAIMS_SCHEMA's
        column order (None for null, settle_time as int microseconds); returns what
        `settle_batch(...).to_pylist()` would, without Arrow arrays either way.

        For callers that settle a few claims at a time, such as the server's groups:
        there, moving the values through Arrow costs more than settling them."""
        chunk = self.check(PreparedClaims.from_rows(rows, self.compiled))
        return result_rows(chunk.prep, self.compiled, self.run_kernel(chunk), self.deltas)

    def results(self, chunk: "Chunk", out: _kernel.KernelOutputs, dictionary: bool = False) -> pa.RecordBatch:
        """The results batch of a settled chunk; stateless but for `totals`, which one thread
        at a time may add to (settle_batches builds results on its caller's thread)."""
        return build_results(chunk.prep, self.compiled, out, self.deltas, dictionary, self.totals)

    def keep_totals(self) -> np.ndarray:
        """From now on, add up what each policy's ok rows pay in `totals` (schema.PAID_TOTALS
        columns), while the results are built: the amounts are in registers there, so a
        summary's per-policy sums cost no pass of their own. Returns the table."""
        if self.totals is None:
            self.totals = np.zeros((len(self.compiled.policy_set.policies) + 1, len(PAID_TOTALS)), dtype=np.int64)
        return self.totals

    def run_kernel(self, chunk: "Chunk", trace_row: int = -1) -> _kernel.KernelOutputs:
        """The per-claim loop (nogil) over a prepared chunk; updates the accumulators."""
        c = self.compiled
        out = _kernel.KernelOutputs(chunk.prep.n, c.max_layers, self._width, self._state.shape[1], self.deltas,
                                    pool_array)
        _kernel.settle(c.tables, chunk.prep.columns, chunk.order, chunk.status, chunk.slot, self._state, out,
                       trace_row)
        return out

    def settle_batches(self, batches: Iterable[pa.RecordBatch], dictionary: bool = False) -> Iterator[pa.RecordBatch]:
        """Settle a stream chunk after chunk, results in order, on two threads.

        The call's state (dedup, key slots, the loop) advances on one worker
        thread, chunk after chunk, with the GIL released; meanwhile this thread
        turns the next chunk's columns into arrays and the previous chunk's
        outputs into its results. The numbers are those of `settle_batch` in turn.
        Reading ahead, the call's accumulators include the chunk after the last
        result taken: a stream closed early has settled one chunk more.
        `self.each`, if set, is called on this thread with each chunk (prepared claims,
        key slots), its kernel outputs and results before they are yielded.
        """
        pending: Optional[Future] = None  # the chunk on the worker: (Chunk, kernel outputs)

        def finished(chunk: "Chunk", out: _kernel.KernelOutputs) -> pa.RecordBatch:
            res = self.results(chunk, out, dictionary)
            if self.each is not None:
                self.each(chunk, out, res)
            return res

        with ThreadPoolExecutor(1, thread_name_prefix="medsettle-kernel") as worker:
            try:
                for batch in batches:
                    prep = self.prepare_columns(batch)
                    previous, pending = pending, worker.submit(self._check_and_run, prep)
                    if previous is not None:
                        yield finished(*previous.result())
                if pending is not None:
                    previous, pending = pending, None
                    yield finished(*previous.result())
            finally:
                if pending is not None:  # abandoned: let the worker finish before the state is touched again
                    with contextlib.suppress(Exception):
                        pending.result()

    def _check_and_run(self, prep: PreparedClaims) -> tuple["Chunk", _kernel.KernelOutputs]:
        chunk = self.check(prep)
        return chunk, self.run_kernel(chunk)

    def key_values(self, rows: np.ndarray, policy: int, slot: int) -> np.ndarray:
        """[len(rows), acc_width, ACC_FIELDS]: the accumulator columns of state rows of the key
        in `slot` (e.g. its row before and after a claim), carried-in values kept aside included."""
        values = self.compiled.acc_values(rows, np.full(len(rows), policy))
        for (s, col, field), value in self._carried_aside.items():
            if s == slot:
                values[:, col, field] = value
        return values

    def accumulators(self, dictionary: bool = False) -> pa.Table:
        """The closing accumulators (spec section 4); with `dictionary`, the name columns as
        dictionary arrays (`accumulators_schema(dictionary=True)`), as a Parquet writer takes them."""
        starts, arena = self._keys.export()
        return accumulators_table(starts, arena, self.compiled, self._state, self._carried_aside, dictionary,
                                  tuple(self._foreign))

    def _carry_in(self, table: pa.Table) -> None:
        """Load carried-in accumulators (spec section 4); any bad key fails the whole call."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        for field in ACCUMULATORS_SCHEMA:
            if field.name not in table.column_names:
                raise AccumulatorError(f"accumulators: missing column '{field.name}'")
            if not table.schema.field(field.name).type.equals(field.type):
                raise AccumulatorError(f"accumulators: column '{field.name}' has type "
                                       f"{table.schema.field(field.name).type}; expected {field.type}")
        table = table.select(ACCUMULATORS_SCHEMA.names).combine_chunks()
        n = table.num_rows
        if n == 0:
            return

        def key_name(i: int) -> str:
            row = table.slice(i, 1).to_pylist()[0]
            return f"({row['person_id']!r}, {row['region']!r}, {row['scheme']!r}, {row['year']})"

        for name in ("person_id", "region", "scheme", "year", "admissions", "compliant_total"):
            col = table.column(name)
            if col.null_count:
                i = int(np.nonzero(~np.asarray(pc.is_valid(col)))[0][0])
                raise AccumulatorError(f"accumulators: key {key_name(i)}: '{name}' is null")
        lookup = self.compiled.lookup
        policy = np.array([lookup.get(k, -1) for k in zip(table.column("region").to_pylist(),
                                                          table.column("scheme").to_pylist(),
                                                          table.column("year").to_pylist())], dtype=np.int32)
        layers = table.column("layers").chunk(0)
        entries = layers.flatten()
        values = np.stack([np.asarray(entries.field(f).fill_null(-1)) for f in ("position", "paid",
                                                                               "deductible_charged")], axis=1) \
            if len(entries) else np.zeros((0, 3), np.int64)
        offsets, data, _ = string_buffers(table.column("person_id").chunk(0))
        self._load_carried(offsets, data, policy, np.asarray(table.column("admissions")),
                           np.asarray(table.column("compliant_total")),
                           np.asarray(pc.list_parent_indices(layers), dtype=np.int64),
                           entries.field("layer").to_pylist(), entries.field("cap_group").to_pylist(), values,
                           key_name)

    def carry_in_rows(self, rows) -> None:
        """Load carried-in accumulators given as Python values, checked as the table form is:
        `(person_id, region, scheme, year, admissions, compliant_total, layers)` per key, with
        `layers` an iterable of `((layer, cap_group), (position, paid, deductible_charged))`.

        The server's groups carry in a few keys each; building an Arrow table for them costs
        more than settling their claims."""
        keys, adm, ct, parents, layer_names, cap_names, values = [], [], [], [], [], [], []
        for i, (person_id, region, scheme, year, admissions, compliant_total, layers) in enumerate(rows):
            keys.append((person_id, region, scheme, year))
            adm.append(admissions)
            ct.append(compliant_total)
            for (layer, cap), v in layers:
                parents.append(i)
                layer_names.append(layer)
                cap_names.append(cap)
                values.append(v)
        if not keys:
            return
        lookup = self.compiled.lookup
        policy = np.array([lookup.get(k[1:], -1) for k in keys], dtype=np.int32)
        encoded = [k[0].encode() for k in keys]
        offsets = np.zeros(len(keys) + 1, dtype=np.int32)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
        self._load_carried(offsets, data, policy, np.array(adm, dtype=np.int64), np.array(ct, dtype=np.int64),
                           np.array(parents, dtype=np.int64), layer_names, cap_names,
                           np.array(values, dtype=np.int64).reshape(len(values), 3),
                           lambda i: "({!r}, {!r}, {!r}, {})".format(*keys[i]))

    def _load_carried(self, offsets, data, policy, adm, ct, parents, layer_names, cap_names, values,
                      key_name) -> None:
        """Checks carried-in keys (policy, ranges, no key or entry twice) and writes them into the
        state table; `key_name(i)` names key i in an error. An entry whose (layer, cap group) no
        version of the key's year names is kept aside and returned unchanged (spec section 4)."""
        c = self.compiled
        n = len(policy)
        if (policy < 0).any():
            i = int(np.nonzero(policy < 0)[0][0])
            raise AccumulatorError(f"accumulators: key {key_name(i)}: no policy for this region, scheme and year")
        for name, v in (("admissions", adm), ("compliant_total", ct)):
            bad = (v < 0) | (v > MAX_CARRIED)
            if bad.any():
                i = int(np.nonzero(bad)[0][0])
                raise AccumulatorError(f"accumulators: key {key_name(i)}: {name} {int(v[i])} is outside [0, 10^14]")
        col_index = np.full(len(parents), -1, dtype=np.int64)
        column_of = c.acc_column_index
        for e in range(len(parents)):
            name = (layer_names[e], cap_names[e])
            j = column_of[policy[parents[e]]].get(name, -1)
            col_index[e] = j if j >= 0 else self._width + self._foreign.setdefault(name, len(self._foreign))
        bad = ((values < 0) | (values > MAX_CARRIED)).any(axis=1)
        if bad.any():
            e = int(np.nonzero(bad)[0][0])
            raise AccumulatorError(f"accumulators: key {key_name(int(parents[e]))}: layer '{layer_names[e]}' "
                                   f"holds a value outside [0, 10^14] (or null)")

        slots = np.zeros(n, dtype=np.int64)
        before = len(self._keys)
        self._keys.intern_keys(offsets, data, policy, slots)
        if len(self._keys) - before != n:
            _, first = np.unique(slots, return_index=True)
            dup = sorted(set(range(n)) - set(first.tolist()))[0]
            raise AccumulatorError(f"accumulators: key {key_name(dup)} appears twice")
        self._reserve(len(self._keys))
        self._state[slots, 0] = adm
        self._state[slots, 1] = ct
        if len(parents):
            pairs = slots[parents] * (self._width + len(self._foreign)) + col_index
            if len(np.unique(pairs)) != len(pairs):
                _, first = np.unique(pairs, return_index=True)
                e = sorted(set(range(len(pairs))) - set(first.tolist()))[0]
                raise AccumulatorError(f"accumulators: key {key_name(int(parents[e]))}: layer "
                                       f"'{layer_names[e]}' with cap group {cap_names[e]!r} appears twice")
            rows = slots[parents]
            known = col_index < self._width
            for f in range(_kernel.ACC_FIELDS):
                at = np.full(len(parents), -1, dtype=np.int64)
                at[known] = c.state_index[policy[parents[known]], col_index[known] * _kernel.ACC_FIELDS + f]
                kept = at >= 0
                self._state[rows[kept], at[kept]] = values[kept, f]
                for e in np.nonzero(~kept & (values[:, f] != 0))[0].tolist():
                    self._carried_aside[(int(rows[e]), int(col_index[e]), f)] = int(values[e, f])


# Most address space reserved up front for the accumulator table (rows cost memory only
# once a key writes them); beyond it the table grows by doubling.
STATE_RESERVE_BYTES = 4 << 30


def _state_table(rows: int, width: int) -> np.ndarray:
    """Zeroed int64 [rows, width] whose rows start on a cache line, as the layout assumes, in
    huge-page-advised memory when large (engine/_memory.pyx): the loop reads one state row
    per claim at random across hundreds of MB."""
    return zeroed_int64(rows, width)


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A table as one contiguous batch: a table is one chunk of the call."""
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


def settle(claims: ClaimsInput, policies: Union[PolicySet, CompiledPolicies], accumulators: pa.Table | None = None,
           *, deltas: bool = False) -> Settlement:
    """Settle claims (spec sections 4-5) and return the results and the closing accumulators.

    A Table or RecordBatch is one chunk; a reader or an iterable of batches is
    a stream, settled chunk by chunk (use `Settler` to consume results as they come).
    """
    settler = Settler(policies, accumulators, deltas)
    if isinstance(claims, (pa.Table, pa.RecordBatch)):
        check_schema(claims.schema)
        chunks = [settler.settle_batch(claims if isinstance(claims, pa.RecordBatch) else _one_batch(claims))]
        schema = chunks[0].schema
    else:
        chunks = list(settler.settle_batches(claims))
        if not chunks:
            empty = settler.settle_batch(pa.RecordBatch.from_pylist([], schema=CLAIMS_SCHEMA))
            chunks, schema = [], empty.schema
        else:
            schema = chunks[0].schema
    return Settlement(pa.Table.from_batches(chunks, schema=schema), settler.accumulators())
