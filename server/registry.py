"""The enrollment registry: persons, their scheme, region, birth date and
assistance-identity spells, and what they mean for a claim at a given time.

A claim sent to the server carries only the visit's facts; `basis_at` derives
from the registry what the engine needs about the person at settle_time:
region, scheme, the calendar year, the age in full years and the identities
whose spell covers that day.

`persons.parquet` (written by `medsettle generate --persons`, read by
`medsettle serve --registry`) has exactly `PERSONS_SCHEMA`:

    person_id string, region string, scheme string ("employee" | "resident"),
    birth_date date32,
    identities list<struct<identity: string, valid_from: date32, valid_to: date32>>

Spells are inclusive at both ends; a null bound is open.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Iterable, Iterator, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from engine.schema import PERSONS_SCHEMA, SCHEMES, SPELL_TYPE  # noqa: F401  (re-exported)

from ._proto import settlement_pb2 as pb
from .errors import CallError
from .limits import check_person_values, prefix
from .store import PersonRow

E = pb.ErrorCode

SCHEME_TO_PB = {"employee": pb.SCHEME_EMPLOYEE, "resident": pb.SCHEME_RESIDENT}
SCHEME_FROM_PB = {v: k for k, v in SCHEME_TO_PB.items()}

EPOCH = dt.date(1970, 1, 1)
EPOCH_ORD = EPOCH.toordinal()
US_PER_DAY = 86_400_000_000
MAX_ID_LEN = 128


class Person(NamedTuple):
    person_id: str
    region: str
    scheme: str  # "employee" | "resident"
    birth_days: int  # days since 1970-01-01
    spells: tuple  # ((identity, from_days | None, to_days | None), ...)


class Basis(NamedTuple):
    """The registry's facts for one claim at its settle_time."""

    region: str
    scheme: str
    year: int
    age: int
    identities: Optional[list]  # None when none held


# --------------------------------------------------------------------------- dates


def days_to_date(days: int) -> dt.date:
    return dt.date.fromordinal(EPOCH_ORD + days)


def date_to_days(d: dt.date) -> int:
    return d.toordinal() - EPOCH_ORD


def pb_date_to_days(d: pb.Date) -> int:
    """Raises ValueError for an impossible date."""
    return dt.date(d.year, d.month, d.day).toordinal() - EPOCH_ORD


def days_to_pb_date(days: int) -> pb.Date:
    d = days_to_date(days)
    return pb.Date(year=d.year, month=d.month, day=d.day)


def age_on(birth: dt.date, day: dt.date) -> int:
    """Full years on `day` (someone born on 29 February turns a year older on 1 March in common years)."""
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def basis_at(person: Person, settle_time_us: int, claim_id: str = "") -> Basis:
    """Region, scheme, year, age and identities of `person` at settle_time."""
    days = settle_time_us // US_PER_DAY
    try:
        day = dt.date.fromordinal(EPOCH_ORD + days)
    except (ValueError, OverflowError):
        raise CallError(E.INVALID_VALUE, f"settle_time_us {settle_time_us} is not a date between years 1 and 9999",
                        field="settle_time_us", claim_id=claim_id, person_id=person.person_id) from None
    if days < person.birth_days:
        raise CallError(E.INVALID_VALUE,
                        f"settle_time {day.isoformat()} is before the birth date of person {person.person_id} "
                        f"({days_to_date(person.birth_days).isoformat()}); check settle_time or the registry",
                        field="settle_time_us", claim_id=claim_id, person_id=person.person_id)
    age = age_on(days_to_date(person.birth_days), day)
    ids = None
    for name, lo, hi in person.spells:
        if (lo is None or lo <= days) and (hi is None or days <= hi):
            if ids is None:
                ids = [name]
            elif name not in ids:
                ids.append(name)
    return Basis(person.region, person.scheme, day.year, age, ids)


# --------------------------------------------------------------------------- validation and conversion


def _bad(i: int, pid: str, what: str, field: str) -> CallError:
    who = f"person #{i}" + (f" ({pid})" if pid else "")
    return CallError(E.INVALID_PERSON, f"{who}: {what}; nothing of this upload was stored", field=field,
                     person_id=pid)


def person_from_values(i: int, person_id, region, scheme, birth_days, spells) -> Person:
    """Checks one record (index `i` for messages); spells as (identity, from_days, to_days)."""
    pid = person_id or ""
    if not pid:
        raise _bad(i, pid, "person_id is empty", "person_id")
    if len(pid) > MAX_ID_LEN:
        raise _bad(i, pid[:20] + "...", f"person_id is longer than {MAX_ID_LEN} characters", "person_id")
    over = check_person_values(pid, region, spells)  # server/limits.py: every input bounded
    if over is not None:
        raise _bad(i, prefix(pid), *over)
    if not region:
        raise _bad(i, pid, "region is empty", "region")
    if scheme not in SCHEMES:
        raise _bad(i, pid, f"scheme {scheme!r} is not employee or resident", "scheme")
    if birth_days is None:
        raise _bad(i, pid, "birth_date is missing", "birth_date")
    out = []
    for j, (name, lo, hi) in enumerate(spells or ()):
        if not name:
            raise _bad(i, pid, f"identities[{j}].identity is empty", f"identities[{j}].identity")
        if lo is not None and hi is not None and hi < lo:
            raise _bad(i, pid, f"identities[{j}] ({name}) ends before it starts", f"identities[{j}].valid_to")
        out.append((name, lo, hi))
    return Person(pid, region, scheme, int(birth_days), tuple(out))


