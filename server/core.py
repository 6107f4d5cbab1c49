"""The settlement step shared by Settle (the writer, server/batcher.py) and
PreSettle: claims + registry facts + carried accumulators -> engine -> results,
deltas and the accumulators after each claim.

Accumulators are held here as `Acc` objects (one per key), built from the
store's rows, advanced by each accepted claim's deltas (what the engine says
the claim added), and written back as the store's rows. The closing
accumulators of a key are thus the fold of its ledger deltas by construction;
with `verify=True` they are also checked against the engine's own closing
accumulators after every engine call.
"""
from __future__ import annotations

import datetime as dt
from typing import NamedTuple, Optional

import grpc
import pyarrow as pa

import engine
from engine.schema import MAX_AMOUNT

from ._proto import settlement_pb2 as pb
from .errors import ADVICE, CallError
from .registry import SCHEME_TO_PB, Basis

E = pb.ErrorCode

VISIT = {pb.VISIT_TYPE_INPATIENT: "inpatient", pb.VISIT_TYPE_OUTPATIENT: "outpatient",
         pb.VISIT_TYPE_CHRONIC: "chronic", pb.VISIT_TYPE_MATERNITY: "maternity"}
LEVEL = {pb.FACILITY_LEVEL_PRIMARY: "primary", pb.FACILITY_LEVEL_SECONDARY: "secondary",
         pb.FACILITY_LEVEL_TERTIARY: "tertiary"}
LOCALITY = {pb.LOCALITY_COUNTY: "county", pb.LOCALITY_REGION: "region", pb.LOCALITY_PROVINCE: "province",
            pb.LOCALITY_NATIONAL: "national"}
ENUM_FIELDS = (("visit_type", VISIT), ("facility_level", LEVEL), ("locality", LOCALITY))
AMOUNT_FIELDS = ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
                 "in_scope_amount", "in_scope_class_b_amount")
MAX_ID_LEN = 128
MAX_CODE_LEN = 64

STATUS_CODE = {name: (E.Value(name) if name != "ok" else 0) for name in engine.STATUSES}
RESULT_INT_FIELDS = ("deductible_applied", "basic_pay", "supplementary_pay", "critical_illness_pay",
                     "medical_aid_pay", "guarantee_pay", "fund_pay_total", "personal_pay",
                     "compliant_personal_pay")


def _enum_str(value: int, names: dict) -> Optional[str]:
    if value == 0:
        return None  # unspecified: MISSING_FIELD
    s = names.get(value)
    return s if s is not None else f"<{value}>"  # not one of the values: INVALID_VALUE


# --------------------------------------------------------------------------- accumulators


