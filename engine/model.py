"""The policy as validated data: what a policy file says, in exact units.

Money is integer fen, ratios and factors integer basis points (1/10000).
`engine.policy` builds these from YAML; `engine.compile` turns them into the
numeric tables the kernel reads. Nothing here knows about any one region.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .schema import BP, FACILITY_LEVELS, FEN_PER_YUAN, FUNDS, LOCALITIES, SCHEMES, VISIT_TYPES  # noqa: F401

AXES = ("claim", "year")
BOUNDS = ("absolute", "above_deductible")

# Rule kinds. A plain `ratio` rule is a segments rule with one open segment.
KIND_SEGMENTS = "segments"
KIND_CLASS_RATIO = "class_ratio"
KIND_FIXED_AMOUNT = "fixed_amount"
KIND_MAX_PERSONAL_SHARE = "max_personal_share"
RULE_KINDS = (KIND_SEGMENTS, KIND_CLASS_RATIO, KIND_FIXED_AMOUNT, KIND_MAX_PERSONAL_SHARE)


@dataclass(frozen=True)
class Match:
    """A conjunction of conditions on a claim; None means "any"."""

    visit_type: Optional[tuple[str, ...]] = None
    facility_level: Optional[tuple[str, ...]] = None
    locality: Optional[tuple[str, ...]] = None
    referred: Optional[bool] = None
    identity: Optional[tuple[str, ...]] = None  # the effective identity is listed
    holds: Optional[tuple[str, ...]] = None  # any held identity is listed
    disease_group: Optional[tuple[str, ...]] = None
    min_age: Optional[int] = None
    max_age: Optional[int] = None


@dataclass(frozen=True)
class Segment:
    """One slice of the axis: ratio up to `upto` fen (None for the last, open one)."""

    upto: Optional[int]
    ratio: int


@dataclass(frozen=True)
class Rule:
    match: Match
    kind: str
    # KIND_SEGMENTS: `ratio: r` is loaded as (Segment(None, r),).
    segments: tuple[Segment, ...] = ()
    class_ratio: Optional[tuple[int, int]] = None  # (class A bp, class B bp)
    fixed_amount: Optional[int] = None  # fen
    max_personal_share: Optional[int] = None  # bp
    deductible: int = 0  # fen
    axis: str = "claim"
    bounds: str = "absolute"
    repeat_admission: bool = False
    cap_group: Optional[str] = None


@dataclass(frozen=True)
class Adjustment:
    match: Match
    deductible_factor: Optional[int] = None  # bp
    ratio: Optional[int] = None  # bp, replaces every ratio
    ratio_add: Optional[int] = None  # bp, may be negative


@dataclass(frozen=True)
class Layer:
    name: str
    fund: str
    rules: tuple[Rule, ...]
    cap_groups: dict[str, int] = field(default_factory=dict)  # name -> annual cap, fen; file order
    adjustments: tuple[Adjustment, ...] = ()


@dataclass(frozen=True)
class Policy:
    """One (region, scheme, year): a stack of layers evaluated in order."""

    id: str
    region: str
    scheme: str
    year: int
    layers: tuple[Layer, ...]
    title: str = ""
    sources: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()  # most favourable first
    compliant_includes_class_b_copay: bool = False
    repeat_factors: tuple[int, ...] = (BP,)  # bp
    repeat_floor: int = 0  # fen
    # name -> ((low, high), ...) ICD-10 categories, inclusive, 3 characters each
    disease_groups: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    path: str = ""  # file it was loaded from, for messages


@dataclass(frozen=True)
class PolicySet:
    """The policies of one folder, looked up by (region, scheme, year)."""

    policies: tuple[Policy, ...]
    source: str = ""

    def find(self, region: str, scheme: str, year: int) -> Optional[Policy]:
        for p in self.policies:
            if p.region == region and p.scheme == scheme and p.year == year:
                return p
        return None

    def by_id(self, policy_id: str) -> Optional[Policy]:
        for p in self.policies:
            if p.id == policy_id:
                return p
        return None
