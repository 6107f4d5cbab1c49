"""The summary of a settled file, as an office reads it and as a program takes it.

Per policy (and a total): claims, persons, ok, each error code, what each fund
paid, personal pay, deductibles and cap hits. Counts and sums are gathered per
batch on small integer codes (policy, status) into preallocated numpy arrays, in
one Cython pass (`_columns.chunk_tally` on the settling thread, off the kernel's
own arrays, with the amounts added up by the settler where it builds the results,
`Settler.keep_totals`; `_columns.summary_tally` for results settled elsewhere): no
hash per row, no Python loop over rows, no temporary column.

Persons are not counted by a distinct count over every row: the settler already
interns one accumulator key per (person, policy) for each row that passes the
checks, so its key table gives the persons per policy; only the rows the key
table may not hold (error rows, and rows of a person whose key was carried in)
are gathered, a few per batch, and added at the end. Without a settler every
row is gathered (a summary of results settled elsewhere). Amounts stay integer
fen; the table shows yuan with thousands separators (`format_yuan`), the JSON fen.
"""
from __future__ import annotations

import collections
import datetime
import json
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _columns
from ._hashing import ClaimIds
from .detail import PLACE_COLUMNS, policy_rows
from .model import PolicySet
from .schema import PAID_TOTALS, STATUSES, format_yuan
from .settle import Settler

#: Amount columns summed, in table order.
AMOUNTS = PAID_TOTALS
NO_POLICY = "(no policy)"  # error rows whose region, scheme and year name no policy
_HEAD = {"basic_pay": "basic", "supplementary_pay": "supplementary", "critical_illness_pay": "critical illness",
         "medical_aid_pay": "medical aid", "guarantee_pay": "guarantee", "fund_pay_total": "funds total",
         "personal_pay": "personal pay", "compliant_personal_pay": "compliant personal",
         "deductible_applied": "deductibles"}
_OK = STATUSES.index("ok")
_CAP_HITS = len(AMOUNTS)  # the column of the sums that counts cap hits
_EMPTY = np.zeros(0, dtype=np.uint8)


def _codes(col, code: dict, names: list) -> np.ndarray:
    """Per row, the int32 code of its value in `names` (`code[None]` for null, new values
    appended): read off a dictionary array's indices through its few dictionary entries
    (`_columns.dictionary_codes`), else the array is dictionary-encoded first."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    entries = col.dictionary.cast(pa.string()).to_pylist()  # a handful: policies or statuses
    for name in entries:
        if name not in code:
            code[name] = len(names)
            names.append(name)
    remap = np.array([code[name] for name in entries] + [code[None]], dtype=np.int32)
    indices = col.indices
    dtype = indices.type.to_pandas_dtype()
    values = np.frombuffer(indices.buffers()[1], dtype=dtype, count=indices.offset + len(indices))[indices.offset:]
    validity = indices.buffers()[0] if indices.null_count else None
    out = np.empty(len(indices), dtype=np.int32)
    _columns.dictionary_codes(values, _EMPTY if validity is None else np.frombuffer(validity, dtype=np.uint8),
                              indices.offset, remap, out)
    return out


def _int64_values(col) -> np.ndarray:
    """An int64 column's values (null as 0), without a copy when it has no null."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        col = col.fill_null(0)
    return np.frombuffer(col.buffers()[1], dtype=np.int64, count=col.offset + len(col))[col.offset:]


def _bits(col) -> tuple[np.ndarray, int]:
    """A boolean column's value bitmap and its bit offset (null as false)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        col = col.fill_null(False)
    return np.frombuffer(col.buffers()[1], dtype=np.uint8), col.offset


def _key_table(settler: Settler) -> tuple[np.ndarray, np.ndarray]:
    """(starts, arena) of the settler's accumulator keys, slot order: each key is 4 bytes of
    policy index of its year (native int32), then the person_id bytes (engine/_hashing.pyx)."""
    return settler._keys.export()  # noqa: SLF001 - the key table is the settler's own count of persons


def _key_slots(settler: Settler, policy: np.ndarray, person: pa.Array) -> np.ndarray:
    """The key table's slot of each (policy index, person) key, -1 where it holds none."""
    _, offsets, data = person.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[person.offset:person.offset + len(person) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
    out = np.empty(len(person), dtype=np.int64)
    settler._keys.find_keys(offsets, data, policy.astype(np.int32), out)  # noqa: SLF001 - as _key_table
    return out


def _key_persons(starts: np.ndarray, arena: np.ndarray, first: int) -> pa.Array:
    """The person_id bytes of keys [first, count), without their policy prefixes."""
    starts = starts[first:]
    keep = np.ones(int(starts[-1] - starts[0]), dtype=bool)
    at = starts[:-1] - starts[0]
    for b in range(4):
        keep[at + b] = False
    data = arena[starts[0]:starts[-1]][keep]
    offsets = starts - starts[0] - 4 * np.arange(len(starts), dtype=np.int64)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(starts) - 1,
                                            [None, pa.py_buffer(offsets),
                                             pa.py_buffer(data if len(data) else np.zeros(1, np.uint8))])


