"""Every input bounded (server/limits.py): lengths, parsing, unknown fields, echoes, answer size."""
from __future__ import annotations

import grpc
import pytest

from server._proto import settlement_pb2 as pb
from server.errors import CallError
from server.limits import (ECHO_CHARS, MAX_CODE_LEN, MAX_ID_LEN, MAX_IDENTITY_LEN, MAX_REASON_LEN, MAX_REGION_LEN,
                           MAX_REQUEST_BYTES, MAX_SPELLS, check_claim, check_id, check_person, check_person_values,
                           check_reverse, clamp, parse, prefix)

E = pb.ErrorCode
BIG = "\U0001F600" * 1000  # 4 bytes per character in UTF-8


def claim(**kw):
    base = dict(claim_id="C1", person_id="P1", facility_id="H1", settle_time_us=1, disease_code="J18.9")
    base.update(kw)
    return pb.Claim(**base)


def test_prefix_bounds_and_marks():
    assert prefix("short") == "short"
    p = prefix("x" * 10_000)
    assert p.startswith("x" * ECHO_CHARS) and "10000 characters" in p and len(p) < ECHO_CHARS + 30


@pytest.mark.parametrize("field,limit", [("claim_id", MAX_ID_LEN), ("person_id", MAX_ID_LEN),
                                         ("facility_id", MAX_ID_LEN), ("disease_code", MAX_CODE_LEN)])
def test_claim_string_limits(field, limit):
    assert check_claim(claim(**{field: "a" * limit})) is None
    err = check_claim(claim(**{field: "a" * (limit + 1)}))
    assert err.code == E.INVALID_VALUE and err.field == field and err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    huge = check_claim(claim(**{field: "a" * 1_000_000}))
    # the message and the trailer quote a bounded prefix (issue 15: ids past gRPC's metadata limit)
    assert len(huge.status_message()) < 300 and len(huge.trailer()) < 1200


def test_reverse_limits():
    assert check_reverse(pb.ReverseRequest(claim_id="C", facility_id="H", reason="r" * MAX_REASON_LEN)) is None
    err = check_reverse(pb.ReverseRequest(claim_id="C", facility_id="H", reason="r" * 10_000_000))
    assert err.field == "reason" and err.code == E.INVALID_VALUE and len(err.trailer()) < 1000
    assert check_reverse(pb.ReverseRequest(claim_id="C" * 200, facility_id="H")).field == "claim_id"
    assert check_reverse(pb.ReverseRequest(claim_id="C", facility_id="H" * 200)).field == "facility_id"
    assert check_id("claim_id", "c" * (MAX_ID_LEN + 1)).field == "claim_id"


def test_person_limits():
    ok = pb.Person(person_id="P1", region="000001", identities=[pb.IdentitySpell(identity="a")] * MAX_SPELLS)
    assert check_person(0, ok) is None
    cases = [(pb.Person(person_id="P" * 129), "person_id"), (pb.Person(person_id="P", region="1" * 1_000_000), "region"),
             (pb.Person(person_id="P", identities=[pb.IdentitySpell(identity="a")] * 10_000), "identities"),
             (pb.Person(person_id="P", identities=[pb.IdentitySpell(identity="i" * (MAX_IDENTITY_LEN + 1))]),
              "identities[0].identity")]
    for p, field in cases:
        err = check_person(3, p)
        assert err.code == E.INVALID_PERSON and err.field == field and "#3" in err.message
        assert len(err.trailer()) < 1200
    assert check_person_values("P", "1" * (MAX_REGION_LEN + 1), [])[1] == "region"
    assert check_person_values("P", "1", [("a", None, None)] * (MAX_SPELLS + 1))[1] == "identities"
    assert check_person_values("P", "1", [("a" * 65, None, None)])[1] == "identities[0].identity"
    assert check_person_values("P", "1", [("a", None, None)]) is None


def test_registry_file_is_bounded_too(tmp_path):
    from server.registry import Person, read_persons_parquet, write_persons_parquet

    path = tmp_path / "persons.parquet"
    write_persons_parquet([Person("p1", "000001", "resident", 0, ()),
                           Person("p2", "1" * 1_000_000, "resident", 0, ())], path)
    with pytest.raises(ValueError, match=r"row 1: .*region '1111.*longer than 32") as e:
        list(read_persons_parquet(path))
    assert len(str(e.value)) < 300
    write_persons_parquet([Person("p3", "000001", "resident", 0, (("low_income", None, None),) * 10_000)], path)
    with pytest.raises(ValueError, match="10000 identity spells"):
        list(read_persons_parquet(path))


def test_parse_drops_unknown_fields():
    req = pb.SettleRequest(claim=claim())
    data = req.SerializeToString() + b"\xfa\x07\x05hello"  # field 127, length-delimited: unknown
    msg = parse(pb.SettleRequest, data)
    assert msg.SerializeToString() == req.SerializeToString()
    inner = pb.Claim(claim_id="C1").SerializeToString() + b"\xa0\x06\x01"  # field 100 varint inside the claim
    msg = parse(pb.SettleRequest, b"\x0a" + bytes([len(inner)]) + inner)
    assert msg.claim.SerializeToString() == pb.Claim(claim_id="C1").SerializeToString()


