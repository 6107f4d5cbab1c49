"""Compile a PolicySet once into the numeric tables the kernel reads.

Each table is a numpy structured array whose int64 fields mirror a struct of
`_tables.pxd` in the same order. Names (identities, disease groups, layers,
cap groups) become small integer codes here; the kernel never sees a string.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np

from . import _columns, _kernel
from ._tables import PolicyTables
from .model import (
    BP,
    FACILITY_LEVELS,
    FUNDS,
    KIND_CLASS_RATIO,
    KIND_FIXED_AMOUNT,
    KIND_MAX_PERSONAL_SHARE,
    KIND_SEGMENTS,
    LOCALITIES,
    SCHEMES,
    VISIT_TYPES,
    Match,
    PolicySet,
)

POLICY_FIELDS = ("layer_start", "layer_count", "includes_class_b_copay", "repeat_start",
                 "repeat_count", "repeat_floor", "identity_mask", "rank_start", "rank_count",
                 "acc_width", "year_identity_mask", "key_policy")
LAYER_FIELDS = ("fund", "rule_start", "rule_count", "adjustment_start", "adjustment_count", "base_kind", "required",
                "repeat_applies", "reports_deductible")
RULE_FIELDS = ("kind", "match", "deductible", "axis", "above_deductible", "repeat_admission",
               "acc", "cap", "cap_start", "cap_count", "segment_start", "segment_count", "ratio_a", "ratio_b", "amount",
               "position_at", "paid_at", "charged_at")
CAP_FIELDS = ("acc", "paid_at", "cap")
SEGMENT_FIELDS = ("upto", "ratio")
ADJUSTMENT_FIELDS = ("match", "deductible_factor", "ratio", "ratio_add", "cap_factor", "uncapped")
MATCH_FIELDS = ("visit_mask", "level_mask", "locality_mask", "referred_mask", "effective_mask",
                "holds_mask", "disease_start", "disease_count", "min_age", "max_age", "profile_only")
RANGE_FIELDS = ("low", "high")

RULE_KIND_CODES = {KIND_SEGMENTS: 0, KIND_CLASS_RATIO: 1, KIND_FIXED_AMOUNT: 2,
                   KIND_MAX_PERSONAL_SHARE: 3}

# Bit 63 of a claim's identity mask: a name no policy of the set declares. Such a claim
# never reaches the rules (UNKNOWN_IDENTITY), so the kernel reuses the bit there: set in
# every claim it matches, it is the whole of `holds_mask` for a match without `holds`.
UNDECLARED_IDENTITY_BIT = 63
ANY_HOLDS = -(1 << 63)
# max_age of a match without one: above any age, and above the null age the kernel tests with
MAX_AGE_ANY = 1 << 62


def _int64(bits: int) -> int:
    """An unsigned 64-bit mask as the int64 with the same bits."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def _table(fields, rows) -> np.ndarray:
    dtype = np.dtype([(f, np.int64) for f in fields])
    out = np.zeros(len(rows), dtype=dtype)
    for i, row in enumerate(rows):
        out[i] = tuple(row[f] for f in fields)
    return out


def encode_category(code: str) -> int:
    """A 3-character ICD-10 category as one int64 that sorts like the string."""
    a, b, c = (ord(ch) for ch in code[:3])
    return (a << 42) | (b << 21) | c


def _mask(values, names) -> int:
    if values is None:
        return (1 << len(names)) - 1
    return sum(1 << names.index(v) for v in values)


