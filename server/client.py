"""Client-side helpers: spec-shaped values to and from medsettle.v1 messages.

    from server.client import claim_pb, result_dict, person_pb, connect
    stub = connect("127.0.0.1:50051")                  # a SettlementStub on a blocking channel
    resp = stub.Settle(pb.SettleRequest(claim=claim_pb(row, facility_id="H001")))
    result_dict(resp.result)                           # spec section 3 columns, as engine.settle gives them
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

import grpc

from ._proto import settlement_pb2 as pb
from ._proto import settlement_pb2_grpc as pb_grpc
from .core import LEVEL, LOCALITY, VISIT
from .registry import SCHEME_TO_PB, date_to_days, days_to_pb_date

VISIT_PB = {v: k for k, v in VISIT.items()}
LEVEL_PB = {v: k for k, v in LEVEL.items()}
LOCALITY_PB = {v: k for k, v in LOCALITY.items()}
EPOCH = dt.datetime(1970, 1, 1)


def to_us(t: dt.datetime) -> int:
    """A naive local wall time as settle_time_us."""
    return (t - EPOCH) // dt.timedelta(microseconds=1)


def from_us(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def claim_pb(row: dict, facility_id: str = "F1") -> pb.Claim:
    """A Claim from a spec section 2 row dict (region, scheme, age and identities are ignored:
    the server takes them from its registry)."""
    c = pb.Claim(claim_id=row["claim_id"], person_id=row["person_id"], facility_id=row.get("facility_id", facility_id))
    t = row.get("settle_time")
    if t is not None:
        c.settle_time_us = t if isinstance(t, int) else to_us(t)
    for name, table in (("visit_type", VISIT_PB), ("facility_level", LEVEL_PB), ("locality", LOCALITY_PB)):
        v = row.get(name)
        if v is not None:
            setattr(c, name, table[v])
    c.referred = bool(row.get("referred") or False)
    c.disease_code = row.get("disease_code") or ""
    for name in ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
                 "in_scope_amount", "in_scope_class_b_amount"):
        setattr(c, name, row.get(name) or 0)
    return c


RESULT_FIELDS = ("claim_id", "status", "policy_id", "identity", "deductible_applied", "basic_pay",
                 "supplementary_pay", "critical_illness_pay", "medical_aid_pay", "guarantee_pay", "fund_pay_total",
                 "personal_pay", "compliant_personal_pay", "layer_pays", "cap_hit")


def result_dict(r: pb.SettlementResult) -> dict:
    """A SettlementResult as the engine's result row (layer_pays as list of dicts, "" -> None)."""
    out = {f: getattr(r, f) for f in RESULT_FIELDS}
    out["identity"] = r.identity or None
    out["policy_id"] = r.policy_id or None
    out["layer_pays"] = [{"layer": e.layer, "pay": e.pay} for e in r.layer_pays]
    return out


def accumulators_dict(a: pb.Accumulators) -> tuple:
    """(key, (admissions, compliant_total, {(layer, cap_group): [position, paid, deductible_charged]}))
    with the all-zero entries left out, as Store.fold_ledger gives them."""
    scheme = {v: k for k, v in SCHEME_TO_PB.items()}[a.scheme]
    key = (a.person_id, a.region, scheme, a.year)
    layers = {(e.layer, e.cap_group or None): [e.position, e.paid, e.deductible_charged] for e in a.layers
              if e.position or e.paid or e.deductible_charged}
    return key, (a.admissions, a.compliant_total, dict(sorted(layers.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))))


def person_pb(person_id: str, region: str, scheme: str, birth_date: dt.date,
              identities: Optional[list] = None) -> pb.Person:
    """identities: [(identity, valid_from date | None, valid_to date | None), ...]."""
    p = pb.Person(person_id=person_id, region=region, scheme=SCHEME_TO_PB[scheme],
                  birth_date=days_to_pb_date(date_to_days(birth_date)))
    for name, lo, hi in identities or ():
        s = p.identities.add(identity=name)
        if lo is not None:
            s.valid_from.CopyFrom(days_to_pb_date(date_to_days(lo)))
        if hi is not None:
            s.valid_to.CopyFrom(days_to_pb_date(date_to_days(hi)))
    return p


def connect(target: str):
    """(SettlementStub, RegistryStub) on an insecure blocking channel."""
    ch = grpc.insecure_channel(target)
    return pb_grpc.SettlementStub(ch), pb_grpc.RegistryStub(ch)
