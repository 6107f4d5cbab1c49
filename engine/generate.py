"""Synthetic claims (and the matching person registry) for a policy set.

The policies are data here too: regions, schemes and years come from the set,
identities from each policy's declared `identities`, part of the disease codes
from its `disease_groups`, and visit attributes are redrawn until the first
layer has a rule for them (a vectorized copy of the match of spec 6.3; after
a few redraws a row takes the visit of a row that has one), so valid rows
settle `ok`, not `NO_BENEFIT_RULE`.

    table = generate_claims(policies, n=100_000, seed=1, invalid_rate=0.01)
    persons = generate_persons(policies, n=100_000, seed=1)   # the registry of the same people
    write_claims("claims.parquet", policies, 10_000_000, seed=1)  # streamed, bounded memory

Model, all vectorized numpy (floats only drive the draws; every amount is
converted to integer fen before it is split into components):

* A population of about n / (4 per year) persons, each with a home (region,
  scheme) drawn from the set (residents 3 : employees 1), an age (residents:
  children, adults, elderly; employees: working age and retirees), a birth
  date, a gamma "frailty" (claims per person are then negative binomial,
  rising with age), and for ~8.5 % of residents / 3 % of employees one or two
  identities declared in every year of their home (by some version of the
  year: a name the version in force doesn't declare is then "not held",
  spec section 5), held over a spell (`valid_from`..`valid_to`, both
  inclusive; most spells cover the whole period, 15 % start and 15 % end on
  a day inside one of its policy years, so people gain and lose identities
  in the middle of a year and their claims follow).
* Policy versions (`effective_from`): a claim's rules are those of the
  version in force on its day, so claims fall on both sides of every version
  change; a day before the year's first version has no policy, and its
  claims are labelled `UNKNOWN_POLICY` (and get no other defect).
* Claims per day: multinomial over the days of the policy years, with a
  winter peak and quiet weekends; times of day cluster around the morning
  and the afternoon; rows are sorted by (settle_time, claim_id) and claim ids
  are `C` + a zero-padded counter in that order.
* Per claim: visit type by age, facility level by visit type, locality by
  facility level, referral by locality, a lognormal total by visit type and
  level (long tail for tertiary inpatient stays), self-funded / over-limit /
  class-B shares that add up exactly to the total, ICD-10 codes from the
  policy's disease groups or common codes, a few nulls where the spec allows
  them (referred, disease_code, age, in_scope_class_b_amount, identities).
* A share `invalid_rate` of rows gets exactly one defect, each kind of spec
  section 7 equally often (`INVALID_KINDS`); `label=True` adds a column
  `expected_status` (the status the row should get; ignored by the engine).

The output depends only on (policies, n, seed, invalid_rate, year), never on
the block size used to write it (a different policy set gives other claims).
Valid rows agree with the registry (region, scheme, age from birth_date,
identities whose spell covers the day); a defect row may not (a foreign
region, an undeclared identity), and a duplicate is a resend of an earlier row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from engine.files import PARQUET_COMPRESSION, Outputs, open_table_writer, write_table
from engine.model import Match, Policy, PolicySet
from engine.pipeline import write_stream
from engine.schema import (FACILITY_LEVELS, LOCALITIES, MAX_AMOUNT, PERSONS_SCHEMA, REQUIRED_COLUMNS,
                           SCHEMES, VISIT_TYPES)

__all__ = [
    "INVALID_KINDS", "PERSONS_SCHEMA", "generate_claims", "generate_persons", "iter_claims",
    "write_claims", "write_persons",
]

#: The defects injected at `invalid_rate` (equal shares), named by the status they must produce.
INVALID_KINDS = ("MISSING_FIELD", "INVALID_VALUE", "INVALID_AMOUNT", "AMOUNT_OUT_OF_RANGE",
                 "AMOUNT_MISMATCH", "UNKNOWN_POLICY", "UNKNOWN_IDENTITY", "DUPLICATE_CLAIM")

CLAIMS_PER_PERSON_YEAR = 4.0
UNIT_ROWS = 1 << 18  # rows generated per internal unit (whole days), independent of the write block
MAX_TOTAL_FEN = 10**9  # 10 million yuan: the long tail stops here

_VT = {v: i for i, v in enumerate(VISIT_TYPES)}
_FAC = {v: i for i, v in enumerate(FACILITY_LEVELS)}
_LOC = {v: i for i, v in enumerate(LOCALITIES)}
_SCH = {v: i for i, v in enumerate(SCHEMES)}
_IN, _OUT, _CHR, _MAT = (_VT[v] for v in ("inpatient", "outpatient", "chronic", "maternity"))

# Values outside the enums of section 2, appended after the valid ones in each vocabulary.
_BAD_ENUMS = {
    "scheme": ("retired", "military"),
    "visit_type": ("emergency", "day_surgery"),
    "facility_level": ("level4", "clinic"),
    "locality": ("abroad", "unknown"),
}
_UNKNOWN_REGIONS = ("999999", "110000", "000000", "990000")
_UNDECLARED_IDENTITIES = ("veteran", "orphan", "severe_disability", "special_care", "undeclared_x")

# Visit type by age class (<18, 18-44, 45-64, 65+); columns in VISIT_TYPES order
# (inpatient, outpatient, chronic, maternity).
_VISIT_BY_AGE = np.array([
    [0.10, 0.82, 0.08, 0.00],
    [0.10, 0.70, 0.13, 0.07],
    [0.15, 0.55, 0.30, 0.00],
    [0.22, 0.40, 0.38, 0.00],
])
# Facility level by visit type (primary, secondary, tertiary).
_FACILITY_BY_VISIT = np.array([
    [0.25, 0.45, 0.30],
    [0.60, 0.28, 0.12],
    [0.35, 0.40, 0.25],
    [0.15, 0.50, 0.35],
])
# Locality by facility level (county, region, province, national).
_LOCALITY_BY_FACILITY = np.array([
    [0.95, 0.04, 0.008, 0.002],
    [0.75, 0.18, 0.05, 0.02],
    [0.30, 0.40, 0.22, 0.08],
])
_REFERRED_BY_LOCALITY = np.array([0.03, 0.50, 0.75, 0.80])
# Median total (yuan) and log-sd by visit type x facility level.
_MEDIAN_YUAN = np.array([
    [2600.0, 7200.0, 17500.0],
    [55.0, 140.0, 320.0],
    [210.0, 380.0, 650.0],
    [2000.0, 4200.0, 7500.0],
])
_SIGMA = np.array([
    [0.70, 0.85, 1.00],
    [0.95, 0.95, 0.95],
    [0.75, 0.75, 0.80],
    [0.35, 0.35, 0.40],
])
_LOCALITY_COST = np.array([1.0, 1.1, 1.35, 1.6])
# Self-funded share: P(zero) and beta(a, b) otherwise, by visit type.
_SELF_FUNDED = np.array([[0.0, 2.0, 18.0], [0.6, 1.5, 8.0], [0.7, 1.0, 12.0], [0.0, 1.5, 12.0]])
_CLASS_B_COPAY_RATES = np.array([0.0, 0.05, 0.10, 0.20])
_CLASS_B_COPAY_P = np.array([0.15, 0.25, 0.50, 0.10])

# Common ICD-10 categories by visit type (besides the policies' disease groups).
_COMMON_CODES = {
    _IN: ("J18", "I63", "I25", "J44", "K80", "K35", "S72", "C34", "C16", "I21", "N18", "E11",
          "K92", "I50", "C22", "S06", "N20", "J96", "K56", "M17"),
    _OUT: ("J06", "J20", "J02", "K29", "M54", "I10", "E11", "K52", "L30", "H10", "N39", "R51",
           "M17", "J45", "K02", "R10", "B35", "H52"),
    _CHR: ("I10", "I11", "E11", "E14", "I25", "I69", "J44", "N18", "F20", "M06", "B18", "G40",
           "I50", "C50", "E03"),
    _MAT: ("O80", "O82", "O70", "O34", "O42", "O48"),
}
# Share of codes drawn from the policy's disease groups (when it has any), by visit type.
_GROUP_CODE_SHARE = np.array([0.15, 0.12, 0.55, 0.0])
_NULL_CODE_SHARE = np.array([0.01, 0.04, 0.01, 0.02])
_CODE_VARIANTS = 5  # "I10", "I10.900", "I10.x00", "I10.001", " i10.900" (trimmed, upper-cased by the engine)
_CODE_VARIANT_P = np.array([0.40, 0.30, 0.15, 0.145, 0.005])

_EPOCH = np.datetime64("1970-01-01", "D")
_US_PER_DAY = 86_400 * 1_000_000


# =========================================================================== the plan


@dataclass
class _Plan:
    """What the generator reads from the policy set, as arrays."""

    policies: tuple[Policy, ...]
    years: list[int]
    groups: list[tuple[str, str]]  # (region, scheme)
    group_weight: np.ndarray
    policy_of: np.ndarray  # [group, year index] -> the year's first version's policy index, or -1
    version_start: np.ndarray  # [group, year index, v] -> day the v-th version starts (big: none)
    version_policy: np.ndarray  # [group, year index, v] -> its policy index (-1: none)
    versioned: np.ndarray  # [group, year index] -> several versions, or the first after January 1
    group_identities: list[tuple[str, ...]]  # declared in every year of the group (by some version)
    ident_vocab: list[str]  # every declared name, then the undeclared ones
    undeclared: dict[int, np.ndarray]  # policy -> vocab indices it does not declare (undeclared names)
    ident_rank: np.ndarray  # [policy, vocab] -> rank in the policy's identities (big = undeclared)
    region_vocab: list[str]  # set regions, then unknown ones
    n_set_regions: int
    cats: list[str]  # ICD-10 categories: common codes and every disease group's members
    code_vocab: pa.Array  # cats x variants
    group_cats: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per policy: (starts, sizes, cat ids)
    group_member: list[dict[str, np.ndarray]]  # per policy: group name -> bool over cats
    common: dict[int, np.ndarray]  # visit type -> cat ids
    period_start: int  # days since epoch, Jan 1 of the first year
    period_end: int  # Dec 31 of the last year


def _expand_range(low: str, high: str) -> list[str]:
    out = []
    for letter in range(ord(low[0]), ord(high[0]) + 1):
        for num in range(100):
            code = f"{chr(letter)}{num:02d}"
            if low <= code <= high:
                out.append(code)
    return out


def _day(y: int, m: int = 1, d: int = 1) -> int:
    return int((np.datetime64(f"{y:04d}-{m:02d}-{d:02d}", "D") - _EPOCH).astype(np.int64))


def _plan(policies: PolicySet, year: Optional[int]) -> _Plan:
    pols = tuple(policies.policies)
    if year is not None:
        pols = tuple(p for p in pols if p.year == year)
        if not pols:
            raise ValueError(f"no policy for year {year} in the set")
    if not pols:
        raise ValueError("the policy set is empty")
    pols = tuple(sorted(pols, key=lambda p: (p.region, p.scheme, p.year, p.effective_from, p.id)))
    years = sorted({p.year for p in pols})
    groups = sorted({(p.region, p.scheme) for p in pols})
    gi = {g: i for i, g in enumerate(groups)}
    yi = {y: i for i, y in enumerate(years)}
    policy_of = np.full((len(groups), len(years)), -1, dtype=np.int64)
    n_versions = np.zeros((len(groups), len(years)), dtype=np.int64)
    for p in pols:
        n_versions[gi[(p.region, p.scheme)], yi[p.year]] += 1
    version_start = np.full((len(groups), len(years), int(n_versions.max())), np.iinfo(np.int64).max, np.int64)
    version_policy = np.full(version_start.shape, -1, dtype=np.int64)
    n_versions[:] = 0
    versioned = np.zeros(policy_of.shape, dtype=bool)
    for k, p in enumerate(pols):  # sorted by effective_from within each (group, year)
        g, y = gi[(p.region, p.scheme)], yi[p.year]
        v = n_versions[g, y]
        if v == 0:
            policy_of[g, y] = k
        start = p.effective_from
        version_start[g, y, v] = _day(start.year, start.month, start.day)
        version_policy[g, y, v] = k
        n_versions[g, y] += 1
        versioned[g, y] |= v > 0 or (start.month, start.day) != (1, 1)
    group_weight = np.array([3.0 if s == "resident" else 1.0 for _, s in groups])
    group_weight /= group_weight.sum()

    declared: list[str] = []
    for p in pols:
        for name in p.identities:
            if name not in declared:
                declared.append(name)
    group_identities = []
    for g in groups:
        # per year, the names some version declares (a claim holding one is never UNKNOWN_IDENTITY)
        per_year = [[n for k in version_policy[gi[g], y] if k >= 0 for n in pols[k].identities]
                    for y in range(len(years)) if policy_of[gi[g], y] >= 0]
        ordered = list(dict.fromkeys(n for names in per_year for n in names))
        group_identities.append(tuple(n for n in ordered if all(n in names for names in per_year)))
    extra = [n for n in _UNDECLARED_IDENTITIES if n not in declared]
    ident_vocab = declared + extra
    ident_rank = np.full((len(pols), len(ident_vocab)), 1 << 20, dtype=np.int64)
    undeclared = {}
    for k, p in enumerate(pols):
        for r, name in enumerate(p.identities):
            ident_rank[k, ident_vocab.index(name)] = r
        undeclared[k] = np.array([ident_vocab.index(n) for n in extra], dtype=np.int64)

    set_regions = sorted({p.region for p in pols})
    region_vocab = set_regions + [r for r in _UNKNOWN_REGIONS if r not in set_regions]

    cats: list[str] = []
    cat_index: dict[str, int] = {}

    def cat_id(c: str) -> int:
        if c not in cat_index:
            cat_index[c] = len(cats)
            cats.append(c)
        return cat_index[c]

    common = {vt: np.array([cat_id(c) for c in codes], dtype=np.int64) for vt, codes in _COMMON_CODES.items()}
    group_cat_lists = []
    for p in pols:
        per_group = []
        for name, ranges in p.disease_groups.items():
            members: list[int] = []
            for low, high in ranges:
                members.extend(cat_id(c) for c in _expand_range(low, high))
            per_group.append((name, sorted(set(members))))
        group_cat_lists.append(per_group)
    ncat = len(cats)
    group_cats, group_member = [], []
    for per_group in group_cat_lists:
        nonempty = [m for _, m in per_group if m]
        sizes = np.array([len(m) for m in nonempty], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
        ids = np.array([c for m in nonempty for c in m], dtype=np.int64)
        group_cats.append((starts, sizes, ids))
        member = {}
        for name, m in per_group:
            b = np.zeros(ncat, dtype=bool)
            b[m] = True
            member[name] = b
        group_member.append(member)
    variants = []
    for c in cats:
        variants.extend([c, f"{c}.900", f"{c}.x00", f"{c}.001", f" {c.lower()}.900"])
    return _Plan(
        policies=pols, years=years, groups=groups, group_weight=group_weight, policy_of=policy_of,
        version_start=version_start, version_policy=version_policy, versioned=versioned,
        group_identities=group_identities, ident_vocab=ident_vocab, undeclared=undeclared,
        ident_rank=ident_rank, region_vocab=region_vocab, n_set_regions=len(set_regions), cats=cats,
        code_vocab=pa.array(variants, pa.string()), group_cats=group_cats, group_member=group_member,
        common=common, period_start=_day(years[0]), period_end=_day(years[-1], 12, 31),
    )


# =========================================================================== helpers


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *tags])


def _choice(rng: np.random.Generator, p: np.ndarray, size: int) -> np.ndarray:
    """`size` draws from the distribution `p`."""
    edges = np.cumsum(p)[:-1] / np.sum(p)
    return np.searchsorted(edges, rng.random(size), side="right")


def _conditional(rng: np.random.Generator, table: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """One draw per row from the distribution `table[cls[row]]` (rows of `table` sum to 1).

    A single searchsorted: class c's interior edges are shifted by c, so the
    value c + u only meets the edges of classes <= c."""
    k = table.shape[1]
    edges = (np.cumsum(table, axis=1)[:, :-1] + np.arange(len(table))[:, None]).ravel()
    v = cls + rng.random(len(cls)) * (1 - 1e-12)
    return np.searchsorted(edges, v, side="right") - cls * (k - 1)


def _fixed_width_ids(prefix: str, numbers: np.ndarray, width: int,
                     valid: Optional[np.ndarray] = None) -> pa.Array:
    """`prefix` + zero-padded numbers as a string array, built from bytes (fast)."""
    n = len(numbers)
    p = prefix.encode()
    w = len(p) + width
    buf = np.empty((n, w), dtype=np.uint8)
    if p:
        buf[:, :len(p)] = np.frombuffer(p, dtype=np.uint8)
    small = n == 0 or int(numbers.max()) < 2**32
    x = numbers.astype(np.uint32 if small else np.int64)
    ten = x.dtype.type(10)
    for k in range(width - 1, -1, -1):
        q = x // ten
        buf[:, len(p) + k] = x - q * ten + 48
        x = q
    if n * w >= 2**31:
        raise ValueError("too many ids for one string array")
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(w)
    bitmap = None
    if valid is not None and not valid.all():
        bitmap = pa.py_buffer(np.packbits(valid.astype(np.uint8), bitorder="little"))
    return pa.Array.from_buffers(pa.string(), n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(buf)])


def _mask(valid: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if valid is None or valid.all() else ~valid


def _take(vocab: pa.Array, idx: np.ndarray, valid: Optional[np.ndarray] = None) -> pa.Array:
    return vocab.take(pa.array(idx.astype(np.int32), mask=_mask(valid)))


def _calendar(days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(year, month * 100 + day) of days since the epoch."""
    d = days.astype("datetime64[D]")
    y = d.astype("datetime64[Y]")
    m = d.astype("datetime64[M]")
    year = y.astype(np.int64) + 1970
    month = m.astype(np.int64) - (year - 1970) * 12 + 1
    dom = (d - m).astype(np.int64) + 1
    return year, month * 100 + dom