@dataclass(frozen=True)
class CompiledPolicies:
    """The numeric form of a PolicySet plus the names needed to write results back."""

    policy_set: PolicySet
    policies: np.ndarray
    layers: np.ndarray
    rules: np.ndarray
    caps: np.ndarray  # per rule, its cap groups after the first: (accumulator column, paid_at, cap fen)
    segments: np.ndarray
    adjustments: np.ndarray
    matches: np.ndarray
    ranges: np.ndarray
    repeat_factors: np.ndarray
    identity_rank: np.ndarray
    identity_names: tuple[str, ...]  # global identity id -> name
    # per (layer, visit x level x locality profile): the rules / adjustments whose match
    # admits that profile, in file order, so the kernel tries only those
    rule_candidates: np.ndarray  # [layers, PROFILES, 2]: start, count into candidate_rules
    candidate_rules: np.ndarray
    adjustment_candidates: np.ndarray
    candidate_adjustments: np.ndarray
    layer_names: tuple[str, ...]  # global layer index -> name
    max_layers: int
    acc_width: int
    # per policy: column -> (layer, cap group); the same for every version of a year (their union),
    # as the versions share the year's accumulator keys
    acc_columns: tuple[tuple[tuple[str, str | None], ...], ...]
    # The accumulator state row of a key (see _state_layout): its width in int64, where each
    # (column, field) of a policy sits in it [policies, acc_width * ACC_FIELDS] (-1: not kept),
    # and per (policy, claim profile) the bit mask of the row's cache lines a claim may touch.
    state_width: int
    state_index: np.ndarray
    state_lines: np.ndarray
    # (region, scheme, year) -> the year's first version: the policy index its accumulator keys
    # are interned under, and whose names (region, scheme, year, columns) they are written with
    lookup: dict[tuple[str, str, int], int]
    # versions by date: (region, scheme, year) `lookup` index -> its versions' policy indices and
    # the microseconds (settle_time's local wall time) of 00:00 of their effective_from
    version_start: np.ndarray  # int32 per policy: start of its year's versions in version_* (year's first)
    version_count: np.ndarray  # int32 per policy
    version_from: np.ndarray   # int64
    version_policy: np.ndarray  # int32
    tables: PolicyTables  # the arrays above bound once for the kernel

    @property
    def policy_ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.policy_set.policies)

    @cached_property
    def identity_bits(self) -> dict[str, int]:
        """Identity name -> its bit in the kernel's identity masks."""
        return {name: 1 << i for i, name in enumerate(self.identity_names)}

    @cached_property
    def acc_column_index(self) -> list[dict]:
        """Per policy: (layer, cap_group) -> accumulator column."""
        return [{col: j for j, col in enumerate(cols)} for cols in self.acc_columns]

    def acc_values(self, state: np.ndarray, policy: np.ndarray) -> np.ndarray:
        """[rows, acc_width, ACC_FIELDS]: the accumulator columns of state rows of keys of
        `policy`, out of their compact layout (a field the row does not keep is 0)."""
        index = self.state_index[policy]
        values = np.take_along_axis(state, np.maximum(index, 0), axis=1)
        values[index < 0] = 0
        return values.reshape(len(policy), self.acc_width, ACC_FIELDS)

    @cached_property
    def names(self) -> "OutputNames":
        """Arrow arrays of the names results are written with, built once per policy set."""
        return OutputNames(self)


def _distinct(values: list) -> tuple:
    """(the distinct non-null values as a string array, each value's code among them, -1 for None)."""
    import pyarrow as pa

    names = sorted({v for v in values if v is not None})
    codes = np.array([names.index(v) if v is not None else -1 for v in values] or [-1], dtype=np.int32)
    return pa.array(names, pa.string()), codes


class OutputNames:
    """Name arrays for the result and accumulator columns, indexed by the kernel's codes."""

    def __init__(self, c: CompiledPolicies):
        import pyarrow as pa

        ps = c.policy_set.policies
        self.policy_ids = pa.array(list(c.policy_ids), pa.string())
        self.identities = pa.array(list(c.identity_names), pa.string())
        # layer names once each, and the code of each global layer among them: a dictionary
        # with a value twice is not one a Parquet writer can store as its dictionary page
        distinct = sorted(set(c.layer_names))
        self.layers = pa.array(distinct, pa.string())
        self.layer_codes = np.array([distinct.index(name) for name in c.layer_names] or [0], dtype=np.int32)
        width = c.acc_width
        # accumulator column j of policy p is at p * width + j
        # as codes into distinct names (-1: null), for plain and dictionary arrays alike
        self.acc_layer_names, self.acc_layer_codes = _distinct(
            [cols[j][0] if j < len(cols) else None for cols in c.acc_columns for j in range(width)])
        self.acc_cap_names, self.acc_cap_codes = _distinct(
            [cols[j][1] if j < len(cols) else None for cols in c.acc_columns for j in range(width)])
        self.regions = pa.array([p.region for p in ps], pa.string())
        self.schemes = pa.array([p.scheme for p in ps], pa.string())
        self.region_dictionary, self.region_codes = _distinct([p.region for p in ps])
        self.scheme_dictionary, self.scheme_codes = _distinct([p.scheme for p in ps])
        self.years = np.array([p.year for p in ps], dtype=np.int32)
        # policy lookup by (region code, scheme code, year - first year)
        self.region_names = sorted({region for region, _, _ in c.lookup})
        years = [y for _, _, y in c.lookup] or [0]
        self.first_year, self.last_year = min(years), max(years)
        self.policy_table = np.full((max(len(self.region_names), 1), len(SCHEMES),
                                     self.last_year - self.first_year + 1), -1, dtype=np.int32)
        for (name, sch, year), p in c.lookup.items():
            self.policy_table[self.region_names.index(name), SCHEMES.index(sch), year - self.first_year] = p
        self.policy_lookup = _columns.PolicyLookup(self.policy_table, self.first_year, c.version_start,
                                                   c.version_count, c.version_from, c.version_policy)


