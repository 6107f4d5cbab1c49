"""Reference settlement: SETTLEMENT.md sections 4, 5 and 7 (revision 2) in plain Python.

The test oracle. Written straight from the spec text, independent of the
engine's code: it reads `engine.model` policies (fen / basis points) and claim
dicts (the columns of section 2, as `pa.Table.to_pylist()` gives them), keeps
the accumulators in dicts and uses integers only, rounding half up.

    results, accumulators = settle(policies, claims, accumulators=None)
    results, accumulators = settle_stream(policies, [chunk1, chunk2], accumulators=None)

`policies` is a PolicySet, a Policy or a sequence of Policy objects.
Accumulators: {(person_id, region, scheme, year): {"admissions": int,
"compliant_total": int, "layers": {(layer, cap_group or None): [position, paid,
deductible_charged]}}}.

Revision 2: the version in force on the claim's settle date settles it (found
here from the policies' `effective_from`, not through PolicySet's lookup), the
year's versions share the key's accumulators by (layer, cap group) names, an
identity is unknown only if no version of the year declares it (names the
version in force doesn't declare are not held), cap adjustments act on every
rule kind, and a rule's caps may be nested.
"""
from __future__ import annotations

import copy

BP = 10_000
MAX_AMOUNT = 10**12
MAX_COMPLIANT_TOTAL = 10**14
MAX_CARRY = 10**14
MAX_COMBINED_CAP_FACTOR = 10**6  # 5.2 step 2: c = min(10^6, ...)

STATUSES = ("ok", "MISSING_FIELD", "INVALID_VALUE", "INVALID_AMOUNT", "AMOUNT_OUT_OF_RANGE",
            "AMOUNT_MISMATCH", "UNKNOWN_POLICY", "UNKNOWN_IDENTITY", "DUPLICATE_CLAIM", "NO_BENEFIT_RULE")

FUND_COLUMNS = {"basic": "basic_pay", "supplementary": "supplementary_pay",
                "critical_illness": "critical_illness_pay", "medical_aid": "medical_aid_pay",
                "guarantee": "guarantee_pay"}
AMOUNT_RESULT_FIELDS = ("deductible_applied", *FUND_COLUMNS.values(), "fund_pay_total",
                        "personal_pay", "compliant_personal_pay")
RESULT_FIELDS = ("claim_id", "status", "policy_id", "identity", *AMOUNT_RESULT_FIELDS, "layer_pays", "cap_hit")

REQUIRED = ("claim_id", "person_id", "region", "scheme", "settle_time", "visit_type", "facility_level",
            "locality", "total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
            "in_scope_amount")
ENUMS = {"scheme": ("employee", "resident"),
         "visit_type": ("inpatient", "outpatient", "chronic", "maternity"),
         "facility_level": ("primary", "secondary", "tertiary"),
         "locality": ("county", "region", "province", "national")}
AMOUNTS = ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
           "in_scope_amount", "in_scope_class_b_amount")


class AccumulatorError(ValueError):
    pass


