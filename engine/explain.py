"""Why a claim was paid what it was: the kernel's own trace of one claim, in the office's words.

`explain` settles the call with the kernel recording the chosen claim's steps
(rule per layer, deductible, axis slice, ratios, cap, accumulators before and
after), so the explanation can never drift from the calculation. Around the
numbers it puts what an office checks them against: each rule as its
conditions are written in the policy file, with the source comment of each
number (`# seed 002: …`, `# assumed: …`), rules numbered from 1 as a reader
counts them, the adjustments whose conditions the claim meets, the failed
check of an error claim, and the rows of a duplicated claim id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from . import _kernel
from .arrow_io import build_results
from .compile import CompiledPolicies, encode_category
from .detail import status_detail
from .model import BP, KIND_CLASS_RATIO, KIND_FIXED_AMOUNT, KIND_MAX_PERSONAL_SHARE, Match, Policy, Rule
from .schema import MAX_CAP_FACTOR
from .schema import format_yuan as _yuan
from .settle import Settler, _one_batch

# --------------------------------------------------------------------------- the kernel's trace (one place)

T = {name: i for i, name in enumerate(
    ("rule", "base", "deductible_rule", "factor_g", "deductible", "start", "end", "ratio_replace", "ratio_add",
     "raw", "cap", "paid_before", "pay", "deductible_charged", "repeat_factor"))}
assert len(T) == _kernel.TRACE_NFIELDS


def _traced(settler: Settler, batch: pa.RecordBatch, row: int) -> tuple[dict, list[dict], np.ndarray, Any]:
    """Settle `batch` as one chunk recording `row`: (its result, one dict of steps per layer of the
    trace, the key's state rows before and after, the chunk). Everything explain reads of the
    kernel's trace is read here."""
    chunk = settler.prepare(batch)
    kernel_out = settler.run_kernel(chunk, trace_row=row)
    results = build_results(chunk.prep, settler.compiled, kernel_out, False)
    trace = kernel_out.trace
    steps = [{k: int(trace[li, i]) for k, i in T.items()} for li in range(trace.shape[0])]
    return results, steps, kernel_out.trace_acc, chunk


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


# --------------------------------------------------------------------------- the policy file as written


def _comment(line: str) -> Optional[str]:
    """The trailing `# ...` of a YAML line (a '#' inside quotes is text), without the '#'."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[i + 1:].strip() or None
    return None


class PolicySource:
    """A policy file's YAML nodes by key path: the text of a value as written and the comment
    on its line. Read with PyYAML's composer (nodes keep their position in the text)."""

    def __init__(self, path):
        self.path = Path(path)
        self.text = self.path.read_text(encoding="utf-8")
        self.lines = self.text.splitlines()
        self.root = yaml.compose(self.text, Loader=yaml.SafeLoader)

    @classmethod
    def of(cls, policy: Policy) -> Optional["PolicySource"]:
        """The source of a policy loaded from a file; None for one built in memory."""
        if not policy.path or not Path(policy.path).is_file():
            return None
        try:
            return cls(policy.path)
        except (OSError, yaml.YAMLError):
            return None

    def node(self, *keys) -> Optional[yaml.Node]:
        n = self.root
        for k in keys:
            if isinstance(n, yaml.MappingNode) and isinstance(k, str):
                n = next((v for key, v in n.value if getattr(key, "value", None) == k), None)
            elif isinstance(n, yaml.SequenceNode) and isinstance(k, int) and 0 <= k < len(n.value):
                n = n.value[k]
            else:
                return None
            if n is None:
                return None
        return n

    def written(self, node: yaml.Node) -> str:
        """The value as written, on one line (a block mapping's lines joined by '; ')."""
        raw = self.text[node.start_mark.index:node.end_mark.index]
        parts = [ln.split(" #")[0].strip() for ln in raw.splitlines()]
        return "; ".join(p for p in parts if p and not p.startswith("#"))

    def comment(self, node: yaml.Node) -> Optional[str]:
        return _comment(self.lines[node.start_mark.line]) if node.start_mark.line < len(self.lines) else None


def _match_text(m: Match) -> str:
    """A Match as a policy file would write it (for policies built in memory)."""
    parts = []
    for key in ("visit_type", "facility_level", "locality", "referred", "identity", "holds", "disease_group",
                "min_age", "max_age"):
        v = getattr(m, key)
        if v is None:
            continue
        parts.append(f"{key}: [{', '.join(v)}]" if isinstance(v, tuple) else f"{key}: {str(v).lower()}")
    return "{" + ", ".join(parts) + "}"


def _numbers(src: Optional[PolicySource], path: tuple, rule_or_adj, layer) -> list[dict]:
    """The numbers of a rule or adjustment as written in the file (yuan, fractions), each with its
    line's comment; a rule's cap group with the group's annual cap."""
    out = []
    node = src.node(*path) if src else None
    if node is not None and isinstance(node, yaml.MappingNode):
        def walk(n, key_path):
            if isinstance(n, yaml.ScalarNode):
                if n.tag.rsplit(":", 1)[-1] not in ("int", "float"):
                    return  # a name or a flag (axis: year), not a number
                out.append({"key": key_path, "value": n.value, "comment": src.comment(n)})
            elif isinstance(n, yaml.MappingNode):
                for k, v in n.value:
                    walk(v, f"{key_path}.{k.value}" if key_path else k.value)
            elif isinstance(n, yaml.SequenceNode):
                for i, v in enumerate(n.value):
                    walk(v, f"{key_path}[{i + 1}]")

        for k, v in node.value:
            if k.value not in ("match", "cap_group"):
                walk(v, k.value)
    for cap_group in getattr(rule_or_adj, "cap_groups", ()):  # every group of nested caps, in order
        cap = src.node("layers", path[1], "cap_groups", cap_group) if src else None
        out.append({"key": f"cap_group {cap_group}", "value": cap.value if cap is not None else
                    _yuan(layer.cap_groups[cap_group]), "comment": src.comment(cap) if cap is not None else None,
                    "unit": "yuan a year"})
    return out


def _half_up(x: int) -> int:
    """x / BP rounded half up (x >= 0), as the kernel's round_div."""
    return (x + BP // 2) // BP


def _cap_adjustments(adjustments: list) -> tuple[int, bool]:
    """(the rule's cap factor in bp, uncapped) from the layer's adjustments that hold, in file
    order, as the kernel multiplies them: rounded after each factor, at most MAX_CAP_FACTOR."""
    factor, uncapped = BP, False
    for adj in adjustments:
        if adj.cap_factor is not None and adj.cap_factor != BP:
            factor = min(MAX_CAP_FACTOR, _half_up(factor * adj.cap_factor))
        uncapped |= bool(adj.uncapped)
    return factor, uncapped


def _cap_groups(rule: Rule, layer, step: dict, paid_before: dict, factor: int) -> list[dict]:
    """Each cap group of the rule (nested caps: each limits the pay, each grows by it): its
    annual cap, the cap after the cap factor, what was paid under it before this claim and the
    room left; `binding` marks the group the kernel's trace records as the one with the least
    room (its cap and paid before; the first on a tie), which limited the pay if pay < raw."""
    out = []
    for g in rule.cap_groups:
        annual = layer.cap_groups[g]
        cap = annual if factor == BP else _half_up(annual * factor)
        paid = paid_before.get((layer.name, g), 0)
        out.append({"cap_group": g, "annual_cap": annual, "cap": cap, "paid_before": paid,
                    "room": max(0, cap - paid), "binding": False})
    if out and step["cap"] >= 0:
        hit = next((e for e in out if (e["cap"], e["paid_before"]) == (step["cap"], step["paid_before"])), None)
        if hit is None:  # cannot happen while explain reads the kernel's own accumulators
            raise AssertionError(f"the kernel's cap {step['cap']} / paid before {step['paid_before']} is none "
                                 f"of the rule's cap groups {out}")
        hit["binding"] = True
    return out


def _conditions(src: Optional[PolicySource], path: tuple, match: Match) -> dict:
    node = src.node(*path, "match") if src else None
    if node is None:
        return {"conditions": _match_text(match), "comment": None}
    return {"conditions": src.written(node), "comment": src.comment(node)}


def _holds(m: Match, claim: dict, effective: Optional[str], policy: Policy) -> bool:
    """Section 6.3 for one claim (the kernel's masks do it for every claim of a chunk)."""
    for key in ("visit_type", "facility_level", "locality"):
        if getattr(m, key) is not None and claim[key] not in getattr(m, key):
            return False
    if m.referred is not None and bool(claim["referred"]) != m.referred:
        return False
    if m.identity is not None and effective not in m.identity:
        return False
    if m.holds is not None and not set(claim["identities"] or ()) & set(m.holds):
        return False
    age = claim["age"]
    if (m.min_age is not None or m.max_age is not None) and age is None:
        return False
    if (m.min_age is not None and age < m.min_age) or (m.max_age is not None and age > m.max_age):
        return False
    if m.disease_group is not None:
        code = (claim["disease_code"] or "").strip().upper()
        if len(code) < 3:
            return False
        c = encode_category(code)
        return any(encode_category(lo) <= c <= encode_category(hi)
                   for g in m.disease_group for lo, hi in policy.disease_groups.get(g, ()))
    return True


# --------------------------------------------------------------------------- explain


def explain(claims, policies, claim_id: str, accumulators: pa.Table | None = None,
            row_numbers: list[int] | None = None) -> dict:
    """The step-by-step settlement of `claim_id` within its call (a table, settled as one chunk).

    `row_numbers`: the file's row number of each row of `claims` (default: 1, 2, ...), used to
    say which row was the first with the id and which later ones were duplicates."""
    settler = Settler(policies, accumulators)
    batch = claims if isinstance(claims, pa.RecordBatch) else _one_batch(claims)
    hits = np.nonzero(np.asarray(pc.equal(batch.column("claim_id"), claim_id).fill_null(False)))[0]
    if len(hits) == 0:
        raise KeyError(f"claim_id {claim_id!r} is not in the claims")
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, batch.num_rows + 1))
    row = int(hits[0])
    results, steps, trace_acc, chunk = _traced(settler, batch, row)
    result = results.slice(row, 1).to_pylist()[0]
    c: CompiledPolicies = settler.compiled
    claim = batch.slice(row, 1).to_pylist()[0]
    out = {"claim": claim, "result": result, "row": numbers[row], "layers": []}
    if len(hits) > 1:
        statuses = results.column("status")
        out["duplicates"] = [{"row": numbers[int(i)], "status": statuses[int(i)].as_py()} for i in hits[1:]]
    if result["status"] != "ok":
        detail = status_detail(batch.slice(row, 1), results.slice(row, 1), c.policy_set)
        out["failed_check"] = detail[0].as_py()
        return out
    p = int(chunk.prep.policy[row])
    policy = c.policy_set.policies[p]
    src = PolicySource.of(policy)
    out["policy_id"] = policy.id
    out["policy_file"] = policy.path or None
    out["compliant_amount"] = result["compliant_personal_pay"] + result["fund_pay_total"]
    columns = c.acc_columns[p]
    values = settler.key_values(trace_acc, p, int(chunk.slot[row]))
    out["accumulators_before"] = _accumulators(trace_acc[0], values[0], columns)
    out["accumulators_after"] = _accumulators(trace_acc[1], values[1], columns)
    paid_before = {(e["layer"], e["cap_group"]): e["paid"] for e in out["accumulators_before"]["layers"]}
    for li, layer in enumerate(policy.layers):
        step = steps[li]
        entry = {"layer": layer.name, "fund": layer.fund, "base": step["base"], "rules": len(layer.rules)}
        if step["rule"] < 0:
            entry["rule"] = None
            out["layers"].append(entry)
            continue
        rule_index = step["rule"] - int(c.layers["rule_start"][c.policies["layer_start"][p] + li])
        rule = layer.rules[rule_index]
        path = ("layers", li, "rules", rule_index)
        entry.update(rule_index=rule_index, rule_number=rule_index + 1, kind=rule.kind, cap_group=rule.cap_group,
                     axis=rule.axis, **_conditions(src, path, rule.match),
                     numbers=_numbers(src, path, rule, layer),
                     raw=step["raw"], pay=step["pay"], paid_before=step["paid_before"],
                     cap=None if step["cap"] < 0 else step["cap"])
        adjustments, held = [], []
        for ai, adj in enumerate(layer.adjustments):
            if _holds(adj.match, claim, result["identity"], policy):
                apath = ("layers", li, "adjustments", ai)
                held.append(adj)
                adjustments.append({"number": ai + 1, **_conditions(src, apath, adj.match),
                                    "deductible_factor": adj.deductible_factor, "ratio": adj.ratio,
                                    "ratio_add": adj.ratio_add, "cap_factor": adj.cap_factor,
                                    "uncapped": adj.uncapped, "numbers": _numbers(src, apath, adj, layer)})
        entry["adjustments"] = adjustments
        factor, uncapped = _cap_adjustments(held)
        entry.update(cap_groups=_cap_groups(rule, layer, step, paid_before, factor), cap_factor=factor,
                     uncapped=uncapped and bool(rule.cap_groups))
        binding = next((g["cap_group"] for g in entry["cap_groups"] if g["binding"]), None)
        entry["limited_by"] = binding if step["pay"] < step["raw"] else None
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