PROFILES = len(VISIT_TYPES) * len(FACILITY_LEVELS) * len(LOCALITIES)

STATE_HEAD = 2  # admissions, compliant_total: the first fields of every state row
ACC_FIELDS = 3  # position, paid, deductible_charged of an accumulator column
LINE_FIELDS = 8  # int64 per 64-byte cache line


def profile_code(visit: int, level: int, locality: int) -> int:
    """The claim profile index the kernel computes: visit x level x locality."""
    return (visit * len(FACILITY_LEVELS) + level) * len(LOCALITIES) + locality


def _check_kernel_profile() -> None:
    if (_kernel.PROFILE_SHAPE != (len(FACILITY_LEVELS), len(LOCALITIES))
            or (_kernel.STATE_HEAD, _kernel.ACC_FIELDS) != (STATE_HEAD, ACC_FIELDS)):
        raise ImportError("engine._kernel was built for other enums: rebuild it (pip install -e .)")


_check_kernel_profile()


def _candidates(layers: list[dict], key_start: str, key_count: str, items: list[dict], matches: list[dict],
                first_only: bool):
    """For each layer and profile, the items (rules or adjustments) that profile can match.

    The kernel tests only the other conditions of these. With `first_only`
    (rules: the first match wins) a list ends at its first item that every
    claim of the profile matches, since nothing after it can be chosen.
    """
    index = np.zeros((max(len(layers), 1), PROFILES, 2), dtype=np.int64)
    flat: list[int] = []
    for li, layer in enumerate(layers):
        for v in range(len(VISIT_TYPES)):
            for lv in range(len(FACILITY_LEVELS)):
                for lo in range(len(LOCALITIES)):
                    prof = profile_code(v, lv, lo)
                    index[li, prof, 0] = len(flat)
                    for j in range(layer[key_start], layer[key_start] + layer[key_count]):
                        m = matches[items[j]["match"]]
                        if (m["visit_mask"] >> v) & 1 and (m["level_mask"] >> lv) & 1 and (m["locality_mask"] >> lo) & 1:
                            flat.append(j)
                            if first_only and m["profile_only"]:
                                break
                    index[li, prof, 1] = len(flat) - index[li, prof, 0]
    return index, np.asarray(flat or [0], dtype=np.int64)


