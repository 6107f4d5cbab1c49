"""Settle / PreSettle / Reverse / idempotency through a real server, compared with engine.settle."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from srv_helpers import (PERSONS, T, claim_row, engine_results, ledger_size, nonzero, norm, pb, result_dict,
                         rpc_error, settle_request)
from server.client import accumulators_dict
from server.errors import error_from_rpc
from server._proto import settlement_pb2_grpc as pb_grpc

pytestmark = pytest.mark.service

VISITS = [("inpatient", "primary"), ("inpatient", "secondary"), ("inpatient", "tertiary"), ("chronic", "secondary"),
          ("outpatient", "primary"), ("maternity", "secondary")]


def varied_claims(n: int = 90, seed: int = 11) -> list:
    """Claims of every test person across 2024 (spells begin and end inside it), some in 2025."""
    rng = random.Random(seed)
    rows = []
    persons = [p[0] for p in PERSONS]
    for i in range(n):
        pid = rng.choice(persons)
        vt, lvl = rng.choice(VISITS)
        year = 2025 if rng.random() < 0.1 else 2024
        t = T(year, rng.randint(1, 12), rng.randint(1, 28), rng.randint(8, 17), rng.randint(0, 59))
        in_scope = rng.choice([300_00, 2_500_00, 9_000_00, 40_000_00, 150_000_00])
        rows.append(claim_row(
            f"c{i:03d}", pid, t, vt, lvl, rng.choice(["county", "region", "province", "national"]),
            in_scope=in_scope, self_funded=rng.choice([0, 1_000]), over_limit=rng.choice([0, 50]),
            class_b_copay=rng.choice([0, 2_00]), in_scope_class_b=rng.choice([0, in_scope // 3]),
            disease_code=rng.choice([None, "I10.x01", "E11.9", "K35"])))
    return rows


def fold_via_api(srv, persons, years=(2024, 2025)) -> dict:
    out = {}
    for pid in persons:
        for y in years:
            for a in srv.stub.GetAccumulators(pb.GetAccumulatorsRequest(person_id=pid, year=y)).accumulators:
                k, v = accumulators_dict(a)
                out[k] = v
    return out


def test_settle_equals_engine(srv, ps):
    rows = sorted(varied_claims(), key=lambda r: (r["settle_time"], r["claim_id"].encode()))
    want, want_acc = engine_results(ps, rows)
    got = []
    for r in rows:
        try:
            resp = srv.stub.Settle(settle_request(r), timeout=10)
            got.append(result_dict(resp.result))
        except grpc.RpcError as e:
            detail = error_from_rpc(e)
            got.append({"claim_id": r["claim_id"], "status": detail.reason})
    # every error row of the engine is an error of the server with the same code, every ok row identical
    assert [g["status"] for g in got] == [w["status"] for w in want]
    assert sum(w["status"] == "ok" for w in want) > 60
    assert norm([g for g in got if g["status"] == "ok"]) == norm([w for w in want if w["status"] == "ok"])
    persons = [p[0] for p in PERSONS]
    assert fold_via_api(srv, persons) == want_acc
    assert srv.store.stored_accumulators() == want_acc
    assert srv.store.fold_ledger() == want_acc


def test_settle_response_carries_accumulators_after_claim(srv, ps):
    rows = [claim_row(f"a{i}", "p-poor", T(2024, 3, 1 + i), in_scope=30_000_00) for i in range(4)]
    want, _ = engine_results(ps, rows)
    for i, r in enumerate(rows):
        resp = srv.stub.Settle(settle_request(r))
        assert norm([result_dict(resp.result)]) == norm([want[i]])
        # the accumulators after claim i are the engine's closing accumulators of claims 0..i
        _, acc_i = engine_results(ps, rows[: i + 1])
        k, v = accumulators_dict(resp.accumulators)
        assert {k: v} == acc_i
        assert resp.ledger_seq == i + 1 and not resp.replayed
        assert resp.basis.age == 74 and list(resp.basis.identities) == ["extreme_poverty"]
        assert resp.basis.region == "000001" and resp.basis.scheme == pb.SCHEME_RESIDENT


def test_registry_decides_identity_and_age(srv, ps):
    # p-low holds low_income from 2024-01-01 to 2024-06-30 (inclusive); the claim carries no identity
    inside = claim_row("in", "p-low", T(2024, 6, 30, 23, 59), in_scope=5_000_00)
    outside = claim_row("out", "p-low", T(2024, 7, 1, 0, 0), in_scope=5_000_00)
    r_in = srv.stub.Settle(settle_request(inside)).result
    r_out = srv.stub.Settle(settle_request(outside)).result
    assert r_in.identity == "low_income" and r_in.medical_aid_pay > 0
    assert r_out.identity == "" and r_out.medical_aid_pay == 0
    # born 2020-02-29: 3 on 2024-02-28, 4 on 2024-02-29
    a = srv.stub.Settle(settle_request(claim_row("k1", "p-kid", T(2024, 2, 28), "outpatient", "primary",
                                                 in_scope=100_00)))
    b = srv.stub.Settle(settle_request(claim_row("k2", "p-kid", T(2024, 2, 29), "outpatient", "primary",
                                                 in_scope=100_00)))
    assert (a.basis.age, b.basis.age) == (3, 4)
    want, _ = engine_results(ps, [inside, outside])
    assert norm([result_dict(r_in), result_dict(r_out)]) == norm(want)


def test_presettle_commits_nothing(srv, ps):
    first = claim_row("x1", "p-mon", T(2024, 2, 1), in_scope=20_000_00)
    srv.stub.Settle(settle_request(first))
    before = srv.store.stored_accumulators()
    seq_before = ledger_size(srv.store)
    row = claim_row("x2", "p-mon", T(2024, 3, 1), in_scope=50_000_00)
    pre = srv.stub.PreSettle(settle_request(row))
    pre2 = srv.stub.PreSettle(settle_request(row))
    assert pre == pre2 and pre.ledger_seq == 0
    assert srv.store.stored_accumulators() == before
    assert ledger_size(srv.store) == seq_before
    code, _ = rpc_error(srv.stub.GetSettlement, pb.GetSettlementRequest(claim_id="x2"))
    assert code == grpc.StatusCode.NOT_FOUND
    got = srv.stub.Settle(settle_request(row))
    assert got.result == pre.result and got.accumulators == pre.accumulators and got.delta == pre.delta
    want, _ = engine_results(ps, [first, row])
    assert norm([result_dict(got.result)]) == norm(want[1:])
    # a pre-settle of a settled claim answers what Settle would: the stored result
    again = srv.stub.PreSettle(settle_request(row))
    assert again.replayed and again.result == got.result


def test_reverse_restores_exactly(srv, ps):
    rows = [claim_row(f"r{i}", "p-poor", T(2024, 4, 1 + i), ("inpatient", "chronic", "inpatient")[i],
                      in_scope=(25_000_00, 8_000_00, 60_000_00)[i]) for i in range(3)]
    after = []
    for r in rows:
        srv.stub.Settle(settle_request(r))
        after.append(srv.store.stored_accumulators())
    # reverse the last: exactly the state after the second
    rv = srv.stub.Reverse(pb.ReverseRequest(claim_id="r2", facility_id="F1", reason="wrong patient"))
    assert not rv.already_reversed and rv.record.state == pb.SETTLEMENT_STATE_REVERSED
    assert rv.record.reversal_reason == "wrong patient"
    assert srv.store.stored_accumulators() == after[1]
    k, v = accumulators_dict(rv.accumulators)
    assert {k: v} == after[1]
    # twice: a no-op that says so
    rv2 = srv.stub.Reverse(pb.ReverseRequest(claim_id="r2", facility_id="F1"))
    assert rv2.already_reversed and srv.store.stored_accumulators() == after[1]
    # the ledger keeps both entries; the accumulators are its fold
    rec = srv.stub.GetSettlement(pb.GetSettlementRequest(claim_id="r2"))
    assert rec.state == pb.SETTLEMENT_STATE_REVERSED and rec.reversal_seq == 4 and rec.settlement.ledger_seq == 3
    assert srv.store.fold_ledger() == srv.store.stored_accumulators()
    # a reversed claim_id is never settled again, whatever its content
    code, d = rpc_error(srv.stub.Settle, settle_request(rows[2]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and d.reason == "CLAIM_REVERSED"
    # reverse the middle one, then the first: back to nothing
    srv.stub.Reverse(pb.ReverseRequest(claim_id="r1", facility_id="F1"))
    assert srv.store.fold_ledger() == srv.store.stored_accumulators()
    srv.stub.Reverse(pb.ReverseRequest(claim_id="r0", facility_id="F1"))
    assert nonzero(srv.store.stored_accumulators()) == {}
    assert nonzero(srv.store.fold_ledger()) == {}


def test_reverse_in_the_middle_takes_off_its_own_deltas(srv, ps):
    rows = [claim_row(f"m{i}", "p-plain", T(2024, 5, 1 + i), "chronic", in_scope=(4_000_00, 3_000_00, 5_000_00)[i])
            for i in range(3)]
    resps = [srv.stub.Settle(settle_request(r)) for r in rows]
    srv.stub.Reverse(pb.ReverseRequest(claim_id="m1", facility_id="F1"))
    # what is left = fold of the deltas of m0 and m2 as they were settled (m2 keeps its pay)
    _, final = accumulators_dict(resps[2].accumulators)
    d = resps[1].delta
    adm, ct, layers = final
    layers = {k: list(v) for k, v in layers.items()}
    for e in d.layers:
        v = layers[(e.layer, e.cap_group or None)]
        v[0] -= e.position
        v[1] -= e.paid
        v[2] -= e.deductible_charged
    expect = (adm - d.admissions, ct - d.compliant_total, {k: v for k, v in layers.items() if any(v)})
    (key, stored), = srv.store.stored_accumulators().items()
    assert stored == expect


def test_reverse_errors(srv):
    srv.stub.Settle(settle_request(claim_row("e1", "p-plain", T(2024, 1, 5))))
    code, d = rpc_error(srv.stub.Reverse, pb.ReverseRequest(claim_id="nope", facility_id="F1"))
    assert code == grpc.StatusCode.NOT_FOUND and d.reason == "CLAIM_NOT_FOUND"
    code, d = rpc_error(srv.stub.Reverse, pb.ReverseRequest(claim_id="e1", facility_id="F2"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and d.reason == "FACILITY_MISMATCH"
    code, d = rpc_error(srv.stub.Reverse, pb.ReverseRequest(claim_id="e1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "MISSING_FIELD" and d.field == "facility_id"
    assert srv.stub.GetSettlement(pb.GetSettlementRequest(claim_id="e1")).state == pb.SETTLEMENT_STATE_SETTLED


def test_idempotent_retry(srv):
    row = claim_row("i1", "p-low", T(2024, 2, 2), in_scope=12_000_00)
    first = srv.stub.Settle(settle_request(row))
    acc = srv.store.stored_accumulators()
    second = srv.stub.Settle(settle_request(row))
    assert second.replayed and not first.replayed
    second.replayed = False
    assert second == first
    assert srv.store.stored_accumulators() == acc and ledger_size(srv.store) == 1
    # same claim_id, other content: ALREADY_EXISTS, nothing changes
    code, d = rpc_error(srv.stub.Settle, settle_request(dict(row, in_scope_amount=11_000_00, total_amount=11_000_00)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and d.reason == "DUPLICATE_CLAIM"
    assert "in_scope_amount" in d.message and "total_amount" in d.message
    code, d = rpc_error(srv.stub.Settle, settle_request(row, facility_id="F9"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "another facility" in d.message  # no field list (issue 15)
    # a validation error of the new content outranks DUPLICATE_CLAIM (spec section 7)
    code, d = rpc_error(srv.stub.Settle, settle_request(dict(row, total_amount=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "AMOUNT_MISMATCH"
    assert srv.store.stored_accumulators() == acc and ledger_size(srv.store) == 1


async def _concurrently(target, requests, method="Settle"):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.SettlementStub(ch)
        fn = getattr(stub, method)

        async def one(req):
            for _ in range(100):  # as a client does: RESOURCE_EXHAUSTED (admission) is retried after the pushback
                try:
                    return await fn(req, timeout=60)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        return e
                    pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms", "100")
                    await asyncio.sleep(int(pushback) / 1000)
            return e

        return await asyncio.gather(*(one(r) for r in requests))


def test_concurrent_identical_retries_pay_once(srv):
    row = claim_row("dup", "p-poor", T(2024, 8, 8), in_scope=30_000_00)
    out = asyncio.run(_concurrently(srv.target, [settle_request(row)] * 20))
    assert all(isinstance(r, pb.SettleResponse) for r in out)
    assert sum(not r.replayed for r in out) == 1
    assert len({r.result.SerializeToString() for r in out}) == 1 and {r.ledger_seq for r in out} == {1}
    assert ledger_size(srv.store) == 1


def test_200_concurrent_settlements_of_one_person(srv, ps):
    # the same person, same day, in random order: each must see the accumulators of the one before
    rng = random.Random(5)
    rows = [claim_row(f"s{i:03d}", "p-poor", T(2024, 6, 1, 9, 0, rng.randint(0, 59)),
                      rng.choice(["inpatient", "chronic"]), in_scope=rng.choice([2_000_00, 7_000_00, 15_000_00]))
            for i in range(200)]
    out = asyncio.run(_concurrently(srv.target, [settle_request(r) for r in rows]))
    assert all(isinstance(r, pb.SettleResponse) for r in out), [r for r in out if not isinstance(r, pb.SettleResponse)][:1]
    seqs = sorted(r.ledger_seq for r in out)
    assert seqs == list(range(1, 201))
    # the sequential result: the engine settling them one by one in the server's commit order
    order = sorted(range(200), key=lambda i: out[i].ledger_seq)
    want, want_acc = engine_results(ps, [rows[i] for i in order], chunks=True)
    assert norm([result_dict(out[i].result) for i in order]) == norm(want)
    assert srv.store.stored_accumulators() == want_acc == srv.store.fold_ledger()
    # each response's accumulators are the ones right after it
    for n, i in enumerate(order[:40]):
        _, acc_n = engine_results(ps, [rows[j] for j in order[: n + 1]], chunks=True)
        k, v = accumulators_dict(out[i].accumulators)
        assert {k: v} == acc_n
    # no cap is ever passed
    caps = {("basic", "inpatient"): 5000_00, ("critical_illness", "year"): 8000_00, ("assistance", "year"): 3000_00}
    (key, (adm, ct, layers)), = want_acc.items()
    for lk, cap in caps.items():
        assert layers.get(lk, [0, 0, 0])[1] <= cap
    assert layers[("basic", "inpatient")][1] == 5000_00  # the cap was reached, exactly
    assert any(out[i].result.cap_hit for i in range(200))


def test_get_queries(srv):
    code, d = rpc_error(srv.stub.GetSettlement, pb.GetSettlementRequest(claim_id="zzz"))
    assert code == grpc.StatusCode.NOT_FOUND and d.reason == "CLAIM_NOT_FOUND"
    code, d = rpc_error(srv.stub.GetAccumulators, pb.GetAccumulatorsRequest(person_id="ghost", year=2024))
    assert code == grpc.StatusCode.NOT_FOUND and d.reason == "PERSON_NOT_FOUND"
    assert list(srv.stub.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-plain", year=2024)).accumulators) == []
    row = claim_row("g1", "p-plain", T(2024, 1, 2))
    resp = srv.stub.Settle(settle_request(row))
    rec = srv.stub.GetSettlement(pb.GetSettlementRequest(claim_id="g1"))
    assert rec.settlement == resp and rec.claim == settle_request(row).claim
    accs = srv.stub.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-plain", year=2024)).accumulators
    assert list(accs) == [resp.accumulators]
    assert list(srv.stub.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-plain", year=2023)).accumulators) == []