def test_parse_invalid_utf8_and_garbage_are_invalid_request():
    bad = b"\x0a\x05\xff\xfe\xfd\xfc\xfb"  # claim_id with invalid UTF-8
    with pytest.raises(CallError) as e:
        parse(pb.GetSettlementRequest, bad)
    assert e.value.code == E.INVALID_REQUEST and e.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "GetSettlementRequest" in e.value.message
    with pytest.raises(CallError) as e:
        parse(pb.SettleRequest, b"\x0a\xff\xff\xff\x0f")  # a length past the end
    assert e.value.code == E.INVALID_REQUEST


def test_parse_bounds_size():
    with pytest.raises(CallError) as e:
        parse(pb.ReverseRequest, pb.ReverseRequest(reason="r" * (MAX_REQUEST_BYTES + 1)).SerializeToString())
    assert e.value.code == E.INVALID_REQUEST and str(MAX_REQUEST_BYTES) in e.value.message


def test_largest_valid_claim_fits_the_request_bound():
    c = claim(claim_id=BIG[:MAX_ID_LEN], person_id=BIG[:MAX_ID_LEN], facility_id=BIG[:MAX_ID_LEN],
              disease_code=BIG[:MAX_CODE_LEN], settle_time_us=-(1 << 63), visit_type=4, facility_level=3, locality=4,
              referred=True, **{f: -(1 << 63) for f in ("total_amount", "self_funded_amount", "over_limit_amount",
                                                       "class_b_copay_amount", "in_scope_amount",
                                                       "in_scope_class_b_amount")})
    assert check_claim(c) is None
    assert len(pb.SettleRequest(claim=c).SerializeToString()) < MAX_REQUEST_BYTES // 8


def test_reverse_answer_stays_below_the_default_receive_limit():
    """The worst ReverseResponse the limits allow: every caller string at its limit in 4-byte
    characters, a settlement with 64 layer accumulators (policies have a handful), the reason."""
    c = claim(claim_id=BIG[:MAX_ID_LEN], person_id=BIG[:MAX_ID_LEN], facility_id=BIG[:MAX_ID_LEN],
              disease_code=BIG[:MAX_CODE_LEN], total_amount=1 << 62)
    layers = [pb.LayerAccumulator(layer="l" * 64, cap_group="g" * 64, position=1 << 62, paid=1 << 62,
                                  deductible_charged=1 << 62)] * 64
    acc = pb.Accumulators(person_id=c.person_id, region=BIG[:MAX_REGION_LEN], scheme=1, year=2024,
                          admissions=1 << 62, compliant_total=1 << 62, layers=layers)
    resp = pb.SettleResponse(
        result=pb.SettlementResult(claim_id=c.claim_id, status="ok", policy_id="p" * 128, identity=BIG[:MAX_IDENTITY_LEN],
                                   layer_pays=[pb.LayerPay(layer="l" * 64, pay=1 << 62)] * 64),
        accumulators=acc, basis=pb.SettlementBasis(region=acc.region, identities=[BIG[:MAX_IDENTITY_LEN]] * MAX_SPELLS),
        delta=pb.AccumulatorDelta(layers=layers), ledger_seq=1 << 62, recorded_at_us=1 << 62)
    rec = pb.SettlementRecord(claim_id=c.claim_id, state=2, claim=c, settlement=resp, reversal_seq=1 << 62,
                              reversed_at_us=1 << 62, reversal_reason=BIG[:MAX_REASON_LEN])
    size = len(pb.ReverseResponse(already_reversed=True, record=rec, accumulators=acc).SerializeToString())
    assert size < 64 << 10 < 4 << 20


def test_clamp_bounds_any_error():
    err = clamp(CallError(E.INVALID_VALUE, BIG * 100, claim_id=BIG * 10, person_id=BIG * 10, field="f" * 1000))
    assert len(err.trailer()) < 8 << 10 and len(err.status_message()) < 600


def test_records_stored_before_the_limits_are_answered_bounded():
    from server.batcher import record_pb
    from server.store import LedgerEntry

    claim = pb.Claim(claim_id="C1", facility_id="H1").SerializeToString() + b"\xfa\x07\x80\x80\x40" + b"x" * (1 << 20)
    resp = pb.SettleResponse(result=pb.SettlementResult(claim_id="C1")).SerializeToString()
    settle = LedgerEntry(1, "settle", "C1", "H1", "P1", "000001", "resident", 2024, 0, 0, b"", claim, resp, None, 1)
    reverse = LedgerEntry(2, "reverse", "C1", "H1", "P1", "000001", "resident", 2024, 0, 0, b"", None, None,
                          "r" * (10 << 20), 2)
    rec = record_pb(settle, reverse)
    assert len(rec.SerializeToString()) < 4096 and rec.claim.facility_id == "H1"
    assert rec.reversal_reason.startswith("r" * MAX_REASON_LEN) and len(rec.reversal_reason) < MAX_REASON_LEN + 40
