"""The group writer and the store without gRPC or sockets: settle, idempotent retry,
duplicate, reversal, accumulators = fold of the ledger, registry import all or
nothing, sequence numbers after a restart, the paced loop of both transports."""
from __future__ import annotations

import asyncio
import threading

import pytest

from srv_helpers import (PERSONS, T, claim_row, engine_results, ledger_size, norm, pb, persons_pb, result_dict,
                         settle_request)
from server.batcher import PRESETTLE, REVERSE, SETTLE, UPSERT, GroupWriter
from server.core import Core
from server.errors import CallError
from server.registry import person_from_pb, person_to_row
from server.store import PersonRow, SQLiteStore
from server.writer import QueueInbox, ThreadWriter, decode, encode_upsert, run_group_loop

E = pb.ErrorCode


def person_rows(persons=PERSONS) -> list:
    return [person_to_row(person_from_pb(i, p)) for i, p in enumerate(persons_pb(persons))]


def settle(row, facility="F1", kind=SETTLE):
    return decode(kind, settle_request(row, facility).SerializeToString(), None)


def reverse(claim_id, facility="F1", reason="wrong patient"):
    return decode(REVERSE, pb.ReverseRequest(claim_id=claim_id, facility_id=facility, reason=reason)
                  .SerializeToString(), None)


def run(gw, *items) -> list:
    """The answers to `items` in their order (deferred ones after further rounds)."""
    items = list(items)
    got = {}
    for ans in [gw.process(items)] + [gw.process([]) for _ in range(5)]:
        for it, v in ans:
            got[id(it)] = v
    return [got[id(it)] for it in items]


@pytest.fixture
def gw(store, ps):
    store.upsert_persons(person_rows())
    return GroupWriter(store, Core(ps, verify=True))


def test_settle_equals_engine_and_accumulators_fold_the_ledger(gw, store, ps):
    rows = [claim_row(f"c{i}", pid, T(2024, 1 + i % 12, 1 + i % 27, 9), "inpatient" if i % 3 else "outpatient",
                      in_scope=(i % 5 + 1) * 40_000_00) for i, pid in enumerate([p[0] for p in PERSONS] * 5)]
    rows.sort(key=lambda r: (r["settle_time"], r["claim_id"].encode()))
    want, want_acc = engine_results(ps, rows)
    # in groups of 7 (several claims of one person per group: rounds)
    answers = []
    for k in range(0, len(rows), 7):
        answers += run(gw, *[settle(r) for r in rows[k:k + 7]])
    got = [result_dict(pb.SettleResponse.FromString(a).result) for a in answers]
    assert norm(got) == norm(want)
    assert store.stored_accumulators() == want_acc == store.fold_ledger()
    seqs = [pb.SettleResponse.FromString(a).ledger_seq for a in answers]
    assert sorted(seqs) == list(range(1, len(rows) + 1))  # dense on both backends when no claim fails


def test_retry_is_replayed_and_duplicate_is_refused(gw, store):
    row = claim_row("r1", "p-plain", T(2024, 5, 1, 10))
    first = pb.SettleResponse.FromString(run(gw, settle(row))[0])
    again = pb.SettleResponse.FromString(run(gw, settle(row))[0])
    assert again.replayed and not first.replayed
    assert again.ledger_seq == first.ledger_seq and again.result == first.result
    # two identical calls in one group: settled once
    row2 = claim_row("r2", "p-plain", T(2024, 5, 2, 10))
    a, b = run(gw, settle(row2), settle(row2))
    assert pb.SettleResponse.FromString(b).replayed and not pb.SettleResponse.FromString(a).replayed
    dup = run(gw, settle(dict(row, in_scope_amount=row["in_scope_amount"] + 1,
                              total_amount=row["total_amount"] + 1)))[0]
    assert isinstance(dup, CallError) and dup.code == E.DUPLICATE_CLAIM and "in_scope_amount" in dup.message
    assert ledger_size(store) == 2
    # PreSettle changes nothing
    pre = run(gw, settle(claim_row("r3", "p-plain", T(2024, 5, 3)), kind=PRESETTLE))[0]
    assert isinstance(pre, bytes) and ledger_size(store) == 2 and not store.ledger(["r3"])