def _state_layout(policies: list[dict], layers: list[dict], rules: list[dict], caps: list[dict],
                  rule_candidates: np.ndarray, candidate_rules: np.ndarray, acc_width: int,
                  years: list[list[int]]) -> tuple[int, np.ndarray, np.ndarray]:
    """Where each accumulator field of a key sits in its state row; sets the rules' and caps' `*_at`.

    A key is (person, region, scheme, year): every version of the year (`years`: lists
    of policy indices) shares its row and so its layout, over the union of their columns.
    The loop reads one state row per claim, at random over hundreds of MB, so
    a row keeps only the fields some rule of the year writes (a position for
    year-axis segments, a deductible charged for segments and class ratios, a
    paid for every cap group and uncapped rule) and starts on a cache line. Columns are
    placed so that the claim profiles that touch few columns (ordinary outpatient visits,
    say) find them all in the row's first line next to the head; `state_lines`
    says which lines each profile of each version may touch, for the loop's prefetch.
    Returns (width, index [policies, acc_width * ACC_FIELDS], lines [policies, profiles]).
    """
    index = np.full((max(len(policies), 1), acc_width * ACC_FIELDS), -1, dtype=np.int64)
    profile_columns: dict[int, list[set[int]]] = {}
    used = 0

    def rule_columns(r: dict) -> list[int]:
        return [r["acc"]] + [caps[k]["acc"] for k in range(r["cap_start"], r["cap_start"] + r["cap_count"])]

    for versions in years:
        year_rules = []
        needs = [[False, False, False] for _ in range(policies[versions[0]]["acc_width"])]
        every_profile: list[set[int]] = []
        for pi in versions:
            pol = policies[pi]
            own = range(pol["layer_start"], pol["layer_start"] + pol["layer_count"])
            own_rules = [rules[j] for li in own for j in range(layers[li]["rule_start"],
                                                                 layers[li]["rule_start"] + layers[li]["rule_count"])]
            year_rules.extend(own_rules)
            for r in own_rules:
                year_segments = r["kind"] == RULE_KIND_CODES[KIND_SEGMENTS] and r["axis"] == 1
                charges = r["kind"] in (RULE_KIND_CODES[KIND_SEGMENTS], RULE_KIND_CODES[KIND_CLASS_RATIO])
                needs[r["acc"]][0] |= year_segments
                needs[r["acc"]][2] |= charges
                for col in rule_columns(r):
                    needs[col][1] = True
            per_profile = []
            for prof in range(PROFILES):
                cols = set()
                for li in own:
                    start, count = rule_candidates[li, prof]
                    for j in candidate_rules[start:start + count]:
                        cols.update(rule_columns(rules[int(j)]))
                per_profile.append(cols)
            profile_columns[pi] = per_profile
            every_profile.extend(per_profile)
        # columns of the profiles needing fewest first, in the order those profiles name them;
        # among as few, ordinary outpatient visits first (most claims are)
        outpatient = VISIT_TYPES.index("outpatient")
        order: list[int] = []
        ranked = sorted(range(len(every_profile)), key=lambda k: (
            len(every_profile[k]), (k % PROFILES) // (PROFILES // len(VISIT_TYPES)) != outpatient, k))
        for cols in (every_profile[k] for k in ranked):
            order.extend(sorted(c for c in cols if c not in order))
        order.extend(c for c in range(len(needs)) if c not in order)
        at = STATE_HEAD
        for col in order:
            for f in range(ACC_FIELDS):
                if needs[col][f]:
                    index[versions[0], col * ACC_FIELDS + f] = at
                    at += 1
        used = max(used, at)
        for pi in versions[1:]:
            index[pi] = index[versions[0]]
        row = index[versions[0]]
        for r in year_rules:
            r["position_at"], r["paid_at"], r["charged_at"] = (int(row[r["acc"] * ACC_FIELDS + f])
                                                               for f in range(ACC_FIELDS))
            for k in range(r["cap_start"], r["cap_start"] + r["cap_count"]):
                caps[k]["paid_at"] = int(row[caps[k]["acc"] * ACC_FIELDS + 1])
    # rows never straddle a line more than they must: a power of two below a line, whole lines above
    width = 1 << (used - 1).bit_length() if used <= LINE_FIELDS else -(-used // LINE_FIELDS) * LINE_FIELDS
    lines = np.zeros((max(len(policies), 1), PROFILES), dtype=np.int64)
    for pi, per_profile in profile_columns.items():
        for prof, cols in enumerate(per_profile):
            mask = 1  # the head
            for col in cols:
                for f in range(ACC_FIELDS):
                    if index[pi, col * ACC_FIELDS + f] >= 0:
                        mask |= 1 << min(int(index[pi, col * ACC_FIELDS + f]) // LINE_FIELDS, 63)
            lines[pi, prof] = _int64(mask)  # bit 63: that line and every one after it
    return width, index, lines


def _local_micros(day: datetime.date) -> int:
    """settle_time (local wall time, microseconds from 1970-01-01 00:00) of 00:00 of `day`."""
    return (day - datetime.date(1970, 1, 1)).days * 86_400_000_000


def _year_columns(versions) -> list[tuple[str, Optional[str]]]:
    """The (layer, cap group or None) accumulator entries the year's versions use, in order of first use."""
    columns: list[tuple[str, Optional[str]]] = []
    for p in versions:
        for layer in p.layers:
            for rule in layer.rules:
                for column in ([(layer.name, g) for g in rule.cap_groups] or [(layer.name, None)]):
                    if column not in columns:
                        columns.append(column)
    return columns


def compile_policies(policy_set: PolicySet) -> CompiledPolicies:
    identity_names: list[str] = []
    for p in policy_set.policies:
        for name in p.identities:
            if name not in identity_names:
                identity_names.append(name)
    if len(identity_names) > UNDECLARED_IDENTITY_BIT:
        raise ValueError(f"{policy_set.source or 'policy set'}: declares {len(identity_names)} identities; "
                         f"the engine holds at most {UNDECLARED_IDENTITY_BIT} distinct names per set")
    ident_bit = {name: i for i, name in enumerate(identity_names)}

    policies, layers, rules, segments, adjustments, matches, ranges = [], [], [], [], [], [], []
    repeat_factors: list[int] = []
    identity_rank: list[int] = []
    layer_names: list[str] = []
    acc_columns = []

    def add_match(m: Match, groups: dict) -> int:
        start = len(ranges)
        if m.disease_group is not None:
            for g in m.disease_group:
                for low, high in groups[g]:
                    ranges.append({"low": encode_category(low), "high": encode_category(high)})
        matches.append({
            "visit_mask": _mask(m.visit_type, VISIT_TYPES),
            "level_mask": _mask(m.facility_level, FACILITY_LEVELS),
            "locality_mask": _mask(m.locality, LOCALITIES),
            # bit 0: not referred (or null) passes, bit 1: referred passes
            "referred_mask": 3 if m.referred is None else 1 << int(m.referred),
            # bit e + 1 for an effective identity e that passes; bit 0 for none
            "effective_mask": -1 if m.identity is None else _int64(sum(1 << (ident_bit[x] + 1) for x in m.identity)),
            "holds_mask": ANY_HOLDS if m.holds is None else sum(1 << ident_bit[x] for x in m.holds),
            "disease_start": start,
            "disease_count": -1 if m.disease_group is None else len(ranges) - start,
            "min_age": -1 if m.min_age is None else m.min_age,
            "max_age": MAX_AGE_ANY if m.max_age is None else m.max_age,
        })
        # only visit type, level and locality: decided by the profile's candidate list alone
        matches[-1]["profile_only"] = int(m.referred is None and m.identity is None and m.holds is None
                                          and m.disease_group is None and m.min_age is None
                                          and m.max_age is None)
        return len(matches) - 1

    # the versions of each (region, scheme, year), earliest first: they share its accumulator keys
    year_versions: dict[tuple[str, str, int], list[int]] = {}
    for i, p in enumerate(policy_set.policies):
        year_versions.setdefault((p.region, p.scheme, p.year), []).append(i)
    for key, versions in year_versions.items():
        versions.sort(key=lambda i: policy_set.policies[i].effective_from)
    year_of = {i: key for key, versions in year_versions.items() for i in versions}
    year_columns = {key: _year_columns([policy_set.policies[i] for i in versions])
                    for key, versions in year_versions.items()}
    caps: list[dict] = []

    for pi, p in enumerate(policy_set.policies):
        key = year_of[pi]
        columns = year_columns[key]
        year_names = {x for i in year_versions[key] for x in policy_set.policies[i].identities}
        policies.append({
            "layer_start": len(layers), "layer_count": len(p.layers),
            "includes_class_b_copay": int(p.compliant_includes_class_b_copay),
            "repeat_start": len(repeat_factors), "repeat_count": len(p.repeat_factors),
            "repeat_floor": p.repeat_floor,
            "identity_mask": sum(1 << ident_bit[x] for x in p.identities),
            "rank_start": len(identity_rank), "rank_count": len(p.identities),
            "acc_width": len(columns),
            # names any version of the year declares: a claim holding another is UNKNOWN_IDENTITY
            "year_identity_mask": sum(1 << ident_bit[x] for x in year_names),
            "key_policy": year_versions[key][0],
        })
        repeat_factors.extend(p.repeat_factors)
        identity_rank.extend(ident_bit[x] for x in p.identities)
        for li, layer in enumerate(p.layers):
            first = li == 0
            layers.append({
                "fund": FUNDS.index(layer.fund), "rule_start": len(rules), "rule_count": len(layer.rules),
                "adjustment_start": len(adjustments), "adjustment_count": len(layer.adjustments),
                # spec 5.2: the first layer is applied to the in-scope amount, must have a rule,
                # is where repeat admissions lower deductibles and reports deductible_applied;
                # each later one to what the layers before left of the compliant amount
                "base_kind": _kernel.BASE_KINDS["in_scope" if first else "remaining"],
                "required": int(first), "repeat_applies": int(first), "reports_deductible": int(first),
            })
            layer_names.append(layer.name)
            for rule in layer.rules:
                ratio_a, ratio_b = rule.class_ratio or (0, 0)
                amount = rule.fixed_amount if rule.kind == KIND_FIXED_AMOUNT else (rule.max_personal_share or 0)
                rules.append({
                    "kind": RULE_KIND_CODES[rule.kind], "match": add_match(rule.match, p.disease_groups),
                    "deductible": rule.deductible, "axis": int(rule.axis == "year"),
                    "above_deductible": int(rule.bounds == "above_deductible"),
                    "repeat_admission": int(rule.repeat_admission),
                    # the first group's entry (or the none entry) holds position and deductible_charged
                    "acc": columns.index((layer.name, rule.cap_group)),
                    "cap": layer.cap_groups[rule.cap_group] if rule.cap_groups else -1,
                    # the other groups of nested caps (the first is `acc` and `cap`)
                    "cap_start": len(caps), "cap_count": max(len(rule.cap_groups) - 1, 0),
                    "segment_start": len(segments), "segment_count": len(rule.segments),
                    "ratio_a": ratio_a, "ratio_b": ratio_b, "amount": amount,
                    "position_at": -1, "paid_at": -1, "charged_at": -1,  # set by _state_layout
                })
                caps.extend({"acc": columns.index((layer.name, g)), "paid_at": -1, "cap": layer.cap_groups[g]}
                            for g in rule.cap_groups[1:])
                segments.extend({"upto": -1 if s.upto is None else s.upto, "ratio": s.ratio}
                                for s in rule.segments)
            for adj in layer.adjustments:
                adjustments.append({
                    "match": add_match(adj.match, p.disease_groups),
                    "deductible_factor": BP if adj.deductible_factor is None else adj.deductible_factor,
                    "ratio": -1 if adj.ratio is None else adj.ratio,
                    "ratio_add": adj.ratio_add or 0,
                    "cap_factor": BP if adj.cap_factor is None else adj.cap_factor,
                    "uncapped": int(bool(adj.uncapped)),
                })
        acc_columns.append(tuple(columns))

    lookup = {key: versions[0] for key, versions in year_versions.items()}
    version_start = np.zeros(max(len(policies), 1), dtype=np.int32)
    version_count = np.zeros(max(len(policies), 1), dtype=np.int32)
    version_from: list[int] = []
    version_policy: list[int] = []
    for key, versions in year_versions.items():
        version_start[versions] = len(version_policy)
        version_count[versions] = len(versions)
        version_from.extend(_local_micros(policy_set.policies[i].effective_from) for i in versions)
        version_policy.extend(versions)
    rule_candidates, candidate_rules = _candidates(layers, "rule_start", "rule_count", rules, matches, True)
    adjustment_candidates, candidate_adjustments = _candidates(
        layers, "adjustment_start", "adjustment_count", adjustments, matches, False)
    acc_width = max((len(c) for c in acc_columns), default=1) or 1
    state_width, state_index, state_lines = _state_layout(policies, layers, rules, caps, rule_candidates,
                                                             candidate_rules, acc_width, list(year_versions.values()))
    arrays = dict(
        policies=_table(POLICY_FIELDS, policies),
        layers=_table(LAYER_FIELDS, layers),
        rules=_table(RULE_FIELDS, rules),
        caps=_table(CAP_FIELDS, caps),
        segments=_table(SEGMENT_FIELDS, segments),
        adjustments=_table(ADJUSTMENT_FIELDS, adjustments),
        matches=_table(MATCH_FIELDS, matches),
        ranges=_table(RANGE_FIELDS, ranges),
        repeat_factors=np.asarray(repeat_factors or [BP], dtype=np.int64),
        identity_rank=np.asarray(identity_rank or [0], dtype=np.int64),
        rule_candidates=rule_candidates,
        candidate_rules=candidate_rules,
        adjustment_candidates=adjustment_candidates,
        candidate_adjustments=candidate_adjustments,
    )
    return CompiledPolicies(
        policy_set=policy_set,
        **arrays,
        identity_names=tuple(identity_names),
        layer_names=tuple(layer_names),
        max_layers=max((len(p.layers) for p in policy_set.policies), default=1),
        acc_width=acc_width,
        acc_columns=tuple(acc_columns),
        state_width=state_width,
        state_index=state_index,
        state_lines=state_lines,
        lookup=lookup,
        version_start=version_start,
        version_count=version_count,
        version_from=np.asarray(version_from or [0], dtype=np.int64),
        version_policy=np.asarray(version_policy or [-1], dtype=np.int32),
        tables=PolicyTables(**arrays, state_lines=state_lines),
    )