def _intern(arrays: list[pa.Array], extra: tuple[int, int] = (0, 0)) -> tuple[ClaimIds, list[np.ndarray]]:
    """The byte strings of `arrays` (non-null) interned in one of the kernel's claim-id tables,
    with each array's ids (dense, numbered in order of first appearance); the table has room
    for `extra` (entries, bytes) more."""
    arrays = [a.cast(pa.binary()) for a in arrays if len(a)]
    table = ClaimIds()
    table.reserve(sum(len(a) for a in arrays) + extra[0], sum(a.nbytes for a in arrays) + extra[1])
    ids = []
    for a in arrays:
        if a.null_count:
            a = a.filter(a.is_valid())
        _, offsets, data = a.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int32)[a.offset:a.offset + len(a) + 1]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
        out = np.empty(len(a), dtype=np.int64)
        table.intern_ids(offsets, data, out)
        ids.append(out)
    return table, ids


def _distinct_persons(starts: Optional[np.ndarray], arena: Optional[np.ndarray], arrays: list[pa.Array]) -> int:
    """Distinct non-null person ids among the keys starts[:-1] of `arena` (read in place, past
    their 4 bytes of policy) and `arrays`, interned in the kernel's claim-id table (a third of the
    time of pc.count_distinct on the ~190k person keys of 1M claims)."""
    keys = 0 if starts is None else len(starts) - 1
    table, _ = _intern(arrays, extra=(keys, 0 if starts is None else int(starts[-1] - starts[0])))
    if keys:
        table.intern_spans(starts, 4, arena, np.empty(keys, dtype=np.int64))
    return len(table)


