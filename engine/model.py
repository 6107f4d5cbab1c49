"""The policy as validated data: what a policy file says, in exact units.

Money is integer fen, ratios and factors integer basis points (1/10000).
`engine.policy` builds these from YAML; `engine.compile` turns them into the
numeric tables the kernel reads. Nothing here knows about any one region.
"""
from __future__ import annotations

import bisect
import datetime
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from .schema import (BP, FACILITY_LEVELS, FEN_PER_YUAN, FUNDS, LOCALITIES, MAX_CAP_FACTOR,  # noqa: F401
                     MAX_COMBINED_CAP_FACTOR, SCHEMES, VISIT_TYPES)

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
    # Nested caps (revision 2): every group limits the pay and grows by it; the first one also
    # holds the year-axis position and deductible_charged. () = uncapped.
    cap_groups: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.cap_groups, str):  # one name given bare: a one-group list
            object.__setattr__(self, "cap_groups", (self.cap_groups,))
        elif not isinstance(self.cap_groups, tuple):
            object.__setattr__(self, "cap_groups", tuple(self.cap_groups))

    @property
    def cap_group(self) -> Optional[str]:
        """The first cap group (the one whose entry holds the position), or None if uncapped."""
        return self.cap_groups[0] if self.cap_groups else None


_rule_init = Rule.__init__


def _rule_init_with_cap_group(self, *args, cap_group: Optional[str] = None, **kwargs):
    """Revision-1 constructors wrote `Rule(..., cap_group="g")`; that still means `cap_groups=("g",)`."""
    if cap_group is not None:
        if kwargs.get("cap_groups"):
            raise TypeError("Rule takes cap_group or cap_groups, not both")
        kwargs["cap_groups"] = (cap_group,)
    _rule_init(self, *args, **kwargs)


_rule_init_with_cap_group.__doc__ = _rule_init.__doc__
Rule.__init__ = _rule_init_with_cap_group  # type: ignore[method-assign]


@dataclass(frozen=True)
class Adjustment:
    match: Match
    deductible_factor: Optional[int] = None  # bp
    ratio: Optional[int] = None  # bp, replaces every ratio
    ratio_add: Optional[int] = None  # bp, may be negative
    cap_factor: Optional[int] = None  # bp in [0, MAX_CAP_FACTOR]; multiplies every cap of the rule
    uncapped: Optional[bool] = None  # true lifts every cap of the rule for this claim


@dataclass(frozen=True)
class Layer:
    name: str
    fund: str
    rules: tuple[Rule, ...]
    cap_groups: dict[str, int] = field(default_factory=dict)  # name -> annual cap, fen; file order
    adjustments: tuple[Adjustment, ...] = ()


@dataclass(frozen=True)
class Policy:
    """One version of (region, scheme, year): a stack of layers evaluated in order.

    A version is in force from `effective_from` (00:00 local time) until the next
    version of the same year; January 1 of `year` when the file doesn't say.
    """

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
    effective_from: Optional[datetime.date] = None  # None = January 1 of `year` (set on construction)

    def __post_init__(self):
        if self.effective_from is None:
            object.__setattr__(self, "effective_from", datetime.date(self.year, 1, 1))


DateLike = Union[datetime.date, datetime.datetime]


@dataclass(frozen=True)
class PolicySet:
    """The policies of one folder, looked up by (region, scheme, year) and by date.

    Several files may cover one (region, scheme, year): its versions, each in
    force from its `effective_from` until the next one (SETTLEMENT.md section 5).
    """

    policies: tuple[Policy, ...]
    source: str = ""
    # (region, scheme, year) -> versions sorted by effective_from; built once, not compared.
    _versions: dict = field(init=False, repr=False, compare=False, hash=False)
    _starts: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if not isinstance(self.policies, tuple):
            object.__setattr__(self, "policies", tuple(self.policies))
        groups: dict[tuple[str, str, int], list[Policy]] = {}
        for p in self.policies:
            groups.setdefault((p.region, p.scheme, p.year), []).append(p)
        versions = {k: tuple(sorted(v, key=lambda p: p.effective_from)) for k, v in groups.items()}
        object.__setattr__(self, "_versions", versions)
        object.__setattr__(self, "_starts", {k: [p.effective_from for p in v] for k, v in versions.items()})

    def versions(self, region: str, scheme: str, year: int) -> tuple[Policy, ...]:
        """Every version of (region, scheme, year), earliest first; () if none."""
        return self._versions.get((region, scheme, year), ())

    def in_force(self, region: str, scheme: str, date: DateLike) -> Optional[Policy]:
        """The version in force on `date` (a date, or a datetime's calendar date): the latest
        `effective_from` on or before it within the date's year; None before the first one."""
        if isinstance(date, datetime.datetime):
            date = date.date()
        key = (region, scheme, date.year)
        starts = self._starts.get(key)
        if not starts:
            return None
        i = bisect.bisect_right(starts, date)
        return self._versions[key][i - 1] if i else None

    def year_identities(self, region: str, scheme: str, year: int) -> tuple[str, ...]:
        """Identity names declared by any version of the year, in order of first declaration
        (earliest version first): a claim's identity outside these is UNKNOWN_IDENTITY."""
        names: dict[str, None] = {}
        for p in self.versions(region, scheme, year):
            names.update(dict.fromkeys(p.identities))
        return tuple(names)

    def find(self, region: str, scheme: str, year: int) -> Optional[Policy]:
        """The year's first version (revision-1 callers: the only one), or None."""
        v = self.versions(region, scheme, year)
        return v[0] if v else None

    def years(self) -> Iterable[tuple[str, str, int]]:
        """Every (region, scheme, year) the set covers, sorted."""
        return sorted(self._versions)

    def by_id(self, policy_id: str) -> Optional[Policy]:
        for p in self.policies:
            if p.id == policy_id:
                return p
        return None
