"""Group commit: the single writer that settles, reverses and commits.

Every call that changes state (Settle, PreSettle, Reverse, UpsertPersons)
reaches the `GroupWriter` as a `Pending`, through whichever transport carries
it (server/writer.py: a thread, or a process of its own). The paced loop
(`writer.run_group_loop`) takes everything waiting (up to `max_batch`), and
for that group the GroupWriter, inside one unit of work of the store
(`Store.group()`):

1. looks up, in one query each, the ledger rows of the group's claim ids, the
   registry records of its persons and the stored accumulators of its keys;
2. answers what needs no settlement (bad requests, unknown persons, retries
   of settled claims, duplicates);
3. puts each remaining request in a *round*: a person's first request of the
   group in round 0, their next one in round 1, and so on, so that a person's
   requests are applied in arrival order and each one sees the accumulators
   left by the one before (a settlement that sorts after the person's previous
   settlement by (settle_time, claim_id) shares its round: the engine settles
   them in that order, which is then also the arrival order); requests of
   different persons share rounds;
4. per round, applies the reversals (deltas taken off) and settles the
   claims as ONE engine chunk (`engine.Settler.settle_batch`, carried-in
   accumulators of the round's keys), advancing each key by the claim's deltas;
5. writes the new ledger rows and the changed accumulator rows in ONE
   transaction and only then answers the group's calls. A failed commit
   answers every state-changing call of the group with STORE_FAILURE
   (UNAVAILABLE) and records nothing. When another writer (a second instance
   on the same PostgreSQL database) committed one of the group's claim ids
   first, the store says so (`LedgerConflict`) and the group is run again
   from its lookups, where the claim is then a replay.

Requests arriving while a group is being settled wait for the next group, so
the group size follows the load. `min_interval` paces the groups (a group
starts at least that long after the previous one, unless `max_batch` calls are
waiting): a request arriving at an idle writer is settled at once, and under
load the engine's fixed cost per call is shared by more claims. A request whose claim id already occurs earlier in the
group (a concurrent retry, or a reversal racing its settlement) is deferred to
the next group, and with it every later request of that person.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Optional

import grpc

from ._proto import settlement_pb2 as pb
from .core import Acc, Core, Outcome, Work, delta_layers, precheck
from .errors import CallError
from .facilities import VERSION_KEY as FACILITY_VERSION_KEY, FacilityBook, decode as decode_facilities, store_upload
from .limits import MAX_REASON_LEN, prefix
from .registry import basis_at, person_from_row
from .store import AccumulatorRow, LedgerConflict, LedgerEntry, Store, StoreUnavailable, now_us

log = logging.getLogger("medsettle.server")
E = pb.ErrorCode

#: Request kinds, the same for every transport (and the frame kinds of the writer process).
SETTLE, REVERSE, UPSERT, PRESETTLE = 1, 2, 3, 4
#: A facility registry upload (server/facilities.py): JSON records.
FACILITIES = 5

#: How often a group is re-run after another writer committed one of its claim ids first.
CONFLICT_RETRIES = 5

#: A commit slower than this is logged: every call of its group waited for the disk.
SLOW_COMMIT_S = 0.05

#: Engine statuses that outrank DUPLICATE_CLAIM (spec section 7).
BEFORE_DUPLICATE = frozenset({E.MISSING_FIELD, E.INVALID_VALUE, E.INVALID_AMOUNT, E.AMOUNT_OUT_OF_RANGE,
                              E.AMOUNT_MISMATCH, E.UNKNOWN_POLICY, E.UNKNOWN_IDENTITY})


class Pending:
    """One queued call: kind, payload (Claim, ReverseRequest, a list of PersonRow, or the
    CallError of a request that could not be read) and `ref`, what the transport needs to
    answer it (its future, or a request id)."""

    __slots__ = ("kind", "payload", "ref")

    def __init__(self, kind: int, payload, ref=None):
        self.kind = kind
        self.payload = payload
        self.ref = ref


def _fmt_us(us: int) -> str:
    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=us)).isoformat(sep=" ", timespec="seconds") + " UTC"


# --------------------------------------------------------------------------- shared answers


def record_pb(settle_row: LedgerEntry, reverse_row: Optional[LedgerEntry]) -> pb.SettlementRecord:
    rec = pb.SettlementRecord(claim_id=settle_row.claim_id, claim=pb.Claim.FromString(settle_row.claim),
                              settlement=pb.SettleResponse.FromString(settle_row.response),
                              state=pb.SETTLEMENT_STATE_SETTLED)
    # entries stored before inputs were bounded (issue 15) may hold unknown fields or a reason of
    # megabytes: the answer stays within a client's default 4 MB receive limit
    rec.claim.DiscardUnknownFields()
    if reverse_row is not None:
        rec.state = pb.SETTLEMENT_STATE_REVERSED
        rec.reversal_seq = reverse_row.seq
        rec.reversed_at_us = reverse_row.recorded_at_us
        rec.reversal_reason = prefix(reverse_row.reason or "", MAX_REASON_LEN)
    return rec


def differing_fields(a: pb.Claim, b: pb.Claim) -> list:
    names = [f.name for f in pb.Claim.DESCRIPTOR.fields]
    return [n for n in names if getattr(a, n) != getattr(b, n) or (
        n == "settle_time_us" and a.HasField(n) != b.HasField(n))]


def retry_answer(core: Core, claim: pb.Claim, claim_bytes: bytes, rows: dict, persons: dict):
    """The answer to a Settle (or PreSettle) of a claim_id that the ledger holds:
    the stored response (replayed), DUPLICATE_CLAIM, a validation error that
    outranks it, or CLAIM_REVERSED."""
    srow = rows["settle"]
    if srow.claim != claim_bytes:
        stored = pb.Claim.FromString(srow.claim)
        # spec section 7: a validation error of this claim outranks DUPLICATE_CLAIM
        person = persons.get(claim.person_id)
        if person is not None:
            try:
                basis = basis_at(person, claim.settle_time_us, claim.claim_id)
            except CallError as e:
                return e
            w = Work(claim, basis, (claim.person_id, basis.region, basis.scheme, basis.year))
            oc = core.settle([w], {})[0]
            if isinstance(oc, CallError) and oc.code in BEFORE_DUPLICATE:
                return oc
        if stored.facility_id != claim.facility_id:  # say nothing of another facility's claim (issue 15)
            return CallError(E.DUPLICATE_CLAIM, f"claim_id {claim.claim_id} is already used by another facility's "
                             "settlement; give this settlement a new claim_id (prefix ids with the facility's)",
                             field="claim_id", claim_id=claim.claim_id, person_id=claim.person_id)
        diff = ", ".join(differing_fields(claim, stored)) or "unknown fields"
        return CallError(E.DUPLICATE_CLAIM,
                         f"claim_id {claim.claim_id} was settled at {_fmt_us(srow.recorded_at_us)} (ledger seq "
                         f"{srow.seq}) with other content (differs in: {diff}); settle a new visit under a new "
                         f"claim_id, or fetch the stored settlement with GetSettlement",
                         field="claim_id", claim_id=claim.claim_id, person_id=claim.person_id)
    if "reverse" in rows:
        r = rows["reverse"]
        return CallError(E.CLAIM_REVERSED,
                         f"claim_id {claim.claim_id} was settled (ledger seq {srow.seq}) and reversed at "
                         f"{_fmt_us(r.recorded_at_us)} (ledger seq {r.seq}); a reversed claim_id is never "
                         f"settled again: settle the visit again under a new claim_id",
                         field="claim_id", claim_id=claim.claim_id, person_id=claim.person_id)
    resp = pb.SettleResponse.FromString(srow.response)
    resp.replayed = True
    return resp.SerializeToString()


def person_not_found(claim: pb.Claim) -> CallError:
    return CallError(E.PERSON_NOT_FOUND,
                     f"person {claim.person_id} is not in the registry; register them (Registry.UpsertPersons) "
                     f"before settling, or check the person_id", field="person_id", claim_id=claim.claim_id,
                     person_id=claim.person_id)


# --------------------------------------------------------------------------- the group writer


class GroupWriter:
    """Settles, reverses and commits groups of calls (whatever transport brings them).

    `process(items)` returns [(item, answer)] for every item it answered: bytes
    (a serialized response), an int (persons stored), or a CallError. Items it
    defers (see the module doc) are kept and processed first next time
    (`has_deferred`). `person_cache`: registry records kept between groups (0
    when other instances may change the registry: every group then reads it)."""

    def __init__(self, store: Store, core: Core, *, person_cache: int = 200_000):
        self.store = store
        self.core = core
        self.deferred: list = []
        self._persons: dict = {}
        self._person_cache = person_cache
        self.facilities = FacilityBook()  # the facility registry (server/facilities.py)
        self.on_group = None  # (group size, commit seconds) -> None: metrics (server/metrics.py)
        self.stats = {"groups": 0, "items": 0, "settled": 0, "reversed": 0, "commit_failures": 0,
                      "slow_commits": 0, "max_group": 0, "conflicts": 0}
        self._unavailable = 0
        self._last_unavailable_log = -1e9

    @property
    def has_deferred(self) -> bool:
        return bool(self.deferred)

    def process(self, items: list) -> list:
        items = self.deferred + items
        self.deferred = []
        answers: list = []
        try:
            run: list = []
            for it in items:  # registry uploads are their own transactions, in order
                if it.payload.__class__ is CallError:  # a request the transport could not read
                    answers.append((it, it.payload))
                elif it.kind in (UPSERT, FACILITIES):
                    if run:
                        answers.extend(self._group(run))
                        run = []
                    answers.append(self._upsert(it) if it.kind == UPSERT else self._upsert_facilities(it))
                else:
                    run.append(it)
            if run:
                answers.extend(self._group(run))
        except Exception as e:  # never let the writer die: fail what is unanswered, keep serving
            self._log_failure("group failed", e)
            self._persons.clear()
            done = {id(it) for it, _ in answers}
            err = CallError(E.STORE_FAILURE, f"the settlement could not be recorded ({type(e).__name__}: {e}); "
                            "nothing was recorded, retry")
            answers.extend((it, err) for it in items if id(it) not in done)
            self.deferred = []
        return answers

    def _log_failure(self, what: str, e: Exception) -> None:
        """A store that cannot be reached is logged in one line, at most once a second (calls
        keep failing fast until it is back); anything else with its traceback."""
        if isinstance(e, StoreUnavailable):
            now = time.monotonic()
            self._unavailable += 1
            if now - self._last_unavailable_log >= 1.0:
                log.error("writer: %s (%d times since the last message): %s", what, self._unavailable, e)
                self._last_unavailable_log = now
                self._unavailable = 0
        else:
            log.exception("writer: %s", what)

    def _upsert(self, it: Pending):
        rows = it.payload
        try:
            self.store.upsert_persons(rows)
        except Exception as e:
            log.exception("writer: registry upload failed")
            return (it, CallError(E.STORE_FAILURE, f"the registry upload could not be stored ({e}); "
                                                   "nothing of this part was stored, retry"))
        for r in rows:
            self._persons.pop(r[0], None)
        return (it, len(rows))

    def _upsert_facilities(self, it: Pending):
        """A facility registry upload (JSON records, checked by the front-end): merged and stored
        in one transaction, in order with the settlements around it."""
        try:
            upload = decode_facilities(it.payload)
            self.facilities.by_id = store_upload(self.store, upload)
            self.facilities.version = None  # re-read at the next group
        except Exception as e:
            log.exception("writer: facility registry upload failed")
            return (it, CallError(E.STORE_FAILURE, f"the facility registry upload could not be stored ({e}); "
                                                   "nothing of it was stored, retry"))
        return (it, len(upload))

    def _lookup(self, g, claim_ids: list, person_ids: set) -> tuple:
        """(ledger entries of the claim ids, Person or None per person id): the persons come from
        the cache where it has them; what is missing is read with the ledger entries in one go."""
        cache = self._persons
        if not self._person_cache:
            ledger, found = g.lookup(claim_ids, person_ids)
            return ledger, {pid: (person_from_row(found[pid]) if pid in found else None) for pid in person_ids}
        missing = [pid for pid in person_ids if pid not in cache]
        ledger, found = g.lookup(claim_ids, missing)
        if missing:
            if len(cache) + len(missing) > self._person_cache:
                cache.clear()
            for pid in missing:
                row = found.get(pid)
                cache[pid] = person_from_row(row) if row is not None else None
        return ledger, {pid: cache[pid] for pid in person_ids}

    def _group(self, items: list) -> list:
        for attempt in range(CONFLICT_RETRIES + 1):
            deferred_before = len(self.deferred)
            try:
                with self.store.group() as g:
                    return self._group_once(g, items)
            except LedgerConflict as e:
                # another writer committed one of these claim ids first: nothing of ours is stored;
                # run the group again (those claims are then replays or duplicates)
                del self.deferred[deferred_before:]
                self.stats["conflicts"] += 1
                if attempt == CONFLICT_RETRIES:
                    log.warning("writer: group of %d still conflicting after %d attempts: %s", len(items),
                                attempt + 1, e)
                    err = CallError(E.STORE_FAILURE, "the settlement could not be recorded (other instances "
                                    "kept committing the same claims); nothing was recorded, retry")
                    return [(it, err) for it in items]
        raise AssertionError("unreachable")

    def _group_once(self, g, items: list) -> list:
        core = self.core
        book = self.facilities
        answers: list = []
        deferred: list = []
        claim_ids = [it.payload.claim_id for it in items if it.payload.claim_id]
        settle_persons = {it.payload.person_id for it in items if it.kind != REVERSE and it.payload.person_id}
        # the persons whose keys the group will touch (those of reversals come from the ledger),
        # how many entries it may number at most: a store may lock and read ahead with the lookups
        # how many entries it may number at most, and the facility registry's version (a change by
        # another instance is seen from the next group): a store may read all this with the lookups
        g.prepare(settle_persons, sum(it.kind != PRESETTLE for it in items), (FACILITY_VERSION_KEY,))
        ledger, persons = self._lookup(g, claim_ids, settle_persons)
        book.refresh(self.store, g.meta(FACILITY_VERSION_KEY))

        seen: dict = {}  # claim_id -> person_id, for the group so far
        blocked: set = set()  # persons with a deferred request
        last_round: dict = {}
        rounds: list = []
        claim_bytes: dict = {}

        last_entry: dict = {}  # person -> (kind, settle_time_us, claim_id bytes) of their last entry

        def place(pid, entry, order_key=None):
            """A person's entry goes to a new round after their previous one, except that a claim
            joins the round of the person's previous settlement when it sorts after it: the engine
            settles a chunk in (settle_time, claim_id) order, which is then the arrival order."""
            prev = last_entry.get(pid)
            r = last_round.get(pid, -1) + 1
            if prev is not None and order_key is not None and prev[0] == SETTLE and prev[1:] < order_key:
                r -= 1
            last_round[pid] = r
            last_entry[pid] = (entry[0].kind, *order_key) if order_key is not None else (entry[0].kind,)
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(entry)

        for it in items:
            if it.kind != REVERSE:  # SETTLE, PRESETTLE
                c = it.payload
                err = precheck(c)
                if err is not None:
                    answers.append((it, err))
                    continue
                cid, pid = c.claim_id, c.person_id
                if cid in seen or pid in blocked:
                    deferred.append(it)
                    blocked.add(pid)
                    continue
                seen[cid] = pid
                if book.by_id:  # level and locality from the registries, before the content is compared
                    person = persons.get(pid)
                    err = book.check(c, person.region if person is not None else None)
                    if err is not None:
                        answers.append((it, err))
                        continue
                cb = c.SerializeToString(deterministic=True)
                rows = ledger.get(cid)
                if rows is not None and "settle" in rows:
                    answers.append((it, retry_answer(core, c, cb, rows, persons)))
                    continue
                person = persons.get(pid)
                if person is None:
                    answers.append((it, person_not_found(c)))
                    continue
                try:
                    basis = basis_at(person, c.settle_time_us, cid)
                except CallError as e:
                    answers.append((it, e))
                    continue
                claim_bytes[id(it)] = cb
                place(pid, (it, Work(c, basis, (pid, basis.region, basis.scheme, basis.year))),
                      (c.settle_time_us, cid.encode()))
            else:  # REVERSE
                req = it.payload
                cid = req.claim_id
                if not cid:
                    answers.append((it, CallError(E.MISSING_FIELD, "claim_id is empty; give the id of the "
                                                  "settlement to reverse", field="claim_id")))
                    continue
                if not req.facility_id:
                    answers.append((it, CallError(E.MISSING_FIELD, "facility_id is empty; give the id of the "
                                                  "facility that settled the claim", field="facility_id",
                                                  claim_id=cid)))
                    continue
                if cid in seen:
                    deferred.append(it)
                    blocked.add(seen[cid])
                    continue
                rows = ledger.get(cid) or {}
                srow = rows.get("settle")
                if srow is None:
                    answers.append((it, CallError(E.CLAIM_NOT_FOUND, f"no settlement with claim_id {cid}; check "
                                                  f"the id (nothing was reversed)", field="claim_id",
                                                  claim_id=cid)))
                    continue
                pid = srow.person_id
                seen[cid] = pid
                if srow.facility_id != req.facility_id:  # naming neither the facility nor the person
                    answers.append((it, CallError(
                        E.FACILITY_MISMATCH, f"claim {cid} was not settled by facility {req.facility_id}; only the "
                        f"settling facility may reverse it", field="facility_id", claim_id=cid)))
                    continue
                if pid in blocked:
                    deferred.append(it)
                    continue
                place(pid, (it, rows))

        # stored accumulators of every key the rounds touch (the store holds them for this group)
        keys = set()
        for rnd in rounds:
            for it, x in rnd:
                keys.add(x["settle"].key if it.kind == REVERSE else x.key)
        accs = {k: Acc.from_blob(v) for k, v in g.accumulators(keys).items()} if keys else {}

        ledger_out: list = []
        changed: dict = {}  # key -> seq of its last change
        committing: list = []  # (item, bytes) answered only if the commit succeeds
        now = now_us()
        last_state: dict = {}  # key -> Accumulators message of its last settlement in the group
        for rnd in rounds:
            works, items_w, apply = [], [], []
            for it, x in rnd:
                if it.kind == REVERSE:
                    self._reverse(g, it, x, accs, now, ledger_out, changed, committing, answers)
                    last_state.pop(x["settle"].key, None)
                else:
                    works.append(x)
                    items_w.append(it)
                    apply.append(it.kind == SETTLE)
            if not works:
                continue
            outcomes = core.settle(works, accs, apply)
            for it, w, oc in zip(items_w, works, outcomes):
                if not isinstance(oc, Outcome):
                    answers.append((it, oc))
                    continue
                resp = oc.response
                if it.kind == PRESETTLE:
                    answers.append((it, resp.SerializeToString()))
                    continue
                seq = g.next_seq()
                resp.ledger_seq = seq
                resp.recorded_at_us = now
                data = resp.SerializeToString()
                last_state[w.key] = resp.accumulators
                c = w.claim
                ledger_out.append(LedgerEntry(seq, "settle", c.claim_id, c.facility_id, *w.key, oc.d_adm, oc.d_ct,
                                              resp.delta.SerializeToString(), claim_bytes[id(it)], data, None, now))
                changed[w.key] = seq
                committing.append((it, data))

        st = self.stats
        if ledger_out:
            acc_rows = [AccumulatorRow(*key, accs[key].admissions, accs[key].compliant_total,
                                       (last_state[key] if key in last_state else
                                        accs[key].to_pb(key, core.column_order(key))).SerializeToString(), s)
                        for key, s in changed.items()]
            try:
                t0 = time.monotonic()
                g.commit(ledger_out, acc_rows)
                took = time.monotonic() - t0
                if self.on_group is not None:
                    self.on_group(len(items), took)
                if took > SLOW_COMMIT_S:
                    st["slow_commits"] += 1
                    log.warning("writer: a commit of %d ledger rows took %.0f ms (the store's disk was slow to "
                                "sync); the calls of its group waited for it", len(ledger_out), took * 1e3)
                for it, _ in committing:
                    st["settled" if it.kind == SETTLE else "reversed"] += 1
            except LedgerConflict:
                raise
            except Exception as e:
                st["commit_failures"] += 1
                self._log_failure("commit failed", e)
                self._persons.clear()
                err = CallError(E.STORE_FAILURE, f"the settlement could not be recorded ({type(e).__name__}: {e}); "
                                "nothing was recorded, retry")
                committing = [(it, err) for it, _ in committing]
        st["groups"] += 1
        st["items"] += len(items)
        st["max_group"] = max(st["max_group"], len(items))
        answers.extend(committing)
        self.deferred.extend(deferred)
        return answers

    def _reverse(self, g, it, rows, accs, now, ledger_out, changed, committing, answers) -> None:
        core = self.core
        srow, rrow = rows["settle"], rows.get("reverse")
        key = srow.key
        acc = accs.get(key)
        if acc is None:
            acc = accs[key] = Acc()
        order = core.column_order(key)
        if rrow is not None:
            answers.append((it, pb.ReverseResponse(already_reversed=True, record=record_pb(srow, rrow),
                                                   accumulators=acc.to_pb(key, order)).SerializeToString()))
            return
        delta = pb.AccumulatorDelta.FromString(srow.delta)
        d_layers = delta_layers(delta)
        acc.add(delta.admissions, delta.compliant_total, d_layers, sign=-1)
        if not acc.is_valid():
            acc.add(delta.admissions, delta.compliant_total, d_layers, sign=1)
            answers.append((it, CallError(E.STORE_FAILURE, f"reversing {srow.claim_id} would take an "
                                          f"accumulator of {key} below 0: the store is inconsistent; "
                                          f"nothing was reversed, call support",
                                          claim_id=srow.claim_id, grpc_code=grpc.StatusCode.INTERNAL)))
            return
        seq = g.next_seq()
        reason = it.payload.reason
        neg = pb.AccumulatorDelta(admissions=-delta.admissions, compliant_total=-delta.compliant_total,
                                  layers=[pb.LayerAccumulator(layer=e.layer, cap_group=e.cap_group,
                                                              position=-e.position, paid=-e.paid,
                                                              deductible_charged=-e.deductible_charged)
                                          for e in delta.layers])
        rrow = LedgerEntry(seq, "reverse", srow.claim_id, srow.facility_id, *key, -srow.delta_admissions,
                           -srow.delta_compliant_total, neg.SerializeToString(), None, None, reason, now)
        ledger_out.append(rrow)
        changed[key] = seq
        committing.append((it, pb.ReverseResponse(already_reversed=False, record=record_pb(srow, rrow),
                                                  accumulators=acc.to_pb(key, order)).SerializeToString()))