# --------------------------------------------------------------------------- in words


def _source(n: dict) -> str:
    unit = f" {n['unit']}" if n.get("unit") else ""
    return f"{n['key']}: {n['value']}{unit}" + (f"  -- {n['comment']}" if n.get("comment") else "")


def _cap_lines(e: dict) -> list[str]:
    """The rule's cap groups: each cap (after the cap factor), paid before and room, and the
    one that limits the pay; or that an adjustment lifted them."""
    groups = e["cap_groups"]
    if not groups:
        return []
    if e["uncapped"]:
        return ["    caps lifted for this claim (uncapped): "
                + ", ".join(f"{g['cap_group']} {_yuan(g['annual_cap'])} a year" for g in groups)]
    lines = []
    if len(groups) > 1:
        lines.append(f"    nested caps (each limits the pay, each grows by it; {groups[0]['cap_group']} holds the "
                     "position and the deductible charged):")
    factor = "" if e["cap_factor"] == BP else f" x cap factor {_pct(e['cap_factor'])}"
    indent = "      " if len(groups) > 1 else "    "
    for g in groups:
        cap = _yuan(g["annual_cap"]) + (f"{factor} = {_yuan(g['cap'])}" if factor else "")
        mark = ""
        if g["binding"] and e["limited_by"]:
            mark = "  <- limits the pay"
        elif g["binding"] and len(groups) > 1:
            mark = "  <- least room (does not limit this pay)"
        lines.append(f"{indent}cap {g['cap_group']}: {cap} a year, paid before {_yuan(g['paid_before'])}, "
                     f"room {_yuan(g['room'])}{mark}")
    return lines