def test_reversal(gw, store, ps):
    rows = [claim_row(f"v{i}", "p-poor", T(2024, 3, 1 + i), in_scope=60_000_00) for i in range(3)]
    run(gw, *[settle(r) for r in rows])
    before = store.stored_accumulators()
    assert isinstance(run(gw, reverse("v2", facility="F9"))[0], CallError)  # another facility
    assert run(gw, reverse("v2", facility="F9"))[0].code == E.FACILITY_MISMATCH
    assert run(gw, reverse("nope"))[0].code == E.CLAIM_NOT_FOUND
    assert store.stored_accumulators() == before
    rv = pb.ReverseResponse.FromString(run(gw, reverse("v2"))[0])
    assert not rv.already_reversed and rv.record.state == pb.SETTLEMENT_STATE_REVERSED
    assert rv.record.reversal_reason == "wrong patient"
    # newest first: the accumulators are those of the remaining claims
    _, want = engine_results(ps, rows[:2])
    assert store.stored_accumulators() == want == store.fold_ledger()
    assert pb.ReverseResponse.FromString(run(gw, reverse("v2"))[0]).already_reversed
    again = run(gw, settle(rows[2]))[0]
    assert again.code == E.CLAIM_REVERSED
    # a reversal racing its settlement in one group: deferred, then applied after it
    row = claim_row("v9", "p-poor", T(2024, 9, 1))
    s, r = run(gw, settle(row), reverse("v9"))
    assert isinstance(s, bytes) and not pb.ReverseResponse.FromString(r).already_reversed
    assert store.stored_accumulators() == want == store.fold_ledger()
    entries = [e for part in store.iter_ledger() for e in part]
    assert [e.kind for e in entries] == ["settle"] * 3 + ["reverse", "settle", "reverse"]
    assert entries[3].delta_compliant_total == -entries[2].delta_compliant_total


def test_settled_by_answers_from_the_ledger(gw, store):
    """Store.settled_by (who may read a person's accumulators, server/auth.py): a settlement by
    that facility, not a PreSettle, not another facility's; a reversal leaves it settled."""
    assert not store.settled_by("F1", "p-plain")
    run(gw, settle(claim_row("sb0", "p-plain", T(2024, 2, 1, 10)), kind=PRESETTLE))
    assert not store.settled_by("F1", "p-plain")
    run(gw, settle(claim_row("sb1", "p-plain", T(2024, 2, 1, 10))))
    assert store.settled_by("F1", "p-plain")
    assert not store.settled_by("F2", "p-plain") and not store.settled_by("F1", "p-poor")
    run(gw, reverse("sb1"))
    assert store.settled_by("F1", "p-plain")
    assert not store.settled_by("F1", "no-such-person")


def test_unknown_person_and_malformed_requests_change_nothing(gw, store):
    out = run(gw, settle(claim_row("u1", "p-nobody", T(2024, 1, 2))),
              decode(SETTLE, b"\xff\xff\xff", None), decode(UPSERT, b"not json", None))
    assert [e.code for e in out] == [E.PERSON_NOT_FOUND, E.INVALID_VALUE, E.INVALID_VALUE]
    assert ledger_size(store) == 0 and store.stored_accumulators() == {}


def test_registry_upsert_through_the_writer(gw, store):
    rows = [PersonRow("n1", "000001", "resident", 1000, "[]")]
    assert run(gw, decode(UPSERT, encode_upsert(rows), None)) == [1]
    assert store.persons(["n1"])["n1"] == rows[0]
    assert isinstance(run(gw, settle(claim_row("n1-1", "n1", T(2024, 2, 2))))[0], bytes)