def _first_of_each(arr: pa.Array) -> np.ndarray:
    """Where each distinct value of `arr` (binary, no null) first appears, as a mask: a row whose
    id is above every id before it (ids are given in order of first appearance)."""
    if not len(arr):
        return np.zeros(0, dtype=bool)
    ids = _intern([arr])[1][0]
    first = np.empty(len(ids), dtype=bool)
    first[0] = True
    first[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    return first


def _lookup_places_rows(policies: PolicySet) -> bool:
    """Whether the kernel's version in force (`_columns.PolicyLookup`, -1 for none) is
    policy_rows for every row: it differs only for a date before its year's first version
    (policy_rows then names that version) and a null settle_time (read as 1970-01-01)."""
    for p in policies.policies:
        first = policies.versions(p.region, p.scheme, p.year)[0]
        if p.year == 1970 or first.effective_from > datetime.date(p.year, 1, 1):
            return False
    return True


class Summary:
    """Accumulates result batches (with their claims' person_id) into the summary figures.

    `settler`: the call that settled them (its policies, and its key table for the persons);
    else `policies` (which error rows' region, scheme and year are looked up in)."""

    def __init__(self, settler: Optional[Settler] = None, policies: Optional[PolicySet] = None):
        if settler is not None:
            policies = settler.compiled.policy_set
        self._settler = settler
        self._policies = policies if policies is not None and policies.policies else None
        # code 0: no policy; then the policies by compiled index (a key's prefix + 1)
        self._names: list[Optional[str]] = [None, *(p.id for p in (policies.policies if policies else ()))]
        self._policy_code = {name: i for i, name in enumerate(self._names)}
        self._statuses: list[Optional[str]] = list(STATUSES)
        self._status_code: dict = {name: i for i, name in enumerate(STATUSES)}
        self._status_code[None] = len(self._statuses)
        self._statuses.append("null")
        self._sums = np.zeros((len(self._names), len(self._statuses), len(AMOUNTS) + 1), dtype=np.int64)
        self._counts = np.zeros((len(self._names), len(self._statuses)), dtype=np.int64)
        self._carried = 0
        self._carried_persons: Optional[pa.Array] = None
        if settler is not None:
            starts, arena = _key_table(settler)
            self._carried = len(starts) - 1  # keys carried in before any claim of this call
            if self._carried:
                self._carried_persons = pc.unique(_key_persons(starts, arena, 0))
        self._pairs: list[tuple[np.ndarray, pa.Array]] = []  # rows the key table may not hold
        # A key names its year's first version, so the key table counts persons per policy year:
        # the rows of a year with several versions are gathered instead, per version.
        self._versioned = np.array([False, *(len(policies.versions(p.region, p.scheme, p.year)) > 1
                                             for p in (policies.policies if policies else ()))], dtype=bool)
        # per policy code, its place among its year's versions (a bit of `_version_bits`) and the
        # compiled index of the year's first version (the prefix of its persons' keys)
        self._version_bit = np.zeros(len(self._names), dtype=np.uint64)
        self._first_index = np.full(len(self._names), -1, dtype=np.int32)
        if policies is not None:
            index = {id(q): i for i, q in enumerate(policies.policies)}
            for code, q in enumerate(policies.policies, start=1):
                versions = policies.versions(q.region, q.scheme, q.year)
                self._version_bit[code] = np.uint64(1) << np.uint64(min(versions.index(q), 63))
                self._first_index[code] = index[id(versions[0])]
        # per key slot, the versions of its year that had an ok row of its person in this call
        # (bits as above): a versioned year's ok rows are counted by their key slots, not gathered
        self._version_bits = np.zeros(0, dtype=np.uint64)
        self.claims = 0
        self._final: Optional[dict] = None
        self._tallied: Optional[collections.deque] = None  # (policy indices, + code, gathered rows) per chunk
        self._totals: Optional[np.ndarray] = None  # the settler's per-policy amounts (counted while settling)

    def _fit(self) -> None:
        """Grow the sums when a batch brought a policy or status not seen before."""
        shape = (len(self._names), len(self._statuses))
        if self._counts.shape != shape:
            grow = [(0, shape[0] - self._counts.shape[0]), (0, shape[1] - self._counts.shape[1])]
            self._counts = np.pad(self._counts, grow)
            self._sums = np.pad(self._sums, grow + [(0, 0)])
            self._versioned = np.pad(self._versioned, grow[0])

    def counted_while_settling(self) -> Optional[Callable]:
        """The `Settler.each` hook (for this summary's settler) that counts each chunk on the
        settling thread, from the kernel's outputs while they are in the cache (the version in force per
        row places an error row as policy_rows does: no code conversion, no lookup); None when it
        cannot stand for `add`'s counting (no settler, or a policy set where the kernel's lookup
        and policy_rows part: a year whose first version starts after 1 January, or a policy for
        1970, the year a null settle_time reads as). `add` then takes only the persons."""
        if self._settler is None or self._policies is None or not _lookup_places_rows(self._policies):
            return None
        if any(len(self._policies.versions(p.region, p.scheme, p.year)) > 64 for p in self._policies.policies):
            return None  # more versions in a year than a slot's bits hold: `add` gathers their rows
        self._tallied = collections.deque()
        self._totals = self._settler.keep_totals()  # the amounts, added up as results are built
        return self._tally

    def _tally(self, chunk, out, results) -> None:
        """Counts and cap hits of a chunk from the kernel's arrays, in one pass
        (`_columns.chunk_tally`; the settler adds up the amounts, `Settler.keep_totals`): an ok
        row of a versioned year marks its key slot with its version's bit (its person is counted
        from the slots, not gathered); error rows are gathered."""
        n = chunk.prep.n
        top = len(self._settler._keys)  # noqa: SLF001 - every slot of this chunk is below it
        if top > len(self._version_bits):
            self._version_bits = np.pad(self._version_bits, (0, max(top, 2 * len(self._version_bits))
                                                              - len(self._version_bits)))
        gathered = np.empty(n, dtype=np.int64)
        k = _columns.chunk_tally(chunk.prep.policy, out.status, _OK, out.cap_hit, self._versioned.view(np.uint8),
                                 chunk.slot, self._version_bit, self._version_bits, self._counts, self._sums, gathered)
        self._tallied.append((chunk.prep.policy, 1, gathered[:k].copy()))  # code: policy index + 1

    def add(self, results, claims=None) -> None:
        """One results batch. With its claims (row-aligned), persons are counted, and an error row
        counts under the policy its region, scheme and year name (its result has no policy_id)
        rather than under "(no policy)". Counts and sums are one pass in `_columns.summary_tally`,
        here or, with `counted_while_settling`, on the settling thread."""
        n = results.num_rows
        self.claims += n
        self._final = None
        if self._tallied is not None:
            policy, shift, gathered = self._tallied.popleft()  # the same chunk, counted already
        elif not n:
            return
        else:
            policy, gathered = self._count(results, claims)
            shift = 0
        if claims is not None and n:
            person = claims.column("person_id")
            if isinstance(person, pa.ChunkedArray):
                person = person.combine_chunks()
            if pa.types.is_dictionary(person.type):
                person = person.cast(person.type.value_type)
            if self._settler is None:
                rows = None  # no key table: every row
            else:
                rows = gathered  # error rows, and rows of a year with several versions
                if self._carried_persons is not None:
                    carried = np.asarray(pc.is_in(person.cast(pa.large_binary()), value_set=self._carried_persons)
                                         .fill_null(False), dtype=bool)
                    rows = np.union1d(rows, np.flatnonzero(carried))
            if rows is None:
                self._pairs.append((policy + shift, person))
            elif len(rows):
                self._pairs.append((policy[rows] + shift, person.take(pa.array(rows))))

    def _count(self, results, claims) -> tuple[np.ndarray, np.ndarray]:
        """Counts and sums of a results batch; (policy code per row, the rows to gather)."""
        n = results.num_rows
        policy = _codes(results.column("policy_id"), self._policy_code, self._names)
        status = _codes(results.column("status"), self._status_code, self._statuses)
        self._fit()
        if claims is not None and self._policies is not None:
            unplaced = np.flatnonzero((status != _OK) & (policy == 0))
            if len(unplaced):
                which = policy_rows(claims.select(list(PLACE_COLUMNS)).take(pa.array(unplaced)), self._policies)
                policy[unplaced] = np.asarray(which.fill_null(-1), dtype=np.int32) + 1
        caps, cap_offset = _bits(results.column("cap_hit"))
        gathered = np.empty(n, dtype=np.int64)
        k = _columns.summary_tally(policy, status, _OK, [_int64_values(results.column(a)) for a in AMOUNTS],
                                   caps, cap_offset, self._versioned.view(np.uint8), self._counts, self._sums,
                                   gathered)
        return policy, gathered[:k]

    def _persons(self) -> tuple[np.ndarray, int]:
        """Persons per policy code, and in all: the key table's keys of this call's claims, and
        the gathered rows' (policy, person) pairs that are not among them."""
        per = np.zeros(len(self._names), dtype=np.int64)
        persons: list[pa.Array] = []
        gathered = None  # the distinct gathered pairs: (policy codes, persons)
        if self._pairs:
            policy = np.concatenate([p for p, _ in self._pairs]).astype(np.int32)
            person = pa.chunked_array([q.cast(pa.large_binary()) for _, q in self._pairs],
                                      pa.large_binary()).combine_chunks()
            if person.null_count:
                valid = np.asarray(person.is_valid(), dtype=bool)
                policy, person = policy[valid], person.filter(pa.array(valid))
            # each distinct (policy, person) pair once: its key as in the key table (4 bytes of
            # policy index, code - 1, then the person), the first row of each key kept
            prefix = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), len(policy), [None, pa.py_buffer(policy - 1)])
            keys = pc.binary_join_element_wise(prefix.cast(pa.large_binary()), person,
                                               pa.scalar(b"", pa.large_binary()))
            first = _first_of_each(keys)
            gathered = policy[first], person.filter(pa.array(first))
            per += np.bincount(gathered[0], minlength=len(per))
            persons.append(gathered[1])
        mine = None  # this call's keys: starts, arena
        if self._settler is not None:
            starts, arena = _key_table(self._settler)
            first = self._carried
            if len(starts) - 1 > first:
                mine = starts[first:], arena
                policy = np.empty(len(starts) - 1 - first, dtype=np.int32)
                self._settler._keys.key_policies(first, policy)  # noqa: SLF001 - as _key_table
                policy += 1
                single = ~self._versioned[policy]  # a versioned year's keys: counted per version below
                per += np.bincount(policy[single], minlength=len(per))[:len(per)]
                if gathered is not None and len(gathered[0]):
                    # a gathered pair whose key this call added to the table is counted once: the
                    # few gathered keys are looked up in the table (which hashes none of its own)
                    # (a versioned year's pairs are not: its keys are not counted from the table)
                    codes, who = gathered
                    plain = np.flatnonzero(~self._versioned[codes])
                    slots = _key_slots(self._settler, codes[plain] - 1, who.take(pa.array(plain)))
                    per -= np.bincount(codes[plain][slots >= first], minlength=len(per))[:len(per)]
            if len(self._version_bits):
                # a versioned year's persons: the slots marked with each version's bit, and the
                # gathered pairs of that version not among them
                bits = self._version_bits
                for code in np.flatnonzero(self._versioned).tolist():
                    per[code] += int(np.count_nonzero(bits & self._version_bit[code]))
                if gathered is not None and len(gathered[0]):
                    codes, who = gathered
                    versioned = np.flatnonzero(self._versioned[codes])
                    if len(versioned):
                        codes = codes[versioned]
                        slots = _key_slots(self._settler, self._first_index[codes], who.take(pa.array(versioned)))
                        marked = np.zeros(len(slots), dtype=bool)
                        found = (slots >= 0) & (slots < len(bits))
                        marked[found] = (bits[slots[found]] & self._version_bit[codes[found]]) != 0
                        per -= np.bincount(codes[marked], minlength=len(per))[:len(per)]
        return per, _distinct_persons(*(mine or (None, None)), persons)

    def figures(self) -> dict:
        """The summary as plain data: counts, amounts in integer fen, per policy and in total."""
        if self._final is not None:
            return self._final
        persons, total_persons = self._persons()

        def entry(counts: np.ndarray, sums: np.ndarray, n_persons: int) -> dict:
            errors = {self._statuses[s]: int(counts[s]) for s in range(len(counts)) if s != _OK and counts[s]}
            return {"claims": int(counts.sum()), "persons": int(n_persons), "ok": int(counts[_OK]),
                    "errors": errors, "amounts_fen": {a: int(sums[:, j].sum()) for j, a in enumerate(AMOUNTS)},
                    "cap_hits": int(sums[:, _CAP_HITS].sum())}

        sums = self._sums
        if self._totals is not None:  # what ok rows paid, added up by the settler
            sums = sums.copy()
            sums[:len(self._totals), _OK, :len(AMOUNTS)] += self._totals
        rows = [{"policy_id": self._names[c], **entry(self._counts[c], sums[c], persons[c])}
                for c in range(len(self._names)) if self._counts[c].any()]
        rows.sort(key=lambda r: (r["policy_id"] is None, r["policy_id"] or ""))
        total = entry(self._counts.sum(axis=0), sums.sum(axis=0), total_persons)
        self._final = {**total, "policies": rows}
        return self._final

    def to_json(self, elapsed: Optional[float] = None) -> str:
        out = dict(self.figures())
        if elapsed is not None:
            out["elapsed_s"] = round(elapsed, 3)
        return json.dumps(out, indent=2, ensure_ascii=False) + "\n"

    def lines(self, elapsed: Optional[float] = None) -> list[str]:
        """The tables an office reads: counts per policy, then amounts per policy and fund, in yuan."""
        f = self.figures()
        codes = list(f["errors"])
        errors = f["claims"] - f["ok"]
        out = [f"claims {f['claims']:,}   persons {f['persons']:,}   ok {f['ok']:,}   errors {errors:,}"]
        if elapsed is not None:
            rate = f["claims"] / elapsed if elapsed > 0 else 0.0
            out[0] += f"   elapsed {elapsed:.3f} s ({rate:,.0f} claims/s)"
        rows = f["policies"] + [{"policy_id": "total", **{k: v for k, v in f.items() if k != "policies"}}]
        name = [NO_POLICY if r["policy_id"] is None else r["policy_id"] for r in rows]
        counts = [["policy", "claims", "persons", "ok", *codes]]
        counts += [[n, f"{r['claims']:,}", f"{r['persons']:,}", f"{r['ok']:,}",
                    *[f"{r['errors'].get(c, 0):,}" for c in codes]] for n, r in zip(name, rows)]
        out += ["", *_table(counts)]
        amounts = [["paid (yuan)", *[_HEAD[a] for a in AMOUNTS], "cap hits"]]
        amounts += [[n, *[format_yuan(r["amounts_fen"][a]) for a in AMOUNTS], f"{r['cap_hits']:,}"]
                    for n, r in zip(name, rows) if r["policy_id"] is not None]
        out += ["", *_table(amounts)]
        return out


def _table(rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned figures, a rule under the head and above the total."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [line(r) for r in rows]
    return [body[0], rule, *body[1:-1], rule, body[-1]] if len(body) > 2 else [body[0], rule, *body[1:]]