class Acc:
    """The accumulators of one key: admissions, compliant_total and per
    (layer, cap_group) [position, paid, deductible_charged], in the policy's
    column order (layer order, then rule order) once `order` is applied."""

    __slots__ = ("admissions", "compliant_total", "layers", "unordered")

    def __init__(self, admissions: int = 0, compliant_total: int = 0, layers: Optional[dict] = None):
        self.admissions = admissions
        self.compliant_total = compliant_total
        self.layers = layers if layers is not None else {}
        self.unordered = False

    @classmethod
    def from_blob(cls, blob: bytes) -> "Acc":
        st = pb.Accumulators.FromString(blob)
        return cls(st.admissions, st.compliant_total,
                   {(e.layer, e.cap_group or None): [e.position, e.paid, e.deductible_charged] for e in st.layers})

    def copy(self) -> "Acc":
        return Acc(self.admissions, self.compliant_total, {k: list(v) for k, v in self.layers.items()})

    def add(self, d_adm: int, d_ct: int, d_layers: list, sign: int = 1) -> None:
        """Adds (sign=1) or takes off (sign=-1) one claim's deltas ([(layer, cap, pos, paid, ded), ...])."""
        self.admissions += sign * d_adm
        self.compliant_total += sign * d_ct
        layers = self.layers
        for layer, cap, pos, paid, ded in d_layers:
            v = layers.get((layer, cap))
            if v is None:
                layers[(layer, cap)] = [sign * pos, sign * paid, sign * ded]
                self.unordered = True
            else:
                v[0] += sign * pos
                v[1] += sign * paid
                v[2] += sign * ded

    def is_valid(self) -> bool:
        return self.admissions >= 0 and self.compliant_total >= 0 and all(
            x >= 0 for v in self.layers.values() for x in v)

    def to_pb(self, key: tuple, order: Optional[dict] = None) -> pb.Accumulators:
        if self.unordered and order is not None:
            self.layers = dict(sorted(self.layers.items(), key=lambda kv: order.get(kv[0], 1 << 30)))
            self.unordered = False
        person_id, region, scheme, year = key
        return pb.Accumulators(
            person_id=person_id, region=region, scheme=SCHEME_TO_PB.get(scheme, 0), year=year,
            admissions=self.admissions, compliant_total=self.compliant_total,
            layers=[pb.LayerAccumulator(layer=k[0], cap_group=k[1] or "", position=v[0], paid=v[1],
                                        deductible_charged=v[2]) for k, v in self.layers.items()])

    def normalized(self) -> tuple:
        return (self.admissions, self.compliant_total,
                {k: list(v) for k, v in sorted(self.layers.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
                 if any(v)})


def delta_layers(d: pb.AccumulatorDelta) -> list:
    return [(e.layer, e.cap_group or None, e.position, e.paid, e.deductible_charged) for e in d.layers]


# --------------------------------------------------------------------------- the step


class Work(NamedTuple):
    """One claim to settle: the request, the registry facts at its settle_time, its key."""

    claim: pb.Claim
    basis: Basis
    key: tuple  # (person_id, region, scheme, year)


class Outcome(NamedTuple):
    """An accepted claim: the response (without ledger_seq / recorded_at) and its deltas."""

    response: pb.SettleResponse
    d_adm: int
    d_ct: int


def precheck(claim: pb.Claim) -> Optional[CallError]:
    """What the server checks before it looks the claim up anywhere."""
    cid = claim.claim_id
    if not cid:
        return CallError(E.MISSING_FIELD, "claim_id is empty; give every settlement a unique id "
                         "(the idempotency key)", field="claim_id")
    if len(cid) > MAX_ID_LEN:
        return CallError(E.INVALID_VALUE, f"claim_id is longer than {MAX_ID_LEN} characters", field="claim_id",
                         claim_id=cid[:MAX_ID_LEN])
    if not claim.person_id:
        return CallError(E.MISSING_FIELD, "person_id is empty; give the insured person's id (psn_no)",
                         field="person_id", claim_id=cid)
    if not claim.facility_id:
        return CallError(E.MISSING_FIELD, "facility_id is empty; give the settling facility's id",
                         field="facility_id", claim_id=cid, person_id=claim.person_id)
    if len(claim.facility_id) > MAX_ID_LEN:
        return CallError(E.INVALID_VALUE, f"facility_id is longer than {MAX_ID_LEN} characters",
                         field="facility_id", claim_id=cid, person_id=claim.person_id)
    if len(claim.disease_code) > MAX_CODE_LEN:
        return CallError(E.INVALID_VALUE, f"disease_code is longer than {MAX_CODE_LEN} characters; give the "
                         "ICD-10 code of the main diagnosis", field="disease_code", claim_id=cid,
                         person_id=claim.person_id)
    if not claim.HasField("settle_time_us"):
        return CallError(E.MISSING_FIELD, "settle_time_us is not set; give the settlement's local wall time "
                         "(µs since 1970-01-01T00:00:00)", field="settle_time_us", claim_id=cid,
                         person_id=claim.person_id)
    return None


class Core:
    """Engine calls against one loaded policy set."""

    def __init__(self, policies, *, verify: bool = False):
        self.ps = policies
        self.verify = verify
        self._policy_cache: dict = {}
        self._order_cache: dict = {}

    # ------------------------------------------------------------ policies

    def policy(self, region: str, scheme: str, year: int):
        """The year's first version: whether (region, scheme, year) has a policy at all."""
        k = (region, scheme, year)
        try:
            return self._policy_cache[k]
        except KeyError:
            p = self._policy_cache[k] = self.ps.find(region, scheme, year)
            return p

    def column_order(self, key: tuple) -> Optional[dict]:
        """(layer, cap_group) -> rank in the policy of `key` (layer order, then rule order)."""
        pk = key[1:]
        try:
            return self._order_cache[pk]
        except KeyError:
            pass
        versions = self.ps.versions(*pk)
        order = None
        if versions:
            # every version of the year shares the key's entries (spec section 4): their union, in
            # version order, then layer order, then rule order, each of a rule's cap groups
            order = {}
            for p in versions:
                for layer in p.layers:
                    for rule in layer.rules:
                        for group in (rule.cap_groups or (None,)):
                            order.setdefault((layer.name, group), len(order))
        self._order_cache[pk] = order
        return order

    # ------------------------------------------------------------ tables

    @staticmethod
    def claim_rows(works: list) -> list:
        """The claims as `engine.Settler.settle_rows` takes them (CLAIMS_SCHEMA column order)."""
        return [(c.claim_id, c.person_id, b.region, b.scheme, c.settle_time_us, _enum_str(c.visit_type, VISIT),
                 _enum_str(c.facility_level, LEVEL), _enum_str(c.locality, LOCALITY), c.referred,
                 c.disease_code or None, b.age, b.identities, c.total_amount, c.self_funded_amount,
                 c.over_limit_amount, c.class_b_copay_amount, c.in_scope_amount, c.in_scope_class_b_amount)
                for c, b in ((w.claim, w.basis) for w in works)]

    def carried(self, keys, accs: dict) -> list:
        """The carried-in accumulators (`engine.Settler.carry_in_rows` rows) of those `keys`
        that hold something and have a policy."""
        out = []
        for key in keys:
            a = accs.get(key)
            if a is None or self.policy(*key[1:]) is None:
                continue
            out.append((*key, a.admissions, a.compliant_total, a.layers.items()))
        return out

    # ------------------------------------------------------------ settle

    def settle(self, works: list, accs: dict, apply: Optional[list] = None) -> list:
        """Settles `works` as one engine chunk against `accs` (key -> Acc, updated in
        place for accepted claims, except where `apply[i]` is false: a pre-settlement).
        Works of one key must be given in (settle_time, claim_id) order, a
        pre-settlement last. Returns, per work, an Outcome or a CallError."""
        if not works:
            return []
        keys = [w.key for w in works]
        try:
            settler = engine.Settler(self.ps, deltas=True)
            settler.carry_in_rows(self.carried(dict.fromkeys(keys), accs))
        except engine.AccumulatorError as e:
            if len(works) == 1:
                return [self._carry_error(works[0], e)]
            out = []
            for i, w in enumerate(works):  # isolate the key whose stored accumulators the policy rejects
                out.extend(self.settle([w], accs, None if apply is None else [apply[i]]))
            return out
        rows = settler.settle_rows(self.claim_rows(works))
        out = []
        for i, w in enumerate(works):
            row = rows[i]
            st = row["status"]
            if st != "ok":
                out.append(self.describe(st, w, accs.get(w.key)))
                continue
            dl = row["delta_layers"]
            d_layers = [(e["layer"], e["cap_group"], e["position"], e["paid"], e["deductible_charged"]) for e in dl]
            d_adm = row["delta_admissions"]
            d_ct = row["delta_compliant_total"]
            acc = accs.get(w.key)
            if apply is not None and not apply[i]:
                acc = acc.copy() if acc is not None else Acc()
            elif acc is None:
                acc = accs[w.key] = Acc()
            acc.add(d_adm, d_ct, d_layers)
            c = w.claim
            b = w.basis
            result = pb.SettlementResult(
                claim_id=c.claim_id, status="ok", policy_id=row["policy_id"], identity=row["identity"] or "",
                **{name: row[name] for name in RESULT_INT_FIELDS},
                layer_pays=[pb.LayerPay(layer=e["layer"], pay=e["pay"]) for e in row["layer_pays"]],
                cap_hit=row["cap_hit"])
            resp = pb.SettleResponse(
                result=result, accumulators=acc.to_pb(w.key, self.column_order(w.key)),
                basis=pb.SettlementBasis(region=b.region, scheme=SCHEME_TO_PB[b.scheme], year=b.year, age=b.age,
                                         identities=b.identities or ()),
                delta=pb.AccumulatorDelta(admissions=d_adm, compliant_total=d_ct, layers=[
                    pb.LayerAccumulator(layer=e["layer"], cap_group=e["cap_group"] or "", position=e["position"],
                                        paid=e["paid"], deductible_charged=e["deductible_charged"]) for e in dl]))
            out.append(Outcome(resp, d_adm, d_ct))
        if self.verify:
            self._verify(settler.accumulators(), accs,
                         [k for i, k in enumerate(keys) if apply is None or apply[i]])
        return out

    def _verify(self, closing: pa.Table, accs: dict, keys: list) -> None:
        eng = {}
        for r in closing.to_pylist():
            eng[(r["person_id"], r["region"], r["scheme"], r["year"])] = Acc(
                r["admissions"], r["compliant_total"],
                {(e["layer"], e["cap_group"]): [e["position"], e["paid"], e["deductible_charged"]]
                 for e in r["layers"]}).normalized()
        for key in set(keys):
            mine = accs[key].normalized() if key in accs else Acc().normalized()
            theirs = eng.get(key, Acc().normalized())
            if mine != theirs:
                raise AssertionError(f"accumulators of {key}: fold of deltas {mine} != engine {theirs}")

    # ------------------------------------------------------------ errors

    def _carry_error(self, w: Work, e: Exception) -> CallError:
        return CallError(E.UNKNOWN_POLICY,
                         f"the stored accumulators of {w.key} do not fit the loaded policy ({e}); the policy file "
                         f"for that region, scheme and year was changed after claims were settled under it",
                         grpc_code=None, claim_id=w.claim.claim_id, person_id=w.claim.person_id)

    def describe(self, status: str, w: Work, acc: Optional[Acc]) -> CallError:
        """A CallError with an actionable message for an engine status."""
        c, b = w.claim, w.basis
        code = STATUS_CODE[status]
        kw = dict(claim_id=c.claim_id, person_id=c.person_id)
        advice = ADVICE.get(status, "")
        if status == "MISSING_FIELD":
            for name, names in ENUM_FIELDS:
                if getattr(c, name) == 0:
                    return CallError(code, f"{name} is not set; {advice}", field=name, **kw)
            return CallError(code, f"a required value is missing; {advice}", **kw)
        if status == "INVALID_VALUE":
            for name, names in ENUM_FIELDS:
                v = getattr(c, name)
                if v != 0 and v not in names:
                    return CallError(code, f"{name} {v} is not a known value; {advice}", field=name, **kw)
            return CallError(code, f"a value is not one of the allowed ones; {advice}", **kw)
        if status == "INVALID_AMOUNT":
            for name in AMOUNT_FIELDS:
                if getattr(c, name) < 0:
                    return CallError(code, f"{name} is {getattr(c, name)}; {advice}", field=name, **kw)
            return CallError(code, advice, **kw)
        if status == "AMOUNT_OUT_OF_RANGE":
            for name in AMOUNT_FIELDS:
                if getattr(c, name) > MAX_AMOUNT:
                    return CallError(code, f"{name} is {getattr(c, name)} fen; {advice}", field=name, **kw)
            ct = acc.compliant_total if acc is not None else 0
            return CallError(code, f"this claim would take the year's compliant total of person {c.person_id} "
                             f"({b.region}, {b.scheme}, {b.year}) from {ct} fen above 10^14 fen; check the amounts "
                             f"of this and earlier claims", grpc_code=grpc.StatusCode.FAILED_PRECONDITION, **kw)
        if status == "AMOUNT_MISMATCH":
            parts = c.self_funded_amount + c.over_limit_amount + c.class_b_copay_amount + c.in_scope_amount
            if parts != c.total_amount:
                return CallError(code, f"total_amount {c.total_amount} != self_funded + over_limit + class_b_copay + "
                                 f"in_scope = {parts}; {advice}", field="total_amount", **kw)
            return CallError(code, f"in_scope_class_b_amount {c.in_scope_class_b_amount} exceeds in_scope_amount "
                             f"{c.in_scope_amount}", field="in_scope_class_b_amount", **kw)
        if status == "UNKNOWN_POLICY":
            return CallError(code, f"no policy for region {b.region}, scheme {b.scheme}, year {b.year} (person "
                             f"{c.person_id} per the registry); {advice}", field="settle_time_us", **kw)
        if status == "UNKNOWN_IDENTITY":
            declared = self.ps.year_identities(b.region, b.scheme, b.year)
            bad = [x if x is not None else "(null)" for x in (b.identities or ()) if x not in declared]
            return CallError(code, f"identity {', '.join(bad)} of person {c.person_id} is declared by no policy "
                             f"version of ({b.region}, {b.scheme}, {b.year}); {advice}", **kw)
        if status == "DUPLICATE_CLAIM":
            return CallError(code, f"claim_id {c.claim_id} is already used", field="claim_id", **kw)
        if status == "NO_BENEFIT_RULE":
            day = dt.date(1970, 1, 1) + dt.timedelta(microseconds=c.settle_time_us)
            p = self.ps.in_force(b.region, b.scheme, day)
            return CallError(code, f"policy {p.id if p else '?'} has no basic-layer rule for a "
                             f"{VISIT.get(c.visit_type)} visit at a {LEVEL.get(c.facility_level)} facility "
                             f"({LOCALITY.get(c.locality)}); {advice}", **kw)
        return CallError(code, status, **kw)