def test_registry_import_is_all_or_nothing(store):
    good = [PersonRow(f"g{i}", "000001", "resident", 100, "[]") for i in range(5)]

    def parts():
        yield good
        raise ValueError("persons.parquet: row 5: bad scheme")

    with pytest.raises(ValueError):
        store.import_persons(parts(), {"registry_import_sha256": "x"})
    assert store.persons([p.person_id for p in good]) == {} and store.get_meta("registry_import_sha256") is None
    assert store.import_persons([good[:3], good[3:]], {"registry_import_sha256": "y"}) == 5
    assert len(store.persons([p.person_id for p in good])) == 5 and store.get_meta("registry_import_sha256") == "y"


def test_sequence_numbers_continue_after_restart(store_factory, ps):
    s1 = store_factory()
    s1.upsert_persons(person_rows())
    gw = GroupWriter(s1, Core(ps))
    run(gw, *[settle(claim_row(f"s{i}", "p-plain", T(2024, 1, 1 + i))) for i in range(3)])
    s1.close()
    s2 = store_factory()
    assert s2.max_seq() == 3
    gw2 = GroupWriter(s2, Core(ps))
    a = pb.SettleResponse.FromString(run(gw2, settle(claim_row("s9", "p-plain", T(2024, 2, 1))))[0])
    assert a.ledger_seq == 4
    # the retry of a claim settled before the restart is answered from the ledger
    b = pb.SettleResponse.FromString(run(gw2, settle(claim_row("s1", "p-plain", T(2024, 1, 2))))[0])
    assert b.replayed and b.ledger_seq == 2


def test_a_failed_commit_answers_store_failure_and_stores_nothing(gw, store, monkeypatch):
    run(gw, settle(claim_row("f0", "p-plain", T(2024, 1, 1))))
    before = (store.stored_accumulators(), store.max_seq())
    group = store.group

    class Broken:
        def __init__(self, g):
            self.g = g

        def __getattr__(self, name):
            return getattr(self.g, name)

        def commit(self, *a):
            raise OSError("disk full")

    import contextlib

    @contextlib.contextmanager
    def broken():
        with group() as g:
            yield Broken(g)

    monkeypatch.setattr(store, "group", broken)
    out = run(gw, settle(claim_row("f1", "p-plain", T(2024, 1, 2))), reverse("f0"))
    assert [e.code for e in out] == [E.STORE_FAILURE, E.STORE_FAILURE]
    assert (store.stored_accumulators(), store.max_seq()) == before
    monkeypatch.setattr(store, "group", group)
    ok = pb.SettleResponse.FromString(run(gw, settle(claim_row("f1", "p-plain", T(2024, 1, 2))))[0])
    # SQLite numbers densely; PostgreSQL's sequence leaves the failed group's numbers as a gap
    assert ok.ledger_seq == before[1] + 1 if isinstance(store, SQLiteStore) else ok.ledger_seq > before[1]


# --------------------------------------------------------------------------- the paced loop


def test_group_loop_groups_what_waits_and_stops_when_closed(gw, store):
    inbox = QueueInbox()
    delivered = []
    items = [settle(claim_row(f"L{i}", PERSONS[i % 6][0], T(2024, 4, 1, 9, i))) for i in range(12)]
    for it in items:
        inbox.put(it)
    inbox.close()
    run_group_loop(gw, inbox, delivered.append, max_batch=5, min_interval=0.001)
    assert [len(d) for d in delivered] == [5, 5, 2]
    assert gw.stats["groups"] == 3 and store.max_seq() == 12


def test_thread_writer_answers_futures(store, ps):
    store.upsert_persons(person_rows())
    w = ThreadWriter(store, Core(ps), max_batch=8, min_interval=0.002)

    async def go():
        await w.start()
        futs = [w.submit(SETTLE, settle_request(claim_row(f"T{i}", "p-kid", T(2024, 6, 1, 9, i)))
                         .SerializeToString()) for i in range(20)]
        got = await asyncio.gather(*futs)
        await w.close()
        refused = w.submit(SETTLE, b"")
        return got, refused

    got, refused = asyncio.run(go())
    assert all(isinstance(g, bytes) for g in got) and store.max_seq() == 20
    assert isinstance(refused, CallError) and refused.code == E.SHUTTING_DOWN
    assert not any(t.name == "medsettle-writer" and t.is_alive() for t in threading.enumerate())


