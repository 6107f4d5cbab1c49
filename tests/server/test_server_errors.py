"""Bad requests get the right gRPC status and error detail, and change nothing."""
from __future__ import annotations

import grpc
import pytest

from srv_helpers import T, D, claim_row, ledger_size, pb, rpc_error, settle_request
from server.client import person_pb

pytestmark = pytest.mark.service

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECOND = grpc.StatusCode.FAILED_PRECONDITION


def base(**kw):
    row = claim_row("bad", "p-plain", T(2024, 5, 5), in_scope=1_000_00)
    row.update(kw)
    return row


def claim_with(**fields):
    req = settle_request(base())
    for k, v in fields.items():
        if v is None:
            req.claim.ClearField(k)
        else:
            setattr(req.claim, k, v)
    return req


CASES = [
    # (name, request, grpc code, reason, field)
    ("no claim", pb.SettleRequest(), INVALID, "MISSING_FIELD", "claim_id"),
    ("no person", claim_with(person_id=""), INVALID, "MISSING_FIELD", "person_id"),
    ("no facility", claim_with(facility_id=""), INVALID, "MISSING_FIELD", "facility_id"),
    ("no settle_time", claim_with(settle_time_us=None), INVALID, "MISSING_FIELD", "settle_time_us"),
    ("no visit type", claim_with(visit_type=0), INVALID, "MISSING_FIELD", "visit_type"),
    ("no locality", claim_with(locality=0), INVALID, "MISSING_FIELD", "locality"),
    ("unknown level", claim_with(facility_level=99), INVALID, "INVALID_VALUE", "facility_level"),
    ("negative", settle_request(base(in_scope_amount=-5, total_amount=-5)), INVALID, "INVALID_AMOUNT",
     "total_amount"),
    ("too large", settle_request(base(in_scope_amount=10**12 + 1, total_amount=10**12 + 1)), INVALID,
     "AMOUNT_OUT_OF_RANGE", "total_amount"),
    ("mismatch", settle_request(base(total_amount=1)), INVALID, "AMOUNT_MISMATCH", "total_amount"),
    ("class B above in scope", settle_request(base(in_scope_class_b_amount=2_000_00)), INVALID, "AMOUNT_MISMATCH",
     "in_scope_class_b_amount"),
    ("long id", claim_with(claim_id="x" * 200), INVALID, "INVALID_VALUE", "claim_id"),
    ("long code", claim_with(disease_code="I10" * 100), INVALID, "INVALID_VALUE", "disease_code"),
    ("unregistered", claim_with(person_id="ghost"), grpc.StatusCode.NOT_FOUND, "PERSON_NOT_FOUND", "person_id"),
    ("before birth", settle_request(base(settle_time=T(1950, 1, 1))), INVALID, "INVALID_VALUE", "settle_time_us"),
    ("no policy that year", settle_request(base(settle_time=T(2023, 5, 5))), PRECOND, "UNKNOWN_POLICY",
     "settle_time_us"),
    ("undeclared identity", settle_request(base(person_id="p-odd")), PRECOND, "UNKNOWN_IDENTITY", ""),
    ("no rule", settle_request(base(person_id="p-emp", visit_type="maternity")), PRECOND, "NO_BENEFIT_RULE", ""),
]


@pytest.fixture
def primed(srv):
    srv.registry.UpsertPersons(iter([person_pb("p-odd", "000001", "resident", D(1970, 1, 1), [("veteran", None, None)])]))
    srv.stub.Settle(settle_request(claim_row("ok1", "p-plain", T(2024, 2, 2), in_scope=3_000_00)))
    return srv


def test_bad_requests_change_nothing(primed):
    srv = primed
    acc = srv.store.stored_accumulators()
    seq = ledger_size(srv.store)
    for name, req, code, reason, field in CASES:
        for method in (srv.stub.Settle, srv.stub.PreSettle):
            got_code, d = rpc_error(method, req, timeout=10)
            assert (got_code, d.reason, d.field) == (code, reason, field), (name, method, d)
            assert d.code == pb.ErrorCode.Value(reason) and d.message, name
            assert len(d.message) > 20
    assert srv.store.stored_accumulators() == acc
    assert ledger_size(srv.store) == seq
    # a rejected claim is not recorded: the same id settles once corrected
    srv.stub.Settle(settle_request(base()))
    assert ledger_size(srv.store) == seq + 1


def test_status_message_and_detail(primed):
    try:
        primed.stub.Settle(settle_request(base(total_amount=1)))
    except grpc.RpcError as e:
        assert e.details().startswith("AMOUNT_MISMATCH: total_amount 1 != ")
        md = dict(e.trailing_metadata())
        st = pb.RpcStatus.FromString(md["grpc-status-details-bin"])
        assert st.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        d = pb.ErrorDetail()
        assert st.details[0].Unpack(d) and d.claim_id == "bad" and d.person_id == "p-plain"
    else:
        raise AssertionError("accepted")


def test_rejections_in_a_group_do_not_disturb_the_others(primed):
    """Good and bad claims of several persons committed in the same groups."""
    import asyncio

    from test_server_settle import _concurrently

    srv = primed
    good = [settle_request(claim_row(f"g{i}", ("p-low", "p-mon", "p-poor")[i % 3], T(2024, 3, 3), in_scope=9_000_00))
            for i in range(30)]
    bad = [req for _, req, *_ in CASES]
    out = asyncio.run(_concurrently(srv.target, good + bad))
    assert all(isinstance(r, pb.SettleResponse) for r in out[:30])
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in out[30:])
    assert srv.store.fold_ledger() == srv.store.stored_accumulators()