# =========================================================================== persons


@dataclass
class _Population:
    size: int
    group: np.ndarray
    birth: np.ndarray  # days since epoch
    lam: np.ndarray  # relative claim rate
    ident: np.ndarray  # (size, 2) vocab index or -1
    ident_from: np.ndarray  # (size, 2) days
    ident_to: np.ndarray  # (size, 2) days, inclusive
    id_width: int
    birth_year: np.ndarray = None
    birth_md: np.ndarray = None
    _eligible: dict = None

    def __post_init__(self):
        self.birth_year, self.birth_md = _calendar(self.birth)
        self._eligible = {}

    def eligible(self, plan: "_Plan", year_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Persons whose home has a policy in that year, and their cumulative claim rates."""
        if year_index not in self._eligible:
            idx = np.flatnonzero(plan.policy_of[self.group, year_index] >= 0)
            self._eligible[year_index] = (idx, np.cumsum(self.lam[idx]))
        return self._eligible[year_index]

    def ids(self, idx: np.ndarray, valid: Optional[np.ndarray] = None) -> pa.Array:
        return _fixed_width_ids("P", idx, self.id_width, valid)


def _population(plan: _Plan, n: int, seed: int) -> _Population:
    rng = _rng(seed, 1)
    years_per_person = float((plan.group_weight * (plan.policy_of >= 0).sum(axis=1)).sum())
    size = max(1, int(math.ceil(n / (CLAIMS_PER_PERSON_YEAR * years_per_person))))
    group = rng.choice(len(plan.groups), size=size, p=plan.group_weight)
    resident = np.array([s == "resident" for _, s in plan.groups])[group]

    # Age at the start of the period.
    u = rng.random(size)
    age = np.where(
        resident,
        np.where(u < 0.22, rng.uniform(0, 18, size),
                 np.where(u < 0.70, rng.uniform(18, 60, size), 60 + 35 * rng.beta(1.2, 2.5, size))),
        np.where(u < 0.78, rng.uniform(22, 60, size), 60 + 30 * rng.beta(1.2, 2.5, size)),
    )
    birth = plan.period_start - np.floor(age * 365.2425).astype(np.int64) - 1
    age_factor = np.select(
        [age < 5, age < 18, age < 45, age < 60, age < 75], [1.3, 0.7, 0.8, 1.1, 1.6], 2.0)
    lam = rng.gamma(0.8, 1 / 0.8, size) * age_factor

    ident = np.full((size, 2), -1, dtype=np.int64)
    ident_from = np.zeros((size, 2), dtype=np.int64)
    ident_to = np.zeros((size, 2), dtype=np.int64)
    holder_p = np.where(resident, 0.085, 0.03)
    holder = rng.random(size) < holder_p
    year_start = np.array([_day(y) for y in plan.years], dtype=np.int64)
    year_days = np.array([_day(y, 12, 31) - _day(y) + 1 for y in plan.years], dtype=np.int64)
    for g, names in enumerate(plan.group_identities):
        rows = np.flatnonzero(holder & (group == g))
        if not names or not len(rows):
            continue
        vocab = np.array([plan.ident_vocab.index(x) for x in names], dtype=np.int64)
        w = np.ones(len(names))
        w[0] = 0.4  # the most favourable identity (e.g. extreme poverty) is the rarest
        first = rng.choice(len(names), size=len(rows), p=w / w.sum())
        ident[rows, 0] = vocab[first]
        if len(names) > 1:
            two = rng.random(len(rows)) < 0.15
            shift = rng.integers(1, len(names), size=len(rows))
            second = (first + shift) % len(names)
            ident[rows[two], 1] = vocab[second[two]]
    lam = np.where(ident[:, 0] >= 0, lam * 1.4, lam)
    for s in range(2):
        has = ident[:, s] >= 0
        k = int(has.sum())
        kind = rng.random(k)
        start = plan.period_start - rng.integers(0, 3 * 365, k)
        # a day inside one of the policy years (not in a gap between them), so the change
        # falls in the middle of a year that has claims: 15 % gain the identity then, 15 % lose it
        yr = rng.integers(0, len(plan.years), k)
        inner = year_start[yr] + (rng.random(k) * year_days[yr]).astype(np.int64)
        ident_from[has, s] = np.where((kind >= 0.7) & (kind < 0.85), inner, start)
        ident_to[has, s] = np.where(kind >= 0.85, inner, plan.period_end)
    return _Population(size=size, group=group, birth=birth, lam=lam, ident=ident,
                       ident_from=ident_from, ident_to=ident_to, id_width=max(8, len(str(size - 1))))


def _persons_table(plan: _Plan, pop: _Population) -> pa.Table:
    regions = pa.array([r for r, _ in plan.groups], pa.string())
    schemes = pa.array([s for _, s in plan.groups], pa.string())
    has = pop.ident >= 0
    counts = has.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    r, c = np.nonzero(has)
    spells = pa.StructArray.from_arrays(
        [_take(pa.array(plan.ident_vocab, pa.string()), pop.ident[r, c]),
         pa.array(pop.ident_from[r, c].astype(np.int32), pa.date32()),
         pa.array(pop.ident_to[r, c].astype(np.int32), pa.date32())],
        fields=list(PERSONS_SCHEMA.field("identities").type.value_type),
    )
    lists = pa.ListArray.from_arrays(pa.array(offsets), spells,
                                     type=PERSONS_SCHEMA.field("identities").type)
    return pa.Table.from_arrays([
        pop.ids(np.arange(pop.size)),
        _take(regions, pop.group),
        _take(schemes, pop.group),
        pa.array(pop.birth.astype(np.int32), pa.date32()),
        lists,
    ], schema=PERSONS_SCHEMA)


# =========================================================================== claims


@dataclass
class _Unit:
    year_index: int
    days: np.ndarray  # days since epoch
    counts: np.ndarray  # claims per day
    offset: int  # global row number of the first claim


def _units(plan: _Plan, pop: _Population, n: int, seed: int) -> list[_Unit]:
    """Claims per day over the period, cut into units of whole days."""
    day_lists, weights, year_of = [], [], []
    for k, y in enumerate(plan.years):
        eligible = plan.policy_of[pop.group, k] >= 0
        w_year = float(pop.lam[eligible].sum())
        days = np.arange(_day(y), _day(y, 12, 31) + 1, dtype=np.int64)
        doy = days - days[0]
        season = 1.0 + 0.12 * np.cos(2 * np.pi * (doy - 20) / 365.25)
        dow = (days + 3) % 7  # 0 = Monday
        week = np.where(dow == 5, 0.55, np.where(dow == 6, 0.45, 1.0))
        day_lists.append(days)
        weights.append(season * week * w_year)
        year_of.append(np.full(len(days), k))
    days = np.concatenate(day_lists)
    w = np.concatenate(weights)
    year_of = np.concatenate(year_of)
    counts = _rng(seed, 2).multinomial(n, w / w.sum()) if n > 0 else np.zeros(len(days), np.int64)
    units, start, acc, offset = [], 0, 0, 0
    for i in range(len(days)):
        acc += int(counts[i])
        last = i == len(days) - 1 or year_of[i + 1] != year_of[i]
        if acc >= UNIT_ROWS or (last and acc > 0):
            units.append(_Unit(int(year_of[i]), days[start:i + 1], counts[start:i + 1], offset))
            offset += acc
            start, acc = i + 1, 0
        elif last:
            start = i + 1
    return units


def _version_in_force(plan: _Plan, group: np.ndarray, year_index: int, day: np.ndarray) -> np.ndarray:
    """Policy index of the version in force on each row's day (spec section 5), -1 before the first."""
    pol = plan.policy_of[group, year_index]
    if not plan.versioned[:, year_index].any():
        return pol
    rows = np.flatnonzero(plan.versioned[group, year_index])  # only the homes whose year has versions
    g = group[rows]
    n_started = (plan.version_start[g, year_index] <= day[rows, None]).sum(axis=1)
    pol[rows] = np.where(n_started > 0, plan.version_policy[g, year_index, np.maximum(n_started - 1, 0)], -1)
    return pol


def _first_layer_has_rule(plan: _Plan, pol: np.ndarray, a: dict) -> np.ndarray:
    """Vectorized 6.3 match of the first layer's rules: does any rule hold? (True with no
    policy in force: such a row is UNKNOWN_POLICY whatever its visit.)"""
    out = pol < 0
    for k, p in enumerate(plan.policies):
        rows = np.flatnonzero(pol == k)
        if not len(rows):
            continue
        sub = {name: v[rows] for name, v in a.items()}
        hit = np.zeros(len(rows), dtype=bool)
        for rule in p.layers[0].rules:
            hit |= _match(plan, k, rule.match, sub)
        out[rows] = hit
    return out


def _allowed(n: int, codes: list[int]) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[codes] = True
    return out


def _match(plan: _Plan, k: int, m: Match, a: dict) -> np.ndarray:
    ok = np.ones(len(a["vt"]), dtype=bool)
    if m.visit_type is not None:
        ok &= _allowed(len(VISIT_TYPES), [_VT[v] for v in m.visit_type])[a["vt"]]
    if m.facility_level is not None:
        ok &= _allowed(len(FACILITY_LEVELS), [_FAC[v] for v in m.facility_level])[a["fac"]]
    if m.locality is not None:
        ok &= _allowed(len(LOCALITIES), [_LOC[v] for v in m.locality])[a["loc"]]
    if m.referred is not None:
        ok &= (a["ref"] & a["ref_valid"]) == bool(m.referred)
    held = a["held"]  # (rows, slots) vocab index or -1 (indexes the last entry of the tables below)
    nv = len(plan.ident_vocab)
    if m.identity is not None:
        rank = np.append(plan.ident_rank[k], 1 << 30)[held]
        best = rank.argmin(axis=1)
        e = held[np.arange(len(held)), best]
        e = np.where(rank[np.arange(len(held)), best] < (1 << 20), e, -1)
        ok &= _allowed(nv + 1, [plan.ident_vocab.index(x) for x in m.identity if x in plan.ident_vocab])[e]
    if m.holds is not None:
        table = _allowed(nv + 1, [plan.ident_vocab.index(x) for x in m.holds if x in plan.ident_vocab])
        ok &= table[held].any(axis=1)
    if m.disease_group is not None:
        member = np.zeros(len(plan.cats), dtype=bool)
        for g in m.disease_group:
            member |= plan.group_member[k].get(g, np.zeros(len(plan.cats), dtype=bool))
        ok &= a["code_valid"] & member[a["cat"]]
    if m.min_age is not None:
        ok &= a["age_valid"] & (a["age"] >= m.min_age)
    if m.max_age is not None:
        ok &= a["age_valid"] & (a["age"] <= m.max_age)
    return ok


_VISIT_KEYS = ("vt", "fac", "loc", "ref", "ref_valid", "cat", "code_valid", "variant")


def _draw_visit(rng: np.random.Generator, plan: _Plan, pol: np.ndarray, age: np.ndarray) -> dict:
    """Visit type, facility, locality, referral and disease code for some rows."""
    m = len(pol)
    age_class = np.digitize(age, [18, 45, 65])
    vt = _conditional(rng, _VISIT_BY_AGE, age_class)
    fac = _conditional(rng, _FACILITY_BY_VISIT, vt)
    loc = _conditional(rng, _LOCALITY_BY_FACILITY, fac)
    ref = rng.random(m) < _REFERRED_BY_LOCALITY[loc]
    ref_valid = rng.random(m) >= 0.02
    # Disease code: from the policy's groups, or a common code of the visit type.
    cat = np.zeros(m, dtype=np.int64)
    for v, codes in plan.common.items():
        rows = np.flatnonzero(vt == v)
        cat[rows] = codes[rng.integers(0, len(codes), len(rows))]
    from_group = rng.random(m) < _GROUP_CODE_SHARE[vt]
    for k, (starts, sizes, ids) in enumerate(plan.group_cats):
        if not len(sizes):
            continue
        rows = np.flatnonzero(from_group & (pol == k))
        g = rng.integers(0, len(sizes), len(rows))
        cat[rows] = ids[starts[g] + (rng.random(len(rows)) * sizes[g]).astype(np.int64)]
    code_valid = rng.random(m) >= _NULL_CODE_SHARE[vt]
    variant = _choice(rng, _CODE_VARIANT_P, m)
    return dict(vt=vt, fac=fac, loc=loc, ref=ref, ref_valid=ref_valid, cat=cat,
                code_valid=code_valid, variant=variant)


def _unit_table(plan: _Plan, pop: _Population, unit: _Unit, seed: int, invalid_rate: float,
                label: bool, id_width: int, schema: pa.Schema) -> pa.Table:
    rng = _rng(seed, 3, int(unit.days[0]) - plan.period_start)
    m = int(unit.counts.sum())
    rows = np.arange(m)

    # --- time: whole days, then a time of day; sorted
    day = np.repeat(unit.days, unit.counts)
    u = rng.random(m)
    z = rng.standard_normal(m)
    sec = np.where(
        u < 0.57, 10.3 * 3600 + 1.3 * 3600 * z,
        np.where(u < 0.94, 15.2 * 3600 + 1.2 * 3600 * z, (u - 0.94) / 0.06 * 86_400))
    sec = np.sort(day * 86_400 + sec.clip(0, 86_399).astype(np.int64)) - day * 86_400  # days already sorted

    # --- person: by claim rate among those whose home has a policy this year
    k_year = unit.year_index
    eligible, cum = pop.eligible(plan, k_year)
    # Sorted uniforms (normalized exponential spacings) make searchsorted cache-friendly;
    # a random permutation then spreads the persons over the rows again.
    spacing = np.cumsum(rng.exponential(size=m + 1))
    pick = np.searchsorted(cum, spacing[:-1] * (cum[-1] / spacing[-1]), side="right").clip(0, len(eligible) - 1)
    person = eligible[pick[rng.permutation(m)]]
    group = pop.group[person]
    pol = _version_in_force(plan, group, k_year, day)
    u_y, u_md = _calendar(unit.days)
    d_ix = day - unit.days[0]
    age = u_y[d_ix] - pop.birth_year[person] - (u_md[d_ix] < pop.birth_md[person])
    age_valid = rng.random(m) >= 0.005

    # --- identities held on the day (two spell slots, and a third for an undeclared one)
    held = np.full((m, 3), -1, dtype=np.int64)
    holders = np.flatnonzero(pop.ident[person, 0] >= 0)
    hp, hd = person[holders], day[holders]
    for s in range(2):
        idn = pop.ident[hp, s]
        on = (idn >= 0) & (pop.ident_from[hp, s] <= hd) & (hd <= pop.ident_to[hp, s])
        held[holders, s] = np.where(on, idn, -1)

    # --- visit attributes, redrawn where the first layer has no rule for them
    a = _draw_visit(rng, plan, pol, age)
    a.update(held=held, age=age, age_valid=age_valid)
    todo = np.flatnonzero(~_first_layer_has_rule(plan, pol, a))
    for _ in range(8):
        if not len(todo):
            break
        redraw = _draw_visit(rng, plan, pol[todo], age[todo])
        for name, v in redraw.items():
            a[name][todo] = v
        sub = {name: v[todo] for name, v in a.items()}
        todo = todo[~_first_layer_has_rule(plan, pol[todo], sub)]
    if len(todo):  # still none (a narrow first layer): take the visit of a row that has a rule
        has = np.ones(m, dtype=bool)
        has[todo] = False
        for k in np.unique(pol[todo]):
            donors = np.flatnonzero(has & (pol == k))
            rows_k = todo[pol[todo] == k]
            if len(donors):
                pick = donors[rng.integers(0, len(donors), len(rows_k))]
                for name in _VISIT_KEYS:
                    a[name][rows_k] = a[name][pick]
        sub = {name: v[todo] for name, v in a.items()}
        todo = todo[~_first_layer_has_rule(plan, pol[todo], sub)]
    no_rule = np.zeros(m, dtype=bool)
    no_rule[todo] = True
    vt, fac, loc = a["vt"], a["fac"], a["loc"]

    # --- amounts (floats drive the draws; fen are integers from here on)
    age_cost = np.where((vt == _IN) & (age >= 65), 1.2, 1.0)
    total_yuan = (_MEDIAN_YUAN[vt, fac] * _LOCALITY_COST[loc] * age_cost
                  * np.exp(_SIGMA[vt, fac] * rng.standard_normal(m)))
    total = np.rint(total_yuan * 100).clip(100, MAX_TOTAL_FEN).astype(np.int64)
    sf_rows = np.flatnonzero(rng.random(m) >= _SELF_FUNDED[vt, 0])
    sf_share = np.zeros(m)
    sf_share[sf_rows] = rng.beta(_SELF_FUNDED[vt[sf_rows], 1], _SELF_FUNDED[vt[sf_rows], 2])
    self_funded = np.floor(total * sf_share).astype(np.int64)
    ol_rows = np.flatnonzero(rng.random(m) >= 0.88)
    ol_share = np.zeros(m)
    ol_share[ol_rows] = rng.beta(1.0, 60.0, len(ol_rows))
    over_limit = np.minimum(np.floor(total * ol_share).astype(np.int64), total - self_funded)
    rest = total - self_funded - over_limit
    class_b_gross = np.floor(rest * rng.beta(2.0, 5.0, m)).astype(np.int64)
    copay_rate = _CLASS_B_COPAY_RATES[_choice(rng, _CLASS_B_COPAY_P, m)]
    class_b_copay = np.floor(class_b_gross * copay_rate).astype(np.int64)
    in_scope = rest - class_b_copay
    in_scope_b = class_b_gross - class_b_copay
    in_scope_b_valid = rng.random(m) >= 0.01
    in_scope_b = np.where(in_scope_b_valid, in_scope_b, 0)

    # --- the column values (as vocabulary indices / numbers) and their validity
    region_idx = np.array([plan.region_vocab.index(r) for r, _ in plan.groups], dtype=np.int64)[group]
    scheme_idx = np.array([_SCH[s] for _, s in plan.groups], dtype=np.int64)[group]
    cols = dict(
        claim_no=rows + unit.offset, person=person, region=region_idx, scheme=scheme_idx,
        time=day * 86_400 + sec, vt=vt.copy(), fac=fac.copy(), loc=loc.copy(), ref=a["ref"],
        code=a["cat"] * _CODE_VARIANTS + a["variant"], age=age, held=held,
        total_amount=total, self_funded_amount=self_funded, over_limit_amount=over_limit,
        class_b_copay_amount=class_b_copay, in_scope_amount=in_scope, in_scope_class_b_amount=in_scope_b,
    )
    valid = {name: np.ones(m, dtype=bool) for name in cols}
    valid["ref"] = a["ref_valid"].copy()
    valid["code"] = a["code_valid"].copy()
    valid["age"] = age_valid.copy()
    valid["in_scope_class_b_amount"] = in_scope_b_valid.copy()
    empty_list = rng.random(m) < 0.01  # "no identity" as [] instead of null, now and then

    # --- defects
    kind = np.full(m, -1, dtype=np.int64)
    if invalid_rate > 0:
        bad = rng.random(m) < invalid_rate
        kind[bad] = rng.integers(0, len(INVALID_KINDS), int(bad.sum()))
    expected = np.where(no_rule, len(INVALID_KINDS), -1)  # index into INVALID_KINDS + ("NO_BENEFIT_RULE",)
    before_first = pol < 0  # a day before the year's first version: no policy, and no other defect
    if before_first.any():
        kind[before_first] = -1
        expected[before_first] = INVALID_KINDS.index("UNKNOWN_POLICY")
    _inject(rng, plan, kind, pol, cols, valid, expected)

    # --- rows: sort again by (time, claim id) (duplicates may share a second with others)
    t, no = cols["time"], cols["claim_no"]
    if ((t[1:] == t[:-1]) & (no[1:] < no[:-1])).any():
        order = np.lexsort((no, t))
        moved = np.flatnonzero(order != rows)
        src = order[moved]
        for v in (*cols.values(), *valid.values(), empty_list, expected):
            v[moved] = v[src]

    # --- Arrow
    vocab = {name: pa.array(list(vals) + list(_BAD_ENUMS[name]), pa.string())
             for name, vals in (("scheme", SCHEMES), ("visit_type", VISIT_TYPES),
                                ("facility_level", FACILITY_LEVELS), ("locality", LOCALITIES))}
    h = cols["held"]
    some = np.flatnonzero((h >= 0).any(axis=1))
    has = h[some] >= 0
    counts = np.zeros(m, dtype=np.int64)
    counts[some] = has.sum(axis=1)
    offsets = np.zeros(m + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    r, c = np.nonzero(has)
    ident_values = _take(pa.array(plan.ident_vocab, pa.string()), h[some][r, c])
    list_null = (counts == 0) & ~empty_list
    identities = pa.ListArray.from_arrays(pa.array(offsets), ident_values,
                                          mask=pa.array(list_null))
    arrays = dict(
        claim_id=_fixed_width_ids("C", cols["claim_no"], id_width, valid["claim_no"]),
        person_id=pop.ids(cols["person"], valid["person"]),
        region=_take(pa.array(plan.region_vocab, pa.string()), cols["region"], valid["region"]),
        scheme=_take(vocab["scheme"], cols["scheme"], valid["scheme"]),
        settle_time=pa.array(cols["time"] * 1_000_000, pa.timestamp("us"), mask=_mask(valid["time"])),
        visit_type=_take(vocab["visit_type"], cols["vt"], valid["vt"]),
        facility_level=_take(vocab["facility_level"], cols["fac"], valid["fac"]),
        locality=_take(vocab["locality"], cols["loc"], valid["loc"]),
        referred=pa.array(cols["ref"], pa.bool_(), mask=_mask(valid["ref"])),
        disease_code=_take(plan.code_vocab, cols["code"], valid["code"]),
        age=pa.array(cols["age"].clip(0, 32767).astype(np.int16), pa.int16(), mask=_mask(valid["age"])),
        identities=identities,
    )
    for name in ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
                 "in_scope_amount", "in_scope_class_b_amount"):
        arrays[name] = pa.array(cols[name], pa.int64(), mask=_mask(valid[name]))
    out, fields = [], []
    for f in schema:
        if f.name not in arrays:
            raise ValueError(f"generate: no generator for claims column {f.name!r}")
        arr = arrays[f.name]
        out.append(arr if arr.type == f.type else arr.cast(f.type))
        fields.append(f)
    if label:
        names = pa.array(list(INVALID_KINDS) + ["NO_BENEFIT_RULE", "ok"], pa.string())
        out.append(names.take(pa.array(np.where(expected < 0, len(INVALID_KINDS) + 1, expected))))
        fields.append(pa.field("expected_status", pa.string()))
    return pa.Table.from_arrays(out, schema=pa.schema(fields))


def _inject(rng: np.random.Generator, plan: _Plan, kind: np.ndarray, pol: np.ndarray,
            cols: dict, valid: dict, expected: np.ndarray) -> None:
    """Give each row of `kind` >= 0 exactly one defect of that kind (in place)."""
    k_dup = INVALID_KINDS.index("DUPLICATE_CLAIM")
    # Duplicates first: a resend of an earlier valid row (same content and id, its own time).
    dup = np.flatnonzero(kind == k_dup)
    if len(dup):
        ok_rows = np.flatnonzero((kind < 0) & (expected < 0))
        before = np.searchsorted(ok_rows, dup)  # valid rows before each duplicate
        keep = before > 0
        kind[dup[~keep]] = -1
        dup, before = dup[keep], before[keep]
        back = (rng.random(len(dup)) * np.minimum(before, 50)).astype(np.int64)
        src = ok_rows[before - 1 - back]
        for name, v in cols.items():
            if name != "time":
                v[dup] = v[src]
        for name, v in valid.items():
            if name != "time":
                v[dup] = v[src]
    expected[kind >= 0] = kind[kind >= 0]

    def rows_of(name: str) -> np.ndarray:
        return np.flatnonzero(kind == INVALID_KINDS.index(name))

    # MISSING_FIELD: one required value null.
    rr = rows_of("MISSING_FIELD")
    required = ("claim_no", "person", "region", "scheme", "time", "vt", "fac", "loc", "total_amount",
                "self_funded_amount", "over_limit_amount", "class_b_copay_amount", "in_scope_amount")
    which = rng.integers(0, len(required), len(rr))
    for j, name in enumerate(required):
        valid[name][rr[which == j]] = False

    # INVALID_VALUE: an enum outside section 2.
    rr = rows_of("INVALID_VALUE")
    which = rng.integers(0, 4, len(rr))
    for j, (name, n_valid, n_bad) in enumerate((("scheme", len(SCHEMES), 2), ("vt", len(VISIT_TYPES), 2),
                                                ("fac", len(FACILITY_LEVELS), 2),
                                                ("loc", len(LOCALITIES), 2))):
        sel = rr[which == j]
        cols[name][sel] = n_valid + rng.integers(0, n_bad, len(sel))

    # INVALID_AMOUNT: one amount negative (a reversal).
    amounts = ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
               "in_scope_amount", "in_scope_class_b_amount")
    rr = rows_of("INVALID_AMOUNT")
    which = rng.integers(0, len(amounts), len(rr))
    for j, name in enumerate(amounts):
        sel = rr[which == j]
        cols[name][sel] = -(cols[name][sel] + 1 + rng.integers(0, 10_000, len(sel)))
        valid[name][sel] = True

    # AMOUNT_OUT_OF_RANGE: a self-funded amount above 10^12 fen, components still adding up.
    rr = rows_of("AMOUNT_OUT_OF_RANGE")
    extra = MAX_AMOUNT + 1 + rng.integers(0, 10**9, len(rr))
    cols["self_funded_amount"][rr] += extra
    cols["total_amount"][rr] += extra

    # AMOUNT_MISMATCH: components that don't add up, or class B above in scope.
    rr = rows_of("AMOUNT_MISMATCH")
    by_total = rng.random(len(rr)) < 0.5
    sel = rr[by_total]
    cols["total_amount"][sel] += 1 + rng.integers(0, 1000, len(sel))
    sel = rr[~by_total]
    cols["in_scope_class_b_amount"][sel] = cols["in_scope_amount"][sel] + 1 + rng.integers(0, 1000, len(sel))
    valid["in_scope_class_b_amount"][sel] = True

    # UNKNOWN_POLICY: a region with no policy in the set.
    rr = rows_of("UNKNOWN_POLICY")
    n_unknown = len(plan.region_vocab) - plan.n_set_regions
    cols["region"][rr] = plan.n_set_regions + rng.integers(0, n_unknown, len(rr))

    # UNKNOWN_IDENTITY: an identity the policy does not declare, besides those held.
    rr = rows_of("UNKNOWN_IDENTITY")
    for k, names in plan.undeclared.items():
        sel = rr[pol[rr] == k]
        if not len(names):
            kind[sel] = -1
            expected[sel] = -1
            continue
        cols["held"][sel, 2] = names[rng.integers(0, len(names), len(sel))]