def _july_version() -> dict:
    """A second 2024 version from July 1 (spec revision 2): a lowered inpatient cap, chronic care
    in a nested cap inside it, critical illness uncapped for the poor, a new identity."""
    import copy

    from srv_helpers import POLICY_2024

    m = copy.deepcopy(POLICY_2024)
    m["id"], m["effective_from"] = "t-resident-2024-07-01", "2024-07-01"
    m["identities"] = [*m["identities"], "disabled"]
    basic = m["layers"][0]
    basic["cap_groups"] = {**basic["cap_groups"], "inpatient": 3000, "chronic": 800}
    for rule in basic["rules"]:
        if rule["match"].get("visit_type") == ["chronic"] and "axis" in rule:
            rule["cap_group"] = ["chronic", "inpatient"]
    m["layers"][1]["adjustments"].append({"match": {"identity": ["extreme_poverty"]}, "uncapped": True})
    return m


def test_versions_of_a_year_settle_as_the_engine(store):
    """Claims on both sides of a version change through the group writer: the same results and
    accumulators as one engine call, and the entries of both versions (nested caps included)
    folded in the ledger."""
    from srv_helpers import POLICY_2024, POLICY_EMP_2024, policy_set

    ps2 = policy_set(POLICY_2024, POLICY_EMP_2024, _july_version())
    store.upsert_persons(person_rows())
    writer = GroupWriter(store, Core(ps2, verify=True))
    rows = []
    for i, pid in enumerate([p[0] for p in PERSONS if p[2] == "resident"] * 4):
        month = 2 + (i * 5) % 10
        rows.append(claim_row(f"v{i}", pid, T(2024, month, 3 + i % 20, 11), ("inpatient", "chronic")[i % 2],
                              in_scope=(i % 4 + 1) * 30_000_00))
    rows.sort(key=lambda r: (r["settle_time"], r["claim_id"].encode()))
    want, want_acc = engine_results(ps2, rows)
    answers = []
    for k in range(0, len(rows), 5):
        answers += run(writer, *[settle(r) for r in rows[k:k + 5]])
    got = [result_dict(pb.SettleResponse.FromString(a).result) for a in answers]
    assert norm(got) == norm(want)
    assert {r["policy_id"] for r in got} == {"t-resident-2024", "t-resident-2024-07-01"}
    assert store.stored_accumulators() == want_acc == store.fold_ledger()
    assert any(("basic", "chronic") in layers for _, _, layers in want_acc.values())


def test_facility_registry_of_another_writer_is_used_from_the_next_group(gw, store, monkeypatch):
    """A registry stored behind the writer's back (another instance on PostgreSQL) is used from
    the writer's next group; on PostgreSQL its version is read with the group's lookups (one
    round trip), never through the store's read pool."""
    from server import facilities as fac
    rows = [claim_row(f"fr{i}", PERSONS[i][0], T(2024, 3, 1 + i, 9), "outpatient") for i in range(3)]
    assert isinstance(run(gw, settle(rows[0]))[0], bytes)
    fac.store_upload(store, [fac.Facility("H1", "Linfen People's Hospital", "141000", "141002", "tertiary")])
    reads = []
    get_meta = store.get_meta
    monkeypatch.setattr(store, "get_meta", lambda key: reads.append(key) or get_meta(key))
    a = run(gw, settle(rows[1]))[0]
    assert isinstance(a, CallError) and a.code == E.FACILITY_NOT_FOUND
    b = run(gw, settle(rows[2]))[0]
    assert isinstance(b, CallError) and b.code == E.FACILITY_NOT_FOUND
    if isinstance(store, SQLiteStore):  # the only writer: its own connection, no round trip
        assert reads.count(fac.META_KEY) == 1
    else:  # the registry itself once, as its version changed; the version never through the pool
        assert reads == [fac.META_KEY]
