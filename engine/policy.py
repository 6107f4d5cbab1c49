"""Policy files: YAML in, validated `engine.model.Policy` out (SETTLEMENT.md section 6).

Every value is checked here, at load time, so that settlement never meets a
malformed policy. A problem raises `PolicyError("<file>: <key path>: <reason>")`,
precise enough to fix the file without reading this module.

Numbers are converted exactly: a YAML float becomes `Decimal(repr(x))` (its
shortest round-trip decimal), an int `Decimal(x)`; money goes to integer fen
and ratios to integer basis points without any float arithmetic.

This module imports only `engine.model`, never the package `__init__`, so it
works without the compiled kernel.
"""
from __future__ import annotations

import datetime
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

import yaml

from engine.model import (
    AXES,
    BOUNDS,
    FACILITY_LEVELS,
    FUNDS,
    KIND_CLASS_RATIO,
    KIND_FIXED_AMOUNT,
    KIND_MAX_PERSONAL_SHARE,
    KIND_SEGMENTS,
    LOCALITIES,
    MAX_CAP_FACTOR,
    SCHEMES,
    VISIT_TYPES,
    Adjustment,
    Layer,
    Match,
    Policy,
    PolicySet,
    Rule,
    Segment,
)

__all__ = [
    "PolicyError",
    "parse_policy",
    "load_policy_file",
    "load_policies",
    "default_policies_path",
]

FILE_LEVEL = "(file)"  # key path of a problem with the file as a whole
FOLDER_LEVEL = "(folder)"  # key path of a problem with a policy folder

MAX_MONEY_YUAN = 10**10  # section 1: keeps every kernel product below 10^18
YEAR_RANGE = (1900, 2200)
AGE_RANGE = (0, 150)  # section 6.3: inclusive integers in [0, 150]
MONEY_PLACES, RATIO_PLACES = 2, 4  # yuan -> fen, ratio -> basis points

# Keys per level: (required, optional).
FILE_KEYS = (
    ("id", "region", "scheme", "year", "layers"),
    ("effective_from", "title", "sources", "identities", "disease_groups", "repeat_admission",
     "compliant_includes_class_b_copay"),
)
REPEAT_KEYS = ((), ("factors", "floor"))
LAYER_KEYS = (("name", "fund", "rules"), ("cap_groups", "adjustments"))
KIND_KEYS = ("ratio", "segments", "fixed_amount", "max_personal_share")  # exactly one
RATIO_RULE_KEYS = ("deductible", "axis", "bounds", "repeat_admission")  # ratio / segments only
RULE_KEYS = (("match",), KIND_KEYS + RATIO_RULE_KEYS + ("cap_group",))
SEGMENT_KEYS = (("ratio",), ("upto",))
CLASS_RATIO_KEYS = (("class_a", "class_b"), ())
ADJUSTMENT_EFFECTS = ("deductible_factor", "ratio", "ratio_add", "cap_factor", "uncapped")
ADJUSTMENT_KEYS = (("match",), ADJUSTMENT_EFFECTS)
MATCH_ENUMS = {"visit_type": VISIT_TYPES, "facility_level": FACILITY_LEVELS, "locality": LOCALITIES}
MATCH_KEYS = ((), tuple(MATCH_ENUMS) + ("referred", "identity", "holds", "disease_group",
                                         "min_age", "max_age"))

ICD_RANGE = re.compile(r"([A-Z][0-9]{2})(?:-([A-Z][0-9]{2}))?")
ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

PathLike = Union[str, "os.PathLike[str]"]


class PolicyError(ValueError):
    """A policy file (or folder) that cannot be loaded: `<file>: <key path>: <reason>`."""

    def __init__(self, file: str, path: str, reason: str):
        self.file = file
        self.path = path or FILE_LEVEL
        self.reason = reason
        super().__init__(f"{self.file}: {self.path}: {self.reason}")

    def __reduce__(self):  # keep it picklable across worker processes
        return (type(self), (self.file, self.path, self.reason))


# --------------------------------------------------------------------------- helpers

