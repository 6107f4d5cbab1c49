"""What the server asks of a store, whatever the backend (SQLite file, PostgreSQL).

The server never sees SQL: it reads through a `Store` and writes a group of
settlements through the store's `WriteGroup` (the writer's unit of work: look
up, lock the keys, take sequence numbers, commit once). Rows travel as the
named records below, never as positional tuples.

The guarantees every backend keeps: a group's ledger entries and the changed
accumulator rows are committed in one transaction or not at all; a claim_id
has at most one settlement and one reversal (`LedgerConflict` otherwise:
the writer re-reads and retries the group); each key's accumulators are the
carried-in state (`accumulators import`) plus the fold of its ledger deltas;
ledger sequence numbers increase in commit order for any one key.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

from .._proto import settlement_pb2 as pb

#: The schema version this server writes; a store of a newer version is refused.
SCHEMA_VERSION = 2


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing folder, newer schema, lock held, bad URL)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or cannot commit now (a retry later may succeed)."""


class LedgerConflict(StoreError):
    """Another writer committed an entry of one of the group's claim ids first (or the
    group's keys could not be locked in time): nothing of the group is stored, re-run it."""


def check_schema_version(location: str, version: int, store_arg: str) -> None:
    """Refuse a store whose schema is not this server's: both backends word it alike so an
    operator reads one message whichever store is configured."""
    if version > SCHEMA_VERSION:
        raise StoreError(f"{location}: store schema version {version} is newer than this server's "
                         f"({SCHEMA_VERSION}); use a newer medsettle")
    if version < SCHEMA_VERSION:
        raise StoreError(f"{location}: store schema version {version} is older than this server's "
                         f"({SCHEMA_VERSION}); run `medsettle store migrate --store {store_arg}` first")


def now_us() -> int:
    """Server clock, µs since the Unix epoch (UTC)."""
    return time.time_ns() // 1000


Key = tuple  # (person_id, region, scheme, year)


class LedgerEntry(NamedTuple):
    """One ledger row: a settlement, or the reversal of one (negated deltas)."""
    seq: int
    kind: str                    # "settle" | "reverse"
    claim_id: str
    facility_id: str
    person_id: str
    region: str
    scheme: str
    year: int
    delta_admissions: int        # signed: a reversal carries the negated deltas
    delta_compliant_total: int
    delta: bytes                 # medsettle.v1.AccumulatorDelta
    claim: Optional[bytes]       # settle: medsettle.v1.Claim as sent (deterministic bytes)
    response: Optional[bytes]    # settle: medsettle.v1.SettleResponse as returned
    reason: Optional[str]        # reverse: the caller's reason
    recorded_at_us: int

    @property
    def key(self) -> Key:
        return (self.person_id, self.region, self.scheme, self.year)


class AccumulatorRow(NamedTuple):
    """The stored accumulators of one key after its last change."""
    person_id: str
    region: str
    scheme: str
    year: int
    admissions: int
    compliant_total: int
    state: bytes                 # medsettle.v1.Accumulators
    last_seq: int                # ledger seq of the last change (0: carried in, never settled)

    @property
    def key(self) -> Key:
        return (self.person_id, self.region, self.scheme, self.year)


class PersonRow(NamedTuple):
    """A registry record as stored."""
    person_id: str
    region: str
    scheme: str
    birth_days: int              # days since 1970-01-01
    identities: str              # JSON [[identity, from_days|null, to_days|null], ...]


LEDGER_FIELDS = LedgerEntry._fields
ACCUMULATOR_FIELDS = AccumulatorRow._fields
PERSON_FIELDS = PersonRow._fields


class Migration(NamedTuple):
    """One step of a backend's schema: the store is at `version` once its statements ran."""
    version: int
    name: str
    statements: tuple


class WriteGroup(Protocol):
    """The writer's unit of work for one group of calls."""

    def ledger(self, claim_ids: Iterable[str]) -> dict:
        """claim_id -> {kind: LedgerEntry} for the entries of those claims."""

    def persons(self, person_ids: Iterable[str]) -> dict:
        """person_id -> PersonRow for those registered."""

    def lookup(self, claim_ids: Sequence[str], person_ids: Iterable[str]) -> tuple:
        """(ledger(claim_ids), persons(person_ids)) at once (either may be empty)."""

    def accumulators(self, keys: Iterable[Key]) -> dict:
        """key -> state bytes of those stored; the keys are this group's until it ends
        (no other writer changes them before the commit)."""

    def prepare(self, person_ids: Iterable[str], entries: int, meta_keys: Sequence[str] = ()) -> None:
        """A hint given first: the persons whose keys the group will touch (more may follow in
        `accumulators`, e.g. those of reversals), at most how many entries it will number, and
        the meta entries the group will ask for (`meta`): a store may read them with the lookups."""

    def meta(self, key: str) -> Optional[str]:
        """A meta entry as the group sees it (read with its lookups when `prepare` named it)."""

    def next_seq(self) -> int:
        """The sequence number of the group's next ledger entry."""

    def commit(self, entries: Sequence[LedgerEntry], accumulators: Sequence[AccumulatorRow]) -> None:
        """Stores the entries and the changed accumulator rows in one transaction.
        Raises LedgerConflict (nothing stored, re-run the group) or another error (nothing stored)."""


