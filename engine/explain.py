"""Why a claim was paid what it was: the kernel's own trace of one claim, in words.

`explain` settles the call with the kernel recording the chosen claim's steps
(rule per layer, deductible, axis slice, ratios, cap, accumulators before and
after), so the explanation can never drift from the calculation.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _kernel
from .arrow_io import build_results
from .compile import CompiledPolicies
from .model import BP, KIND_CLASS_RATIO, KIND_FIXED_AMOUNT, KIND_MAX_PERSONAL_SHARE, Rule
from .schema import format_yuan as _yuan
from .settle import Settler, _one_batch

T = {name: i for i, name in enumerate(
    ("rule", "base", "deductible_rule", "factor_g", "deductible", "start", "end", "ratio_replace", "ratio_add",
     "raw", "cap", "paid_before", "pay", "deductible_charged", "repeat_factor"))}
assert len(T) == _kernel.TRACE_NFIELDS


def _pct(bp: int) -> str:
    return f"{bp / 100:g}%"


def _accumulators(row: np.ndarray, values: np.ndarray, columns) -> dict:
    """A key's accumulators from its state row (head) and its columns' [acc_width, 3] values."""
    out = {"admissions": int(row[0]), "compliant_total": int(row[1]), "layers": []}
    for j, (layer, cap_group) in enumerate(columns):
        pos, paid, dedc = (int(v) for v in values[j])
        out["layers"].append({"layer": layer, "cap_group": cap_group, "position": pos, "paid": paid,
                              "deductible_charged": dedc})
    return out


def _segments_crossed(rule: Rule, step: dict) -> list[dict]:
    """The slices of [start, end) by ratio, after the deductible, as the kernel integrated them."""
    D, start, end = step["deductible"], step["start"], step["end"]
    lo, out = 0, []
    for seg in rule.segments:
        hi = None if seg.upto is None else seg.upto + (D if rule.bounds == "above_deductible" else 0)
        ratio = step["ratio_replace"] if step["ratio_replace"] >= 0 else seg.ratio
        ratio = min(max(ratio + step["ratio_add"], 0), BP)
        a, b = max(lo, D, start), end if hi is None else min(end, hi)
        if b > a:
            out.append({"from": a, "to": b, "ratio": ratio, "upto": hi})
        if hi is None or hi >= end:
            break
        lo = hi
    return out


def explain(claims, policies, claim_id: str, accumulators: pa.Table | None = None,
            row_numbers: list[int] | None = None) -> dict:
    """The step-by-step settlement of `claim_id` within its call (a table, settled as one chunk)."""
    settler = Settler(policies, accumulators)
    batch = claims if isinstance(claims, pa.RecordBatch) else _one_batch(claims)
    hits = np.nonzero(np.asarray(pc.equal(batch.column("claim_id"), claim_id).fill_null(False)))[0]
    if len(hits) == 0:
        raise KeyError(f"claim_id {claim_id!r} is not in the claims")
    row = int(hits[0])
    chunk = settler.prepare(batch)
    kernel_out = settler.run_kernel(chunk, trace_row=row)
    result = build_results(chunk.prep, settler.compiled, kernel_out, False).slice(row, 1).to_pylist()[0]
    trace, trace_acc, prep = kernel_out["trace"], kernel_out["trace_acc"], chunk.prep
    c: CompiledPolicies = settler.compiled
    claim = batch.slice(row, 1).to_pylist()[0]
    out = {"claim": claim, "result": result, "layers": []}
    if result["status"] != "ok":
        return out
    p = int(prep.policy[row])
    policy = c.policy_set.policies[p]
    out["policy_id"] = policy.id
    out["compliant_amount"] = result["compliant_personal_pay"] + result["fund_pay_total"]
    columns = c.acc_columns[p]
    values = settler.key_values(trace_acc, p, int(chunk.slot[row]))
    out["accumulators_before"] = _accumulators(trace_acc[0], values[0], columns)
    out["accumulators_after"] = _accumulators(trace_acc[1], values[1], columns)
    for li, layer in enumerate(policy.layers):
        step = {k: int(trace[li, i]) for k, i in T.items()}
        entry = {"layer": layer.name, "fund": layer.fund, "base": step["base"]}
        if step["rule"] < 0:
            entry["rule"] = None
            out["layers"].append(entry)
            continue
        rule_index = step["rule"] - int(c.layers["rule_start"][c.policies["layer_start"][p] + li])
        rule = layer.rules[rule_index]
        entry.update(rule_index=rule_index, kind=rule.kind, cap_group=rule.cap_group, axis=rule.axis,
                     raw=step["raw"], pay=step["pay"], paid_before=step["paid_before"],
                     cap=None if step["cap"] < 0 else step["cap"])
        if rule.kind not in (KIND_FIXED_AMOUNT, KIND_MAX_PERSONAL_SHARE):
            entry.update(deductible_rule=rule.deductible, repeat_factor=step["repeat_factor"],
                         deductible_after_repeat=step["deductible_rule"], adjustment_factor=step["factor_g"],
                         deductible=step["deductible"], start=step["start"], end=step["end"],
                         ratio_replace=None if step["ratio_replace"] < 0 else step["ratio_replace"],
                         ratio_add=step["ratio_add"], deductible_charged=step["deductible_charged"])
            if rule.kind != KIND_CLASS_RATIO:
                entry["segments"] = _segments_crossed(rule, step)
        elif rule.kind == KIND_FIXED_AMOUNT:
            entry["fixed_amount"] = rule.fixed_amount
        else:
            entry["max_personal_share"] = rule.max_personal_share
        out["layers"].append(entry)
    return out


def format_explanation(ex: dict) -> str:
    """A plain-text account an office can read out: one block per layer, amounts in yuan."""
    r = ex["result"]
    lines = [f"claim {r['claim_id']}: {r['status']}"]
    if r["status"] != "ok":
        lines.append("  not settled: every amount is 0 and no accumulator changed")
        return "\n".join(lines)
    claim = ex["claim"]
    lines.append(f"  policy {ex['policy_id']}; person {claim['person_id']}; {claim['visit_type']} at "
                 f"{claim['facility_level']} ({claim['locality']}); effective identity: {r['identity'] or 'none'}")
    lines.append(f"  total {_yuan(claim['total_amount'])}; in scope {_yuan(claim['in_scope_amount'])}; "
                 f"compliant amount K {_yuan(ex['compliant_amount'])}")
    b = ex["accumulators_before"]
    lines.append(f"  before: admissions {b['admissions']}, compliant total {_yuan(b['compliant_total'])}")
    for e in ex["layers"]:
        head = f"  layer {e['layer']} ({e['fund']}): base {_yuan(e['base'])}"
        if "rule_index" not in e:
            lines.append(head + "; no rule matches, pays 0")
            continue
        lines.append(head + f"; rule {e['rule_index']} ({e['kind']}, {e['axis']} axis"
                     + (f", cap group {e['cap_group']}" if e["cap_group"] else "") + ")")
        if "deductible" in e:
            d = f"    deductible {_yuan(e['deductible_rule'])}"
            if e["repeat_factor"] != BP:
                d += f" x repeat-admission factor {_pct(e['repeat_factor'])} = {_yuan(e['deductible_after_repeat'])}"
            if e["adjustment_factor"] != BP:
                d += f" x adjustment factor {_pct(e['adjustment_factor'])}"
            d += f" -> {_yuan(e['deductible'])}; charged now {_yuan(e['deductible_charged'])}"
            lines.append(d)
            if e["ratio_replace"] is not None or e["ratio_add"]:
                lines.append(f"    ratio adjusted: replace {_pct(e['ratio_replace']) if e['ratio_replace'] is not None else '-'}"
                             f", add {_pct(e['ratio_add'])}")
            lines.append(f"    slice of the axis [{_yuan(e['start'])}, {_yuan(e['end'])})")
            for s in e.get("segments", ()):
                upto = "no upper bound" if s["upto"] is None else f"segment up to {_yuan(s['upto'])}"
                lines.append(f"      {_yuan(s['from'])} .. {_yuan(s['to'])} at {_pct(s['ratio'])} ({upto})")
        elif "fixed_amount" in e:
            lines.append(f"    fixed amount {_yuan(e['fixed_amount'])}, at most the base")
        else:
            lines.append(f"    patient keeps at most {_pct(e['max_personal_share'])} of K")
        cap = "uncapped" if e["cap"] is None else (f"cap {_yuan(e['cap'])}, paid before {_yuan(e['paid_before'])}")
        lines.append(f"    raw {_yuan(e['raw'])}; {cap}; pays {_yuan(e['pay'])}"
                     + (" (cap hit)" if e["pay"] < e["raw"] else ""))
    a = ex["accumulators_after"]
    lines.append(f"  after: admissions {a['admissions']}, compliant total {_yuan(a['compliant_total'])}")
    for before, after in zip(b["layers"], a["layers"]):
        if before != after:
            lines.append(f"    {after['layer']}/{after['cap_group'] or '-'}: position {_yuan(before['position'])}"
                         f" -> {_yuan(after['position'])}, paid {_yuan(before['paid'])} -> {_yuan(after['paid'])},"
                         f" deductible charged {_yuan(before['deductible_charged'])} -> "
                         f"{_yuan(after['deductible_charged'])}")
    lines.append(f"  funds: basic {_yuan(r['basic_pay'])}, supplementary {_yuan(r['supplementary_pay'])}, "
                 f"critical illness {_yuan(r['critical_illness_pay'])}, medical aid {_yuan(r['medical_aid_pay'])}, "
                 f"guarantee {_yuan(r['guarantee_pay'])}; total {_yuan(r['fund_pay_total'])}")
    lines.append(f"  personal pay {_yuan(r['personal_pay'])} (compliant part {_yuan(r['compliant_personal_pay'])})")
    return "\n".join(lines)