def format_explanation(ex: dict) -> str:
    """A plain-text account an office can read out: one block per layer, amounts in yuan."""
    r = ex["result"]
    where = f" (row {ex['row']})" if ex.get("row") else ""
    lines = [f"claim {r['claim_id']}{where}: {r['status']}"]
    dups = ex.get("duplicates") or []
    if dups:
        lines.append("  the first row with this claim_id; later rows with it: "
                     + ", ".join(f"row {d['row']} ({d['status']}, not settled)" for d in dups))
    if r["status"] != "ok":
        if ex.get("failed_check"):
            lines.append(f"  failed check: {ex['failed_check']}")
        lines.append("  not settled: every amount is 0 and no accumulator changed")
        return "\n".join(lines)
    claim = ex["claim"]
    policy = f"policy {ex['policy_id']}" + (f" ({Path(ex['policy_file']).name})" if ex.get("policy_file") else "")
    lines.append(f"  {policy}; person {claim['person_id']}; {claim['visit_type']} at "
                 f"{claim['facility_level']} ({claim['locality']}); effective identity: {r['identity'] or 'none'}")
    lines.append(f"  total {_yuan(claim['total_amount'])}; in scope {_yuan(claim['in_scope_amount'])}; "
                 f"compliant amount K {_yuan(ex['compliant_amount'])}")
    b = ex["accumulators_before"]
    lines.append(f"  before: admissions {b['admissions']}, compliant total {_yuan(b['compliant_total'])}")
    for e in ex["layers"]:
        head = f"  layer {e['layer']} ({e['fund']} fund): base {_yuan(e['base'])}"
        if "rule_index" not in e:
            lines.append(head + f"; none of its {e['rules']} rules matches, pays 0")
            continue
        lines.append(head + f"; rule {e['rule_number']} of {e['rules']} ({e['kind']}, {e['axis']} axis)")
        lines.append(f"    when {e['conditions']}" + (f"  -- {e['comment']}" if e.get("comment") else ""))
        for n in e.get("numbers", ()):
            lines.append(f"    {_source(n)}")
        for a in e.get("adjustments", ()):
            lines.append(f"    adjustment {a['number']} applies: when {a['conditions']}"
                         + (f"  -- {a['comment']}" if a.get("comment") else ""))
            for n in a["numbers"]:
                lines.append(f"      {_source(n)}")
            if a.get("uncapped"):
                lines.append("      uncapped: true (lifts every cap of the rule for this claim)")
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
        lines.extend(_cap_lines(e))
        if e["cap"] is None:
            tail = "; uncapped" if not e["cap_groups"] else "; caps lifted by an adjustment (uncapped)"
        else:
            tail = f" (cap hit: {e['limited_by']})" if e["limited_by"] else ""
        lines.append(f"    raw {_yuan(e['raw'])}; pays {_yuan(e['pay'])}{tail}")
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