class Store(Protocol):
    """A store the server uses without knowing the backend."""

    location: str                # the path or URL it was opened from (without a password)

    # ---- lifecycle
    def close(self) -> None: ...
    def start_background(self) -> None:
        """Starts what the backend runs beside the writer (SQLite: the WAL checkpointer)."""

    def schema_version(self) -> int: ...

    # ---- reads (any thread; the last committed state)
    def persons(self, person_ids: Iterable[str]) -> dict: ...
    def ledger(self, claim_ids: Iterable[str]) -> dict: ...
    def accumulators_of(self, person_id: str, year: Optional[int] = None) -> list: ...
    def settled_by(self, facility_id: str, person_id: str) -> bool:
        """Whether the ledger holds a settlement of this person by this facility (authorization)."""
    def get_meta(self, key: str) -> Optional[str]: ...
    def max_seq(self) -> int: ...
    def iter_ledger(self, year: Optional[int] = None, batch: int = 10_000) -> Iterator[list]:
        """The ledger in seq order, as lists of LedgerEntry of at most `batch` (bounded memory)."""
    def iter_accumulators(self) -> Iterator[AccumulatorRow]: ...
    def iter_carried(self) -> Iterator[AccumulatorRow]: ...

    # ---- writes
    def group(self) -> WriteGroup:
        """A context manager: the writer's unit of work (rolled back unless committed)."""
    def upsert_persons(self, rows: Sequence[PersonRow]) -> None: ...
    def update_meta(self, key: str, fn: Callable[[Optional[str]], dict]) -> dict:
        """Read-modify-write of a `meta` entry: `fn(value of key or None)` returns the meta
        entries to write; the read and the write are one transaction that holds off every other
        update_meta of `key`, from any instance (a merge never loses another's); returns them."""
    def import_persons(self, chunks: Iterable[Sequence[PersonRow]], meta: dict) -> int:
        """All the chunks and the meta entries in one transaction; returns the persons stored."""
    def import_carried(self, parts: Iterable[Sequence[AccumulatorRow]]) -> int:
        """Carried-in accumulators (spec section 4), all parts in one transaction; refuses
        (StoreError, nothing imported) keys that already have settlements or carried state."""


# --------------------------------------------------------------------------- audit (any backend)


class Audit:
    """The audit views every backend offers (tests, tools)."""

    def fold_ledger(self) -> dict:
        return fold_ledger(self)

    def stored_accumulators(self) -> dict:
        return stored_accumulators(self)


def _clean(layers: dict) -> dict:
    return {k: v for k, v in sorted(layers.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")) if any(v)}


def _state_fold(rows: Iterable[AccumulatorRow], what: str) -> dict:
    out = {}
    for r in rows:
        st = pb.Accumulators.FromString(r.state)
        if (st.admissions, st.compliant_total) != (r.admissions, r.compliant_total):
            raise StoreError(f"{what} of {r.person_id}: columns disagree with the state blob")
        out[r.key] = [r.admissions, r.compliant_total,
                      {(e.layer, e.cap_group or None): [e.position, e.paid, e.deductible_charged]
                       for e in st.layers}]
    return out


def fold_ledger(store: Store) -> dict:
    """The accumulators implied by the store: carried-in state plus every settlement's
    deltas minus every reversal's: key -> (admissions, compliant_total, {(layer, cap_group
    or None): [position, paid, deductible_charged]}), all-zero layer entries left out."""
    out = _state_fold(store.iter_carried(), "carried accumulators")
    for part in store.iter_ledger():
        for e in part:
            acc = out.setdefault(e.key, [0, 0, {}])
            d = pb.AccumulatorDelta.FromString(e.delta)
            if (d.admissions, d.compliant_total) != (e.delta_admissions, e.delta_compliant_total):
                raise StoreError(f"ledger row of {e.person_id}: delta columns disagree with the delta blob")
            acc[0] += e.delta_admissions
            acc[1] += e.delta_compliant_total
            for x in d.layers:
                v = acc[2].setdefault((x.layer, x.cap_group or None), [0, 0, 0])
                v[0] += x.position
                v[1] += x.paid
                v[2] += x.deductible_charged
    return {k: (a, c, _clean(l)) for k, (a, c, l) in out.items()}


def stored_accumulators(store: Store) -> dict:
    """The accumulators table, in the form of `fold_ledger`."""
    return {k: (a, c, _clean(l)) for k, (a, c, l) in _state_fold(store.iter_accumulators(), "accumulators").items()}