def person_from_pb(i: int, p: pb.Person) -> Person:
    pid = p.person_id
    try:
        if not p.HasField("birth_date"):
            birth = None
        else:
            birth = pb_date_to_days(p.birth_date)
    except ValueError as e:
        raise _bad(i, pid, f"birth_date is not a date ({e})", "birth_date") from None
    spells = []
    for j, s in enumerate(p.identities):
        try:
            lo = pb_date_to_days(s.valid_from) if s.HasField("valid_from") else None
            hi = pb_date_to_days(s.valid_to) if s.HasField("valid_to") else None
        except ValueError as e:
            raise _bad(i, pid, f"identities[{j}] has an impossible date ({e})", f"identities[{j}]") from None
        spells.append((s.identity, lo, hi))
    scheme = SCHEME_FROM_PB.get(p.scheme, "SCHEME_UNSPECIFIED" if p.scheme == 0 else str(p.scheme))
    return person_from_values(i, pid, p.region, scheme, birth, spells)


def person_to_pb(p: Person) -> pb.Person:
    out = pb.Person(person_id=p.person_id, region=p.region, scheme=SCHEME_TO_PB[p.scheme],
                    birth_date=days_to_pb_date(p.birth_days))
    for name, lo, hi in p.spells:
        s = out.identities.add(identity=name)
        if lo is not None:
            s.valid_from.CopyFrom(days_to_pb_date(lo))
        if hi is not None:
            s.valid_to.CopyFrom(days_to_pb_date(hi))
    return out


def person_to_row(p: Person) -> PersonRow:
    """The store's row: (person_id, region, scheme, birth_days, identities JSON)."""
    return PersonRow(p.person_id, p.region, p.scheme, p.birth_days, json.dumps([list(s) for s in p.spells],
                                                                       separators=(",", ":")))


def person_from_row(row) -> Person:
    pid, region, scheme, birth, spells = row
    return Person(pid, region, scheme, birth, tuple(tuple(s) for s in json.loads(spells)))


# --------------------------------------------------------------------------- parquet


def _check_schema(schema: pa.Schema, path: str) -> None:
    for f in PERSONS_SCHEMA:
        if f.name not in schema.names:
            raise ValueError(f"{path}: column {f.name} is missing (expected {f.type})")
        got = schema.field(f.name).type
        if f.name == "identities":
            ok = (pa.types.is_list(got) or pa.types.is_large_list(got)) and pa.types.is_struct(got.value_type) \
                and all(got.value_type.get_field_index(n) >= 0 for n in ("identity", "valid_from", "valid_to"))
        elif f.type == pa.string():
            ok = pa.types.is_string(got) or pa.types.is_large_string(got)
        else:
            ok = got == f.type
        if not ok:
            raise ValueError(f"{path}: column {f.name} has type {got}, expected {f.type}")


def read_persons_parquet(path, batch_size: int = 20_000) -> Iterator[list]:
    """Yields lists of checked `Person`s from a persons.parquet file; raises
    ValueError naming the file, row and reason for a bad file or record."""
    f = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps every row group read
    _check_schema(f.schema_arrow, str(path))
    base = 0
    for batch in f.iter_batches(batch_size=batch_size, columns=[x.name for x in PERSONS_SCHEMA]):
        batch = batch.cast(PERSONS_SCHEMA) if batch.schema != PERSONS_SCHEMA else batch
        cols = [batch.column(i) for i in range(5)]
        pids, regions, schemes = (c.to_pylist() for c in cols[:3])
        births = cols[3].cast(pa.int32()).to_pylist()
        spells = cols[4].to_pylist()
        out = []
        for k in range(batch.num_rows):
            sp = [(s["identity"], _d(s["valid_from"]), _d(s["valid_to"])) for s in (spells[k] or ())]
            try:
                out.append(person_from_values(base + k, pids[k], regions[k], schemes[k], births[k], sp))
            except CallError as e:
                raise ValueError(f"{path}: row {base + k}: {e.message.split(';')[0]}") from None
        base += batch.num_rows
        yield out


def _d(v) -> Optional[int]:
    return None if v is None else date_to_days(v)


def persons_table(persons: Iterable[Person]) -> pa.Table:
    """The `PERSONS_SCHEMA` table of some persons (tests, tools)."""
    persons = list(persons)
    return pa.Table.from_pydict({
        "person_id": [p.person_id for p in persons],
        "region": [p.region for p in persons],
        "scheme": [p.scheme for p in persons],
        "birth_date": [days_to_date(p.birth_days) for p in persons],
        "identities": [[{"identity": n, "valid_from": None if lo is None else days_to_date(lo),
                         "valid_to": None if hi is None else days_to_date(hi)} for n, lo, hi in p.spells]
                       for p in persons],
    }, schema=PERSONS_SCHEMA)


def write_persons_parquet(persons: Iterable[Person], path) -> None:
    pq.write_table(persons_table(persons), path)