def rnd(n: int, d: int = BP) -> int:
    """round(n / d), half up, n >= 0 (section 1)."""
    assert n >= 0, n
    return (n + d // 2) // d


# --------------------------------------------------------------------------- policies and matching


def _all(policies):
    if hasattr(policies, "layers"):  # one Policy
        return (policies,)
    if hasattr(policies, "policies"):  # PolicySet
        return policies.policies
    return tuple(policies)


def year_versions(policies, region, scheme, year):
    """Every version of (region, scheme, year), earliest effective_from first."""
    found = [p for p in _all(policies) if p.region == region and p.scheme == scheme and p.year == year]
    return sorted(found, key=lambda p: p.effective_from)


def find_policy(policies, region, scheme, when):
    """Section 5: the version with the latest effective_from on or before the calendar
    date of `when` (a datetime) within its year; None if there is none."""
    day = when.date()
    best = None
    for p in year_versions(policies, region, scheme, when.year):
        if p.effective_from <= day:
            best = p
    return best


def year_identities(policies, region, scheme, year):
    """Names declared by any version of the year."""
    return {n for p in year_versions(policies, region, scheme, year) for n in p.identities}


def held_identities(c, P):
    """The claim's identities that P declares: the others (declared by another version of
    the year) are treated as not held."""
    return [h for h in c["identities"] or [] if h in P.identities]


def in_disease_group(P, group, code) -> bool:
    """6.2: trimmed, upper-cased, first three characters compared as strings."""
    if code is None:
        return False
    code = code.strip().upper()
    if len(code) < 3:
        return False
    cat = code[:3]
    return any(lo <= cat <= hi for lo, hi in P.disease_groups[group])


def matches(m, c, e, P) -> bool:
    """6.3: a conjunction; an absent (None) key matches anything."""
    held = held_identities(c, P)
    if m.visit_type is not None and c["visit_type"] not in m.visit_type:
        return False
    if m.facility_level is not None and c["facility_level"] not in m.facility_level:
        return False
    if m.locality is not None and c["locality"] not in m.locality:
        return False
    if m.referred is not None and bool(c["referred"]) != m.referred:  # null = false
        return False
    if m.identity is not None and (e is None or e not in m.identity):
        return False
    if m.holds is not None and not any(h in m.holds for h in held):
        return False
    if m.disease_group is not None and not any(
            in_disease_group(P, g, c["disease_code"]) for g in m.disease_group):
        return False
    if m.min_age is not None and (c["age"] is None or c["age"] < m.min_age):
        return False
    if m.max_age is not None and (c["age"] is None or c["age"] > m.max_age):
        return False
    return True


def first_rule(L, c, e, P):
    return next((r for r in L.rules if matches(r.match, c, e, P)), None)


# --------------------------------------------------------------------------- validation (section 7)


def static_status(c, policies):
    """The row checks that need no accumulator, in the precedence order of
    section 7 up to UNKNOWN_IDENTITY; returns (status or None, policy)."""
    if any(c.get(k) is None for k in REQUIRED):
        return "MISSING_FIELD", None
    if any(c[k] not in vals for k, vals in ENUMS.items()):
        return "INVALID_VALUE", None
    amounts = [c[k] for k in AMOUNTS if c.get(k) is not None]
    if any(a < 0 for a in amounts):
        return "INVALID_AMOUNT", None
    if any(a > MAX_AMOUNT for a in amounts):
        return "AMOUNT_OUT_OF_RANGE", None
    class_b = c.get("in_scope_class_b_amount") or 0
    if (c["total_amount"] != c["self_funded_amount"] + c["over_limit_amount"]
            + c["class_b_copay_amount"] + c["in_scope_amount"]) or class_b > c["in_scope_amount"]:
        return "AMOUNT_MISMATCH", None
    P = find_policy(policies, c["region"], c["scheme"], c["settle_time"])
    if P is None:
        return "UNKNOWN_POLICY", None
    known = year_identities(policies, c["region"], c["scheme"], c["settle_time"].year)
    if any(h is None or h not in known for h in c["identities"] or []):  # a null item: unknown (section 2)
        return "UNKNOWN_IDENTITY", None
    return None, P


# --------------------------------------------------------------------------- one claim (section 5)


def integral(y, D, ratios, uptos, bounds):
    """F(y): exact integral (fen x bp) of the ratio from 0 to y; [0, D) pays 0.
    Segment i spans [upto[i-1], upto[i]) (shifted by D for above_deductible)."""
    shift = D if bounds == "above_deductible" else 0
    total, lo = 0, 0
    for upto, r in zip(uptos, ratios):
        a = max(lo + shift, D)
        b = y if upto is None else min(upto + shift, y)
        if b > a:
            total += (b - a) * r
        if upto is None:
            break
        lo = upto
    return total


def settle_claim(c, P, acc, key):
    """Settle one valid claim against its key's accumulators; returns the result
    dict or an error code (then nothing has changed)."""
    held = held_identities(c, P)
    e = next((n for n in P.identities if n in held), None)
    in_scope = c["in_scope_amount"]
    class_b = c.get("in_scope_class_b_amount") or 0
    K = in_scope + (c["class_b_copay_amount"] if P.compliant_includes_class_b_copay else 0)

    a = acc.get(key) or {"admissions": 0, "compliant_total": 0, "layers": {}}
    if a["compliant_total"] + K > MAX_COMPLIANT_TOTAL:
        return "AMOUNT_OUT_OF_RANGE"
    if first_rule(P.layers[0], c, e, P) is None:
        return "NO_BENEFIT_RULE"
    acc[key] = a

    res = {f: 0 for f in AMOUNT_RESULT_FIELDS}
    res.update(claim_id=c["claim_id"], status="ok", policy_id=P.id, identity=e, layer_pays=[], cap_hit=False)
    total_paid = 0
    inpatient = c["visit_type"] == "inpatient"
    for li, L in enumerate(P.layers):
        R = first_rule(L, c, e, P)
        if R is not None:
            base = in_scope if li == 0 else K - total_paid
            groups = tuple(R.cap_groups)
            # The first group's entry (or the none entry) holds position and deductible_charged.
            ent = a["layers"].setdefault((L.name, groups[0] if groups else None), [0, 0, 0])
            charged = 0
            # 2. adjustments, every kind of rule: deductible and ratios act on ratio / segments
            # rules only, the cap factor and uncapped on all.
            ratio_rule = R.kind in ("segments", "class_ratio")
            ratios = (list(R.class_ratio) if R.kind == "class_ratio" else [s.ratio for s in R.segments])
            g, cf, uncapped = BP, BP, False
            for A in L.adjustments:
                if not matches(A.match, c, e, P):
                    continue
                if ratio_rule:
                    if A.deductible_factor is not None:
                        g = rnd(g * A.deductible_factor)
                    if A.ratio is not None:
                        ratios = [A.ratio] * len(ratios)
                    if A.ratio_add is not None:
                        ratios = [r + A.ratio_add for r in ratios]
                if A.cap_factor is not None:
                    cf = min(MAX_COMBINED_CAP_FACTOR, rnd(cf * A.cap_factor))
                if A.uncapped:
                    uncapped = True
            ratios = [min(BP, max(0, r)) for r in ratios]
            if R.kind == "fixed_amount":
                raw = min(R.fixed_amount, base)
            elif R.kind == "max_personal_share":
                raw = max(0, base - rnd(R.max_personal_share * K))
            else:
                # 5. deductible
                Dr = R.deductible
                if R.repeat_admission and R.axis == "claim" and inpatient and li == 0:
                    fs = P.repeat_factors
                    f = fs[min(a["admissions"], len(fs) - 1)]
                    Dr = rnd(R.deductible * f)
                    if f < BP:
                        Dr = max(Dr, min(P.repeat_floor, R.deductible))
                D = rnd(Dr * g)
                # 6. class ratios or segments
                if R.kind == "class_ratio":
                    cls_a, cls_b = in_scope - class_b, class_b
                    elig_a = max(0, cls_a - D)
                    elig_b = max(0, cls_b - max(0, D - cls_a))
                    raw = rnd(elig_a * ratios[0] + elig_b * ratios[1])
                    charged = min(base, D)
                else:
                    start = ent[0] if R.axis == "year" else 0
                    end = start + base
                    if R.axis == "year":
                        ent[0] = end
                    uptos = [s.upto for s in R.segments]
                    raw = (rnd(integral(end, D, ratios, uptos, R.bounds))
                           - rnd(integral(start, D, ratios, uptos, R.bounds)))
                    charged = max(0, min(end, D) - start)
            # 7. cap: the least room over the rule's groups, each cap scaled by the cap factor
            if not groups or uncapped:
                pay = raw
            else:
                room = min(max(0, rnd(L.cap_groups[name] * cf) - a["layers"].get((L.name, name), [0, 0, 0])[1])
                           for name in groups)
                pay = min(raw, room)
                if pay < raw:
                    res["cap_hit"] = True
            for name in groups[1:]:
                a["layers"].setdefault((L.name, name), [0, 0, 0])[1] += pay
            ent[1] += pay
            ent[2] += charged
            # 8. fund column, layer_pays
            res[FUND_COLUMNS[L.fund]] += pay
            if pay > 0:
                res["layer_pays"].append({"layer": L.name, "pay": pay})
            total_paid += pay
            if li == 0:
                res["deductible_applied"] = charged
        if li == 0 and inpatient:
            a["admissions"] += 1
    a["compliant_total"] += K
    res["fund_pay_total"] = total_paid
    res["personal_pay"] = c["total_amount"] - total_paid
    res["compliant_personal_pay"] = K - total_paid
    return res


# --------------------------------------------------------------------------- a call (section 4)


def error_result(c, status):
    res = {f: 0 for f in AMOUNT_RESULT_FIELDS}
    res.update(claim_id=c.get("claim_id"), status=status, policy_id=None, identity=None,
               layer_pays=[], cap_hit=False)
    return res


def check_carry(accumulators):
    for key, a in accumulators.items():
        vals = [a["admissions"], a["compliant_total"]] + [v for e in a["layers"].values() for v in e]
        if any(not (0 <= v <= MAX_CARRY) for v in vals):
            raise AccumulatorError(f"accumulator {key}: value out of [0, 10^14]")


def sort_key(c):
    return (c["settle_time"], c["claim_id"].encode("utf-8"))


def settle_stream(policies, chunks, accumulators=None):
    """A stream of chunks is one call: duplicates over the whole call in input
    order, each chunk settled in its own (settle_time, claim_id bytes) order."""
    acc = copy.deepcopy(accumulators) if accumulators else {}
    check_carry(acc)
    seen = set()
    results = []
    for chunk in chunks:
        out = [None] * len(chunk)
        todo = []
        for i, c in enumerate(chunk):
            status, P = static_status(c, policies)
            cid = c.get("claim_id")
            if status is None and cid in seen:
                status = "DUPLICATE_CLAIM"
            if cid is not None:
                seen.add(cid)
            if status is None:
                todo.append((i, c, P))
            else:
                out[i] = error_result(c, status)
        todo.sort(key=lambda t: sort_key(t[1]))  # stable
        for i, c, P in todo:
            key = (c["person_id"], c["region"], c["scheme"], c["settle_time"].year)
            r = settle_claim(c, P, acc, key)
            out[i] = error_result(c, r) if isinstance(r, str) else r
        results.extend(out)
    return results, acc


def settle(policies, claims, accumulators=None):
    return settle_stream(policies, [list(claims)], accumulators)


def normalize_accumulators(acc: dict) -> dict:
    """Drop what section 4 allows to leave out: all-zero layer entries, empty keys."""
    out = {}
    for key, a in acc.items():
        layers = {k: tuple(v) for k, v in a["layers"].items() if any(v)}
        if a["admissions"] or a["compliant_total"] or layers:
            out[key] = (a["admissions"], a["compliant_total"], layers)
    return out
