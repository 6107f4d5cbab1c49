"""Group commit: the single writer that settles, reverses and commits.

Every call that changes state (Settle, Reverse, UpsertPersons) is queued here
as a `Pending` and answered through its asyncio future. One writer thread
takes everything waiting (up to `max_batch`), and for that group:

1. looks up, in one query each, the ledger rows of the group's claim ids, the
   registry records of its persons and the stored accumulators of its keys;
2. answers what needs no settlement (bad requests, unknown persons, retries
   of settled claims, duplicates);
3. puts each remaining request in a *round*: a person's first request of the
   group in round 0, their second in round 1, and so on, so that a person's
   requests are applied in arrival order and each one sees the accumulators
   left by the one before; requests of different persons share rounds;
4. per round, applies the reversals (deltas taken off) and settles the
   claims as ONE engine chunk (`engine.Settler.settle_batch`, carried-in
   accumulators of the round's keys), advancing each key by the claim's deltas;
5. writes the new ledger rows and the changed accumulator rows in ONE SQLite
   transaction (WAL, synchronous=FULL) and only then answers the group's
   calls. A failed commit answers every state-changing call of the group with
   STORE_FAILURE (UNAVAILABLE) and records nothing.

Requests arriving while a group is being settled wait for the next group, so
the group size follows the load. `min_interval` paces the groups (a group
starts at least that long after the previous one, unless `max_batch` calls are
waiting): a request arriving at an idle writer is settled at once, and under
load the engine's fixed cost per call is shared by more claims. A request whose claim id already occurs earlier in the
group (a concurrent retry, or a reversal racing its settlement) is deferred to
the next group, and with it every later request of that person.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Optional

import grpc

from ._proto import settlement_pb2 as pb
from .core import Acc, Core, Outcome, Work, delta_layers, precheck
from .errors import CallError
from .registry import Person, basis_at, person_from_row
from .store import Store, now_us

log = logging.getLogger("medsettle.server")
E = pb.ErrorCode

SETTLE, REVERSE, UPSERT = 1, 2, 3

#: Engine statuses that outrank DUPLICATE_CLAIM (spec section 7).
BEFORE_DUPLICATE = frozenset({E.MISSING_FIELD, E.INVALID_VALUE, E.INVALID_AMOUNT, E.AMOUNT_OUT_OF_RANGE,
                              E.AMOUNT_MISMATCH, E.UNKNOWN_POLICY, E.UNKNOWN_IDENTITY})


class Pending:
    """One queued call: kind, payload (Claim, ReverseRequest or list of persons), the future."""

    __slots__ = ("kind", "payload", "future", "loop")

    def __init__(self, kind: int, payload, future, loop):
        self.kind = kind
        self.payload = payload
        self.future = future
        self.loop = loop


def _fmt_us(us: int) -> str:
    import datetime as dt

    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=us)).isoformat(sep=" ", timespec="seconds") + " UTC"


# --------------------------------------------------------------------------- shared answers


def record_pb(settle_row: dict, reverse_row: Optional[dict]) -> pb.SettlementRecord:
    rec = pb.SettlementRecord(claim_id=settle_row["claim_id"], claim=pb.Claim.FromString(settle_row["claim"]),
                              settlement=pb.SettleResponse.FromString(settle_row["response"]),
                              state=pb.SETTLEMENT_STATE_SETTLED)
    if reverse_row is not None:
        rec.state = pb.SETTLEMENT_STATE_REVERSED
        rec.reversal_seq = reverse_row["seq"]
        rec.reversed_at_us = reverse_row["recorded_at_us"]
        rec.reversal_reason = reverse_row["reason"] or ""
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
    if srow["claim"] != claim_bytes:
        stored = pb.Claim.FromString(srow["claim"])
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
        diff = ", ".join(differing_fields(claim, stored)) or "unknown fields"
        return CallError(E.DUPLICATE_CLAIM,
                         f"claim_id {claim.claim_id} was settled at {_fmt_us(srow['recorded_at_us'])} (ledger seq "
                         f"{srow['seq']}) with other content (differs in: {diff}); settle a new visit under a new "
                         f"claim_id, or fetch the stored settlement with GetSettlement",
                         field="claim_id", claim_id=claim.claim_id, person_id=claim.person_id)
    if "reverse" in rows:
        r = rows["reverse"]
        return CallError(E.CLAIM_REVERSED,
                         f"claim_id {claim.claim_id} was settled (ledger seq {srow['seq']}) and reversed at "
                         f"{_fmt_us(r['recorded_at_us'])} (ledger seq {r['seq']}); a reversed claim_id is never "
                         f"settled again: settle the visit again under a new claim_id",
                         field="claim_id", claim_id=claim.claim_id, person_id=claim.person_id)
    resp = pb.SettleResponse.FromString(srow["response"])
    resp.replayed = True
    return resp.SerializeToString()


def person_not_found(claim: pb.Claim) -> CallError:
    return CallError(E.PERSON_NOT_FOUND,
                     f"person {claim.person_id} is not in the registry; register them (Registry.UpsertPersons) "
                     f"before settling, or check the person_id", field="person_id", claim_id=claim.claim_id,
                     person_id=claim.person_id)


def key_of(row: dict) -> tuple:
    return (row["person_id"], row["region"], row["scheme"], row["year"])


# --------------------------------------------------------------------------- the writer


class Batcher:
    """The writer thread and its queue."""

    def __init__(self, store: Store, core: Core, *, max_batch: int = 1024, max_pending: int = 20_000,
                 min_interval: float = 0.0, person_cache: int = 200_000):
        self.store = store
        self.core = core
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.min_interval = min_interval
        self._last_start = 0.0
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque = deque()
        self._deferred: list = []
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._persons: dict = {}
        self._person_cache = person_cache
        self.stats = {"groups": 0, "items": 0, "settled": 0, "reversed": 0, "commit_failures": 0,
                      "max_group": 0}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medsettle-writer", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def close(self, timeout: Optional[float] = None) -> None:
        """Settles what is queued, then stops the thread."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------ submit (event loop thread)

    def submit(self, item: Pending) -> Optional[CallError]:
        """Queues a call; returns an error instead when it cannot be taken."""
        with self._cv:
            if not self._accepting:
                return CallError(E.SHUTTING_DOWN, "the server is shutting down; retry on another instance or later")
            if len(self._queue) >= self.max_pending:
                return CallError(E.OVERLOADED, f"{len(self._queue)} settlements are waiting; retry with backoff")
            self._queue.append(item)
            if len(self._queue) == 1:
                self._cv.notify()
        return None

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        import os

        prof_path = os.environ.get("MEDSETTLE_PROFILE")
        if prof_path:  # development aid: profile the writer thread, dump at exit
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            try:
                self._loop_forever()
            finally:
                prof.disable()
                prof.dump_stats(prof_path + ".writer")
            return
        self._loop_forever()

    def _loop_forever(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._deferred and not self._stop:
                    self._cv.wait()
                if not self._queue and not self._deferred and self._stop:
                    return
                # pacing: at most one group per min_interval unless a full group is waiting
                if self.min_interval and not self._stop:
                    deadline = self._last_start + self.min_interval
                    while len(self._queue) + len(self._deferred) < self.max_batch and not self._stop:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                items = self._deferred
                self._deferred = []
                q = self._queue
                n = min(len(q), max(0, self.max_batch - len(items)))
                items.extend(q.popleft() for _ in range(n))
            self._last_start = time.monotonic()
            try:
                self._run_items(items)
            except Exception as e:  # never let the writer die: fail the group, keep serving
                log.exception("writer: group failed")
                err = CallError(E.STORE_FAILURE, f"the settlement could not be recorded ({type(e).__name__}: {e}); "
                                "nothing was recorded, retry")
                self._deliver([(it, err) for it in items])

    def _run_items(self, items: list) -> None:
        """Splits off registry uploads (each its own transaction, in order)."""
        run: list = []
        for it in items:
            if it.kind == UPSERT:
                if run:
                    self._group(run)
                    run = []
                self._upsert(it)
            else:
                run.append(it)
        if run:
            self._group(run)

    def _deliver(self, answers: list) -> None:
        by_loop: dict = {}
        for it, value in answers:
            by_loop.setdefault(it.loop, []).append((it.future, value))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pairs)
            except RuntimeError:  # loop closed
                pass

    def _upsert(self, it: Pending) -> None:
        rows = it.payload
        try:
            self.store.upsert_persons(rows)
        except Exception as e:
            log.exception("writer: registry upload failed")
            self._deliver([(it, CallError(E.STORE_FAILURE, f"the registry upload could not be stored ({e}); "
                                                          "nothing of this part was stored, retry"))])
            return
        for r in rows:
            self._persons.pop(r[0], None)
        self._deliver([(it, len(rows))])

    def _load_persons(self, ids) -> dict:
        cache = self._persons
        missing = [pid for pid in ids if pid not in cache]
        if missing:
            if len(cache) + len(missing) > self._person_cache:
                cache.clear()
            found = Store.persons(self.store.conn, missing)
            for pid in missing:
                row = found.get(pid)
                cache[pid] = person_from_row(row) if row is not None else None
        return {pid: cache[pid] for pid in ids}

    def _group(self, items: list) -> None:
        store, core = self.store, self.core
        conn = store.conn
        answers: list = []
        deferred: list = []
        claim_ids = [it.payload.claim_id for it in items if it.payload.claim_id]
        ledger = Store.ledger_rows(conn, claim_ids) if claim_ids else {}
        persons = self._load_persons({it.payload.person_id for it in items
                                      if it.kind == SETTLE and it.payload.person_id})

        seen: dict = {}  # claim_id -> person_id, for the group so far
        blocked: set = set()  # persons with a deferred request
        last_round: dict = {}
        rounds: list = []
        claim_bytes: dict = {}

        def place(pid, entry):
            r = last_round.get(pid, -1) + 1
            last_round[pid] = r
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(entry)

        for it in items:
            if it.kind == SETTLE:
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
                place(pid, (it, Work(c, basis, (pid, basis.region, basis.scheme, basis.year))))
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
                pid = srow["person_id"]
                seen[cid] = pid
                if srow["facility_id"] != req.facility_id:
                    answers.append((it, CallError(
                        E.FACILITY_MISMATCH, f"claim {cid} was settled by facility {srow['facility_id']}, not "
                        f"{req.facility_id}; only the settling facility may reverse it", field="facility_id",
                        claim_id=cid, person_id=pid)))
                    continue
                if pid in blocked:
                    deferred.append(it)
                    continue
                place(pid, (it, rows))

        # stored accumulators of every key the rounds touch
        keys = set()
        for rnd in rounds:
            for it, x in rnd:
                keys.add(x.key if it.kind == SETTLE else key_of(x["settle"]))
        accs = {k: Acc.from_blob(v) for k, v in Store.accumulator_rows(conn, keys).items()} if keys else {}

        ledger_out: list = []
        changed: dict = {}  # key -> seq of its last change
        committing: list = []  # (item, bytes) answered only if the commit succeeds
        first_seq = seq = store.last_seq
        now = now_us()
        for rnd in rounds:
            works = []
            for it, x in rnd:
                if it.kind == SETTLE:
                    works.append((it, x))
                    continue
                # reversal
                srow, rrow = x["settle"], x.get("reverse")
                key = key_of(srow)
                acc = accs.get(key)
                if acc is None:
                    acc = accs[key] = Acc()
                order = core.column_order(key)
                if rrow is not None:
                    answers.append((it, pb.ReverseResponse(already_reversed=True, record=record_pb(srow, rrow),
                                                           accumulators=acc.to_pb(key, order)).SerializeToString()))
                    continue
                delta = pb.AccumulatorDelta.FromString(srow["delta"])
                d_layers = delta_layers(delta)
                acc.add(srow["delta_admissions"], srow["delta_compliant_total"], d_layers, sign=-1)
                if not acc.is_valid():
                    acc.add(srow["delta_admissions"], srow["delta_compliant_total"], d_layers, sign=1)
                    answers.append((it, CallError(E.STORE_FAILURE, f"reversing {srow['claim_id']} would take an "
                                                  f"accumulator of {key} below 0: the store is inconsistent; "
                                                  f"nothing was reversed, call support",
                                                  claim_id=srow["claim_id"], grpc_code=grpc.StatusCode.INTERNAL)))
                    continue
                seq += 1
                reason = it.payload.reason
                rrow = {"seq": seq, "recorded_at_us": now, "reason": reason}
                neg = pb.AccumulatorDelta(admissions=-delta.admissions, compliant_total=-delta.compliant_total,
                                          layers=[pb.LayerAccumulator(layer=e.layer, cap_group=e.cap_group,
                                                                      position=-e.position, paid=-e.paid,
                                                                      deductible_charged=-e.deductible_charged)
                                                  for e in delta.layers])
                ledger_out.append((seq, "reverse", srow["claim_id"], srow["facility_id"], *key,
                                   -srow["delta_admissions"], -srow["delta_compliant_total"],
                                   neg.SerializeToString(), None, None, reason, now))
                changed[key] = seq
                committing.append((it, pb.ReverseResponse(already_reversed=False, record=record_pb(srow, rrow),
                                                          accumulators=acc.to_pb(key, order)).SerializeToString()))
            if not works:
                continue
            outcomes = core.settle([w for _, w in works], accs)
            for (it, w), oc in zip(works, outcomes):
                if not isinstance(oc, Outcome):
                    answers.append((it, oc))
                    continue
                seq += 1
                resp = oc.response
                resp.ledger_seq = seq
                resp.recorded_at_us = now
                data = resp.SerializeToString()
                c = w.claim
                ledger_out.append((seq, "settle", c.claim_id, c.facility_id, *w.key, oc.d_adm, oc.d_ct,
                                   resp.delta.SerializeToString(), claim_bytes[id(it)], data, None, now))
                changed[w.key] = seq
                committing.append((it, data))

        if ledger_out:
            acc_rows = [(*key, accs[key].admissions, accs[key].compliant_total,
                         accs[key].to_pb(key, core.column_order(key)).SerializeToString(), s)
                        for key, s in changed.items()]
            try:
                store.commit_group(ledger_out, acc_rows)
                store.last_seq = seq
            except Exception as e:
                store.last_seq = first_seq
                self.stats["commit_failures"] += 1
                log.exception("writer: commit failed")
                err = CallError(E.STORE_FAILURE, f"the settlement could not be recorded ({type(e).__name__}: {e}); "
                                "nothing was recorded, retry")
                committing = [(it, err) for it, _ in committing]
        st = self.stats
        st["groups"] += 1
        st["items"] += len(items)
        st["max_group"] = max(st["max_group"], len(items))
        for it, _ in committing:
            if it.kind == SETTLE:
                st["settled"] += 1
            else:
                st["reversed"] += 1
        answers.extend(committing)
        self._deliver(answers)
        if deferred:
            with self._cv:
                self._deferred = deferred + self._deferred


def _resolve(pairs: list) -> None:
    for fut, value in pairs:
        if not fut.done():
            fut.set_result(value)