# =========================================================================== public API


def _claims_schema() -> pa.Schema:
    import engine

    return engine.CLAIMS_SCHEMA


def _check_args(n: int, seed: int, invalid_rate: float) -> None:
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    if not 0.0 <= float(invalid_rate) <= 1.0:
        raise ValueError(f"invalid_rate must be in [0, 1], not {invalid_rate}")


def iter_claims(policies: PolicySet, n: int, seed: int, invalid_rate: float = 0.0,
                year: Optional[int] = None, *, label: bool = False) -> Iterator[pa.Table]:
    """The claims of `generate_claims`, as consecutive tables of whole days (in time order)."""
    _check_args(n, seed, invalid_rate)
    schema = _claims_schema()
    plan = _plan(policies, year)
    pop = _population(plan, n, seed)
    id_width = max(9, len(str(max(n - 1, 0))))
    for unit in _units(plan, pop, n, seed):
        yield _unit_table(plan, pop, unit, seed, float(invalid_rate), label, id_width, schema)


def generate_claims(policies: PolicySet, n: int, seed: int, invalid_rate: float = 0.0,
                    year: Optional[int] = None, *, label: bool = False) -> pa.Table:
    """`n` synthetic claims (schema `engine.CLAIMS_SCHEMA`) sorted by (settle_time, claim_id).

    `year` restricts the claims to that policy year (default: every year of the set).
    `label=True` adds a column `expected_status`."""
    tables = list(iter_claims(policies, n, seed, invalid_rate, year, label=label))
    if not tables:
        schema = _claims_schema()
        if label:
            schema = schema.append(pa.field("expected_status", pa.string()))
        return schema.empty_table()
    return pa.concat_tables(tables)