def _at(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _ix(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _show(v: Any) -> str:
    """A value as the policy author wrote it, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return f"a {type(v).__name__} ({v})"


def _declared(names) -> str:
    return f"declared: {', '.join(names)}" if names else "declared: none"


def _decimals(d: Decimal) -> int:
    """Decimal places that matter: trailing zeros don't count (0.850 has 2)."""
    _, digits, exp = d.as_tuple()
    places, i = -exp if exp < 0 else 0, len(digits)
    while places and i and digits[i - 1] == 0:
        places, i = places - 1, i - 1
    return places


# --------------------------------------------------------------------------- reader

class _Reader:
    """Reads one policy mapping; knows the file name and what the file declares."""

    def __init__(self, filename: str):
        self.filename = str(filename)
        self.file = os.path.basename(self.filename) or self.filename
        self.identities: tuple[str, ...] = ()
        self.disease_groups: dict[str, tuple[tuple[str, str], ...]] = {}

    def fail(self, path: str, reason: str) -> NoReturn:
        raise PolicyError(self.file, path, reason)

    # ---- shapes

    def mapping(self, v: Any, path: str, keys: tuple[tuple[str, ...], tuple[str, ...]]) -> dict:
        """A mapping with only known keys and every required one; unknown keys first (typos)."""
        if not isinstance(v, dict):
            self.fail(path, f"must be a mapping, not {_show(v)}")
        required, optional = keys
        for k in v:
            if k not in required and k not in optional:
                self.fail(_at(path, k), f"unknown key {_show(k)}")
        for k in required:
            if k not in v:
                self.fail(path, f"missing required key '{k}'")
        return v

    def dict_of(self, v: Any, path: str) -> dict:
        """A mapping whose keys are names the author chooses (cap groups, disease groups)."""
        if not isinstance(v, dict):
            self.fail(path, f"must be a mapping, not {_show(v)}")
        for k in v:
            self.name(k, _at(path, k))
        return v

    def seq(self, v: Any, path: str, nonempty: bool = True) -> list:
        if isinstance(v, str):
            self.fail(path, f"must be a list (write [{v}])")
        if not isinstance(v, list):
            self.fail(path, f"must be a list, not {_show(v)}")
        if nonempty and not v:
            self.fail(path, "must not be empty")
        return v

    def name(self, v: Any, path: str) -> str:
        """A string the author chose; YAML turns unquoted 140600 or `no` into other types."""
        if not isinstance(v, str):
            if isinstance(v, (list, dict)) or v is None:
                self.fail(path, f"must be a string, not {_show(v)}")
            self.fail(path, "must be a string (quote it)")
        if not v.strip():
            self.fail(path, "must not be empty")
        return v

    def text(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            self.fail(path, f"must be a string, not {_show(v)}")
        return v

    def boolean(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            self.fail(path, f"must be true or false, not {_show(v)}")
        return v

    def integer(self, v: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"must be a whole number, not {_show(v)}")
        if v < lo:
            self.fail(path, f"{v} is below {lo}")
        if v > hi:
            self.fail(path, f"{v} is above {hi}")
        return v

    def choice(self, v: Any, path: str, choices: tuple[str, ...]) -> str:
        if not isinstance(v, str) or v not in choices:
            self.fail(path, f"{_show(v)} is not one of: {', '.join(choices)}")
        return v

    def distinct(self, values: list, path: str) -> tuple:
        """A list whose items are distinct: a repeat is a typo (section 6.3)."""
        for i, x in enumerate(values):
            j = values.index(x)
            if j < i:
                self.fail(_ix(path, i), f"{_show(x)} is listed twice (also {_ix(path, j)})")
        return tuple(values)

    def choices(self, v: Any, path: str, choices: tuple[str, ...]) -> tuple[str, ...]:
        return self.distinct([self.choice(x, _ix(path, i), choices) for i, x in enumerate(self.seq(v, path))], path)

    def declared(self, v: Any, path: str, names, what: str) -> tuple[str, ...]:
        """Names in a match that the file must declare (identities, disease groups)."""
        out = []
        for i, x in enumerate(self.seq(v, path)):
            if not isinstance(x, str) or x not in names:
                self.fail(_ix(path, i), f"{_show(x)} is not a declared {what} ({_declared(names)})")
            out.append(x)
        return self.distinct(out, path)

    # ---- numbers

    def exact(self, v: Any, path: str, lo: int, hi: int, places: int, unit: str) -> int:
        """`v` scaled by 10**places, exactly; refuses bools, strings, non-finite and excess digits."""
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(path, f"must be a number, not {_show(v)}")
        d = Decimal(v) if isinstance(v, int) else Decimal(repr(v))
        if not d.is_finite():
            self.fail(path, f"must be a finite number, not {_show(v)}")
        if d < lo:
            self.fail(path, f"{_show(v)} is below {lo}")
        if d > hi:
            self.fail(path, f"{_show(v)} is above {hi}")
        n = _decimals(d)
        if n > places:
            self.fail(path, f"{_show(v)} has {n} decimals; {unit} at most {places}")
        return int(d * 10**places)

    def money(self, v: Any, path: str) -> int:
        """Yuan -> fen."""
        return self.exact(v, path, 0, MAX_MONEY_YUAN, MONEY_PLACES, "money takes")

    def ratio(self, v: Any, path: str) -> int:
        """Ratio in [0, 1] -> basis points."""
        return self.exact(v, path, 0, 1, RATIO_PLACES, "ratios take")

    def ratio_add(self, v: Any, path: str) -> int:
        """Signed ratio in [-1, 1] -> basis points."""
        return self.exact(v, path, -1, 1, RATIO_PLACES, "ratios take")

    def cap_factor(self, v: Any, path: str) -> int:
        """Factor in [0, 10] -> basis points."""
        return self.exact(v, path, 0, MAX_CAP_FACTOR // 10**RATIO_PLACES, RATIO_PLACES, "factors take")

    def date_in(self, v: Any, path: str, year: int) -> datetime.date:
        """A YAML date, or the string YYYY-MM-DD exactly, within `year` (section 6.1)."""
        if isinstance(v, datetime.datetime):  # a YAML timestamp: a version starts at a day's 00:00
            self.fail(path, f"{v.isoformat(sep=' ')} has a time; write the date only, like {year}-03-21")
        if isinstance(v, str):
            if not ISO_DATE.fullmatch(v):
                self.fail(path, f"{v!r} is not a date written YYYY-MM-DD (like {year}-03-21)")
            try:
                v = datetime.date.fromisoformat(v)
            except ValueError as e:
                self.fail(path, f"{_show(v)} is not a valid date ({e})")
        elif not isinstance(v, datetime.date):
            self.fail(path, f"must be a date like {year}-03-21, not {_show(v)}")
        if v.year != year:
            self.fail(path, f"{v.isoformat()} is not in year {year}")
        return v

    # ---- file

    def policy(self, m: Any) -> Policy:
        if not isinstance(m, dict):
            self.fail(FILE_LEVEL, f"must be a mapping of policy keys, not {_show(m)}")
        self.mapping(m, "", FILE_KEYS)
        pid = self.name(m["id"], "id")
        region = self.name(m["region"], "region")
        scheme = self.choice(m["scheme"], "scheme", SCHEMES)
        year = self.integer(m["year"], "year", *YEAR_RANGE)
        effective_from = (self.date_in(m["effective_from"], "effective_from", year)
                          if "effective_from" in m else datetime.date(year, 1, 1))
        title = self.text(m.get("title", ""), "title")
        sources = tuple(self.name(s, _ix("sources", i))
                        for i, s in enumerate(self.seq(m.get("sources", []), "sources", nonempty=False)))
        # Declarations before layers: matches refer to them wherever they sit in the file.
        self.identities = self.identity_names(m.get("identities", []), "identities")
        self.disease_groups = self.groups(m.get("disease_groups", {}), "disease_groups")
        copay = self.boolean(m.get("compliant_includes_class_b_copay", False), "compliant_includes_class_b_copay")
        factors, floor = self.repeat(m.get("repeat_admission", {}), "repeat_admission")
        return Policy(
            id=pid, region=region, scheme=scheme, year=year, title=title, sources=sources,
            identities=self.identities, compliant_includes_class_b_copay=copay,
            repeat_factors=factors, repeat_floor=floor, disease_groups=self.disease_groups,
            layers=self.layers(m["layers"], "layers"), path=self.filename, effective_from=effective_from,
        )

    def identity_names(self, v: Any, path: str) -> tuple[str, ...]:
        names: list[str] = []
        for i, x in enumerate(self.seq(v, path, nonempty=False)):
            name = self.name(x, _ix(path, i))
            if name in names:
                self.fail(_ix(path, i), f"{name!r} is listed twice")
            names.append(name)
        return tuple(names)

    def groups(self, v: Any, path: str) -> dict[str, tuple[tuple[str, str], ...]]:
        out = {}
        for name, codes in self.dict_of(v, path).items():
            p = _at(path, name)
            out[name] = tuple(self.icd_range(c, _ix(p, i)) for i, c in enumerate(self.seq(codes, p)))
        return out

    def icd_range(self, v: Any, path: str) -> tuple[str, str]:
        m = ICD_RANGE.fullmatch(v) if isinstance(v, str) else None
        if m is None:
            self.fail(path, f"{_show(v)} is not an ICD-10 category or range (like E10 or E10-E14)")
        low, high = m.group(1), m.group(2) or m.group(1)
        if low > high:
            self.fail(path, f"{v!r}: {low} is above {high}")
        return (low, high)

    def repeat(self, v: Any, path: str) -> tuple[tuple[int, ...], int]:
        if not isinstance(v, dict):
            self.fail(path, f"must be a mapping like {{factors: [1.0, 0.5], floor: 0}}, not {_show(v)}")
        self.mapping(v, path, REPEAT_KEYS)
        fp = _at(path, "factors")
        factors = tuple(self.ratio(f, _ix(fp, i)) for i, f in enumerate(self.seq(v.get("factors", [1]), fp)))
        return factors, self.money(v.get("floor", 0), _at(path, "floor"))

    # ---- layers

    def layers(self, v: Any, path: str) -> tuple[Layer, ...]:
        out: list[Layer] = []
        for i, lv in enumerate(self.seq(v, path)):
            layer = self.layer(lv, _ix(path, i), first=(i == 0))
            for j, earlier in enumerate(out):
                if earlier.name == layer.name:
                    self.fail(_at(_ix(path, i), "name"),
                              f"duplicate layer name {layer.name!r} (also {_ix(path, j)})")
            out.append(layer)
        return tuple(out)

    def layer(self, m: Any, path: str, first: bool) -> Layer:
        self.mapping(m, path, LAYER_KEYS)
        name = self.name(m["name"], _at(path, "name"))
        fund = self.choice(m["fund"], _at(path, "fund"), FUNDS)
        if first and fund != "basic":
            self.fail(_at(path, "fund"), f"the first layer's fund must be 'basic', not {fund!r}")
        cp = _at(path, "cap_groups")
        caps = {k: self.money(c, _at(cp, k)) for k, c in self.dict_of(m.get("cap_groups", {}), cp).items()}
        rp, ap = _at(path, "rules"), _at(path, "adjustments")
        rules = tuple(self.rule(r, _ix(rp, i), first, caps) for i, r in enumerate(self.seq(m["rules"], rp)))
        adjustments = tuple(self.adjustment(a, _ix(ap, i))
                            for i, a in enumerate(self.seq(m.get("adjustments", []), ap, nonempty=False)))
        return Layer(name=name, fund=fund, rules=rules, cap_groups=caps, adjustments=adjustments)

    def rule(self, m: Any, path: str, first: bool, caps: dict[str, int]) -> Rule:
        self.mapping(m, path, RULE_KEYS)
        kinds = [k for k in m if k in KIND_KEYS]
        if not kinds:
            self.fail(path, f"needs one of {', '.join(KIND_KEYS)}")
        if len(kinds) > 1:
            self.fail(path, f"has both {kinds[0]!r} and {kinds[1]!r}; a rule takes exactly one of "
                            f"{', '.join(KIND_KEYS)}")
        kind = kinds[0]
        at = lambda k: _at(path, k)  # noqa: E731
        common = {"match": self.match(m["match"], at("match"))}
        if "cap_group" in m:
            common["cap_groups"] = self.cap_groups(m["cap_group"], at("cap_group"), caps)

        if kind in ("fixed_amount", "max_personal_share"):
            for k in RATIO_RULE_KEYS:
                if k in m:
                    self.fail(at(k), f"{k!r} does not apply to a {kind} rule")
            if kind == "fixed_amount":
                return Rule(kind=KIND_FIXED_AMOUNT, fixed_amount=self.money(m[kind], at(kind)), **common)
            return Rule(kind=KIND_MAX_PERSONAL_SHARE, max_personal_share=self.ratio(m[kind], at(kind)), **common)

        axis = self.choice(m.get("axis", "claim"), at("axis"), AXES)
        repeat = self.boolean(m.get("repeat_admission", False), at("repeat_admission"))
        if repeat and not first:
            self.fail(at("repeat_admission"), "only the first layer may use repeat_admission")
        common.update(
            deductible=self.money(m.get("deductible", 0), at("deductible")),
            axis=axis,
            bounds=self.choice(m.get("bounds", "absolute"), at("bounds"), BOUNDS),
            repeat_admission=repeat,
        )
        if kind == "segments":
            return Rule(kind=KIND_SEGMENTS, segments=self.segments(m[kind], at(kind)), **common)
        if isinstance(m["ratio"], dict):
            if not first:
                self.fail(at("ratio"), "class ratios are allowed only in the first layer")
            if axis != "claim":
                self.fail(at("axis"), "class ratios work only on the claim axis")
            if "bounds" in m:
                self.fail(at("bounds"), "class ratios take no bounds (they have no segments)")
            cr = self.mapping(m["ratio"], at("ratio"), CLASS_RATIO_KEYS)
            class_ratio = (self.ratio(cr["class_a"], _at(at("ratio"), "class_a")),
                           self.ratio(cr["class_b"], _at(at("ratio"), "class_b")))
            return Rule(kind=KIND_CLASS_RATIO, class_ratio=class_ratio, **common)
        return Rule(kind=KIND_SEGMENTS, segments=(Segment(None, self.ratio(m["ratio"], at("ratio"))),), **common)

    def cap_groups(self, v: Any, path: str, caps: dict[str, int]) -> tuple[str, ...]:
        """One of the layer's cap groups, or a non-empty list of distinct ones (nested caps)."""
        def one(x: Any, p: str) -> str:
            if isinstance(x, (list, dict)) or x is None:
                self.fail(p, f"must be a cap group name, not {_show(x)}")
            group = self.name(x, p)
            if group not in caps:
                self.fail(p, f"{group!r} is not one of the layer's cap_groups ({_declared(caps)})")
            return group
        if isinstance(v, list):
            if not v:
                self.fail(path, "must not be empty (leave cap_group out for no cap)")
            return self.distinct([one(x, _ix(path, i)) for i, x in enumerate(v)], path)
        if isinstance(v, dict):
            self.fail(path, f"must be a cap group name or a list of them, not {_show(v)}")
        return (one(v, path),)

    def segments(self, v: Any, path: str) -> tuple[Segment, ...]:
        items = self.seq(v, path)
        out: list[Segment] = []
        for i, sv in enumerate(items):
            p = _ix(path, i)
            self.mapping(sv, p, SEGMENT_KEYS)
            last = i == len(items) - 1
            upto: Optional[int] = None
            if last and "upto" in sv:
                self.fail(_at(p, "upto"), "the last segment must have no 'upto' (it is open-ended)")
            if not last:
                if "upto" not in sv:
                    self.fail(p, "missing required key 'upto' (only the last segment is open-ended)")
                upto = self.money(sv["upto"], _at(p, "upto"))
                if out and upto <= out[-1].upto:
                    self.fail(_at(p, "upto"),
                              f"{_show(sv['upto'])} is not above the previous upto {_show(items[i - 1]['upto'])}")
            out.append(Segment(upto, self.ratio(sv["ratio"], _at(p, "ratio"))))
        return tuple(out)

    def adjustment(self, m: Any, path: str) -> Adjustment:
        self.mapping(m, path, ADJUSTMENT_KEYS)
        if not any(k in m for k in ADJUSTMENT_EFFECTS):
            self.fail(path, f"needs at least one of {', '.join(ADJUSTMENT_EFFECTS)}")
        parse = {"deductible_factor": self.ratio, "ratio": self.ratio, "ratio_add": self.ratio_add,
                 "cap_factor": self.cap_factor, "uncapped": self.boolean}
        return Adjustment(match=self.match(m["match"], _at(path, "match")),
                          **{k: parse[k](m[k], _at(path, k)) for k in ADJUSTMENT_EFFECTS if k in m})

    # ---- match

    def match(self, m: Any, path: str) -> Match:
        self.mapping(m, path, MATCH_KEYS)
        age = lambda v, p: self.integer(v, p, *AGE_RANGE)  # noqa: E731
        parsers: dict[str, Callable[[Any, str], Any]] = {
            **{k: (lambda v, p, c=c: self.choices(v, p, c)) for k, c in MATCH_ENUMS.items()},
            "referred": self.boolean,
            "identity": lambda v, p: self.declared(v, p, self.identities, "identity"),
            "holds": lambda v, p: self.declared(v, p, self.identities, "identity"),
            "disease_group": lambda v, p: self.declared(v, p, tuple(self.disease_groups), "disease group"),
            "min_age": age,
            "max_age": age,
        }
        fields = {k: parsers[k](v, _at(path, k)) for k, v in m.items()}
        lo, hi = fields.get("min_age"), fields.get("max_age")
        if lo is not None and hi is not None and lo > hi:
            self.fail(_at(path, "min_age"), f"{lo} is above max_age {hi}")
        return Match(**fields)


def parse_policy(mapping: dict, filename: str) -> Policy:
    """Validate one already-parsed policy mapping; errors name `filename`'s base name."""
    return _Reader(filename).policy(mapping)


# --------------------------------------------------------------------------- YAML

class _DuplicateKey(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


# libyaml's parser when PyYAML was built with it: the pure-Python one took half a second per load.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML loading silently resolves to the last."""

    def construct_document(self, node):
        self._check_duplicates(node, "", set())
        return super().construct_document(node)

    def _check_duplicates(self, node, path: str, seen: set) -> None:
        if id(node) in seen:  # aliases: each node once
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self._check_duplicates(child, _ix(path, i), seen)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden on purpose
                    self._check_duplicates(value_node, path, seen)
                    continue
                key = self.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                try:
                    if key in first_line:
                        raise _DuplicateKey(_at(path, key), f"duplicate key {_show(key)} at line {line} "
                                                            f"(first at line {first_line[key]})")
                    if key is not None:
                        first_line[key] = line
                except TypeError:  # unhashable key: YAML construction reports it
                    pass
                self._check_duplicates(value_node, _at(path, key), seen)


def load_policy_file(path: PathLike) -> Policy:
    """Read and validate one policy file."""
    path = Path(path)
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(name, FILE_LEVEL, f"cannot read: {e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise PolicyError(name, e.path, e.reason) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PolicyError(name, FILE_LEVEL, f"invalid YAML{where}: {problem}") from None
    if data is None:
        raise PolicyError(name, FILE_LEVEL, "is empty")
    return parse_policy(data, str(path))


# --------------------------------------------------------------------------- folders

def default_policies_path() -> Path:
    """The bundled seed policies, next to this module (engine/policies/)."""
    return Path(__file__).resolve().parent / "policies"


def load_policies(path: Optional[PathLike] = None) -> PolicySet:
    """Every *.yaml / *.yml of a folder, by file name; `None` = the bundled policies.

    Besides each file's own checks: ids are unique and no two files cover the
    same (region, scheme, year, effective_from), so `PolicySet.in_force` is
    never ambiguous (a file without effective_from is in force from January 1).
    """
    folder = Path(path) if path is not None else default_policies_path()
    label = folder.name or str(folder)
    if not folder.exists():
        raise PolicyError(label, FOLDER_LEVEL, f"no such folder: {folder}")
    if not folder.is_dir():
        raise PolicyError(label, FOLDER_LEVEL, f"not a folder: {folder}")
    files = sorted((f for f in folder.iterdir()
                    if f.suffix in (".yaml", ".yml") and not f.name.startswith(".") and f.is_file()),
                   key=lambda f: f.name)
    if not files:
        raise PolicyError(label, FOLDER_LEVEL, f"no policy files (*.yaml, *.yml) in {folder}")

    policies: list[Policy] = []
    by_id: dict[str, str] = {}
    by_key: dict[tuple[str, str, int, datetime.date], str] = {}
    for f in files:
        p = load_policy_file(f)
        if p.id in by_id:
            raise PolicyError(f.name, "id", f"duplicate id {p.id!r} (also in {by_id[p.id]})")
        key = (p.region, p.scheme, p.year, p.effective_from)
        if key in by_key:
            raise PolicyError(f.name, FILE_LEVEL, f"region {p.region!r}, scheme {p.scheme}, year {p.year}, "
                                                  f"in force from {p.effective_from.isoformat()} (effective_from; "
                                                  f"January 1 when absent) is already covered by {by_key[key]}")
        by_id[p.id], by_key[key] = f.name, f.name
        policies.append(p)
    return PolicySet(policies=tuple(policies), source=str(folder))