def generate_persons(policies: PolicySet, n: int, seed: int, year: Optional[int] = None) -> pa.Table:
    """The person registry (`PERSONS_SCHEMA`) behind `generate_claims(policies, n, seed, ..., year)`:
    every person of the population, with or without claims."""
    _check_args(n, seed, 0.0)
    plan = _plan(policies, year)
    return _persons_table(plan, _population(plan, n, seed))


def write_persons(path, policies: PolicySet, n: int, seed: int, year: Optional[int] = None, *,
                  compression: Optional[str] = None, outputs: Optional[Outputs] = None) -> int:
    """Write the person registry to Parquet (or Arrow IPC by extension), whole or not at all
    (at `outputs.commit()` when given); returns the row count."""
    table = generate_persons(policies, n, seed, year)
    write_table(table, path, compression=compression or PARQUET_COMPRESSION, outputs=outputs)
    return table.num_rows


def write_claims(path, policies: PolicySet, n: int, seed: int, invalid_rate: float = 0.0,
                 block: int = 1_000_000, year: Optional[int] = None, *, label: bool = False,
                 progress=None, compression: Optional[str] = None, outputs: Optional[Outputs] = None) -> int:
    """Stream `generate_claims(...)` into one file: Parquet (row groups of `block` rows), Arrow IPC
    (`.arrow/.feather/.ipc`, batches of `block` rows) or CSV, by extension, whole or not at all
    (at `outputs.commit()` when given). Returns the row count.

    Blocks of exactly `block` rows are written by the pipeline's writer thread (Arrow's writers
    release the GIL, so encoding overlaps with generating); `progress`, if given, is called with
    the number of rows written so far."""
    block = max(1, int(block))
    schema = _claims_schema()
    if label:
        schema = schema.append(pa.field("expected_status", pa.string()))
    with open_table_writer(Path(path), schema, row_group_size=block,
                           compression=compression or PARQUET_COMPRESSION, outputs=outputs) as writer:
        return write_stream(iter_claims(policies, n, seed, invalid_rate, year, label=label), writer.write,
                            exact=block, written=progress)
