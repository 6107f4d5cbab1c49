"""The facility registry: which hospitals and pharmacies may settle, at what
level, where.

Why: the facility level and the locality decide the deductible and the
ratio. Issue 15's tertiary hospital could claim primary-level ratios because
the caller stated both. With a facility registry loaded:

* a claim whose facility_id is not registered is refused
  (NOT_FOUND / FACILITY_NOT_FOUND);
* the level is the registry's; a claim that leaves `facility_level` unset gets
  it, one that states another level is refused (INVALID_VALUE);
* the locality is derived where the registry can: a facility whose pooling
  region is in another province than the person's (first two digits of the
  GB/T 2260 codes) is `national`, one in another pooling region of the same
  province `province`. In the person's own pooling region the registry cannot
  tell `county` (县域内) from `region` (统筹区内县外): the person's county of
  residence is not in the person registry, so that one value still comes from
  the caller, and must be one of those two. A stated locality contradicting
  the derived one is refused (INVALID_VALUE); an unset one is filled in.

The claim is settled and stored with the resolved values (`resolve` sets them
on the claim), so the ledger holds what was settled.

`facilities.parquet` has exactly `engine.schema.FACILITIES_SCHEMA`:
`facility_id, name, region, admin_code, level` (strings; level primary |
secondary | tertiary). Loading (the file or the `UpsertFacilities` RPC) is all
or nothing: every record is checked first. Uploads go through the writer (so
they are ordered with settlements) and are stored as one `meta` entry of the
store, whatever its backend (a registry of some thousand facilities is a few
hundred KB; the writer re-reads it only when its version changed).

With an empty facility registry the server does not check facilities (it logs
that level and locality come from the caller): a store made before facilities
existed keeps working until its registry is loaded.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, NamedTuple, Optional

import pyarrow as pa

from engine.schema import FACILITIES_SCHEMA, FACILITY_LEVELS

from ._proto import settlement_pb2 as pb
from .errors import CallError
from .limits import MAX_ID_LEN, MAX_NAME_LEN, MAX_RECORDS_PER_UPSERT, prefix

E = pb.ErrorCode

LEVEL_TO_PB = {"primary": pb.FACILITY_LEVEL_PRIMARY, "secondary": pb.FACILITY_LEVEL_SECONDARY,
               "tertiary": pb.FACILITY_LEVEL_TERTIARY}
LEVEL_FROM_PB = {v: k for k, v in LEVEL_TO_PB.items()}
LOCALITY_NAME = {pb.LOCALITY_COUNTY: "county", pb.LOCALITY_REGION: "region", pb.LOCALITY_PROVINCE: "province",
                 pb.LOCALITY_NATIONAL: "national"}

COLUMNS = tuple(FACILITIES_SCHEMA.names)
#: The registry is one entry of the store's `meta` table (JSON records) and its SHA-256: every
#: backend has `meta`, no schema change, and a writer notices another's upload by the version.
META_KEY = "facility_registry"
VERSION_KEY = "facility_registry_sha256"


class Facility(NamedTuple):
    facility_id: str
    name: str
    region: str       # pooling region code, 6 digits
    admin_code: str   # county code, 6 digits
    level: str        # one of FACILITY_LEVELS


# --------------------------------------------------------------------------- validation


def _is_code(s) -> bool:
    return isinstance(s, str) and len(s) == 6 and s.isascii() and s.isdigit()


def facility_from_values(i: int, facility_id, name, region, admin_code, level) -> Facility:
    """Checks one record (index `i` for messages); raises CallError (INVALID_FACILITY)."""
    fid = facility_id or ""

    def bad(what: str, field: str) -> CallError:
        who = f"facility #{i}" + (f" ({prefix(fid)})" if fid else "")
        return CallError(E.INVALID_FACILITY, f"{who}: {what}; nothing of this upload was stored", field=field)

    if not fid:
        raise bad("facility_id is empty", "facility_id")
    if len(fid) > MAX_ID_LEN or not fid.isprintable():
        raise bad(f"facility_id is longer than {MAX_ID_LEN} characters or not printable", "facility_id")
    if not name:
        raise bad("name is empty", "name")
    if len(name) > MAX_NAME_LEN:
        raise bad(f"name is longer than {MAX_NAME_LEN} characters", "name")
    if not _is_code(region):
        raise bad(f"region {prefix(region or '')!r} is not a 6-digit pooling region code (GB/T 2260)", "region")
    if not _is_code(admin_code):
        raise bad(f"admin_code {prefix(admin_code or '')!r} is not a 6-digit administrative division code",
                  "admin_code")
    if admin_code[:2] != region[:2]:
        raise bad(f"admin_code {admin_code} is not in the province of region {region}", "admin_code")
    if level not in FACILITY_LEVELS:
        raise bad(f"level {prefix(level or '')!r} is not one of {', '.join(FACILITY_LEVELS)}", "level")
    return Facility(fid, name, region, admin_code, level)


def facility_from_pb(i: int, f: pb.Facility) -> Facility:
    level = LEVEL_FROM_PB.get(f.level, "FACILITY_LEVEL_UNSPECIFIED" if f.level == 0 else str(f.level))
    return facility_from_values(i, f.facility_id, f.name, f.region, f.admin_code, level)


def facility_to_pb(f: Facility) -> pb.Facility:
    return pb.Facility(facility_id=f.facility_id, name=f.name, region=f.region, admin_code=f.admin_code,
                       level=LEVEL_TO_PB[f.level])


def facilities_from_stream(records: Iterable[pb.Facility]) -> list:
    """Checked facilities of an upload (a later record of the same id wins); raises CallError."""
    out = {}
    for i, f in enumerate(records):
        if i >= MAX_RECORDS_PER_UPSERT:
            from .limits import too_many_records

            raise too_many_records("facilities")
        fac = facility_from_pb(i, f)
        out[fac.facility_id] = fac
    return list(out.values())


# --------------------------------------------------------------------------- parquet


def read_facilities_parquet(path) -> list:
    """The checked facilities of a facilities.parquet; raises ValueError naming the file, row
    and reason (nothing is loaded from a file with one bad record)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    for f in FACILITIES_SCHEMA:
        if f.name not in table.schema.names:
            raise ValueError(f"{path}: column {f.name} is missing (expected {f.type})")
        t = table.schema.field(f.name).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or
                (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))):
            raise ValueError(f"{path}: column {f.name} has type {t}, expected {f.type}")
    cols = [table.column(n).to_pylist() for n in COLUMNS]
    out = {}
    for k in range(table.num_rows):
        try:
            fac = facility_from_values(k, *(c[k] for c in cols))
        except CallError as e:
            raise ValueError(f"{path}: row {k}: {e.message.split(';')[0]}") from None
        out[fac.facility_id] = fac
    return list(out.values())


def facilities_table(facilities: Iterable[Facility]) -> pa.Table:
    facilities = list(facilities)
    return pa.Table.from_pydict({n: [getattr(f, n) for f in facilities] for n in COLUMNS}, schema=FACILITIES_SCHEMA)


def write_facilities_parquet(facilities: Iterable[Facility], path) -> None:
    """Writes whole or not at all (a temporary file renamed into place)."""
    import os

    import pyarrow.parquet as pq

    tmp = f"{path}.tmp"
    pq.write_table(facilities_table(facilities), tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- store


def encode(facilities: Iterable[Facility]) -> bytes:
    """The writer's payload of an upload, and the stored form: a JSON list of records."""
    return json.dumps([list(f) for f in facilities], separators=(",", ":"), ensure_ascii=False).encode()


def decode(data) -> list:
    return [Facility(*r) for r in json.loads(data)]


def stored(store) -> dict:
    """facility_id -> Facility, as the store holds them (any backend: a `meta` entry)."""
    data = store.get_meta(META_KEY)
    return {f.facility_id: f for f in decode(data)} if data else {}


def store_upload(store, facilities: list) -> dict:
    """Merges an upload into the stored registry in one transaction (all or nothing); returns
    the registry after it. The read and the write are one `update_meta` of the store: two
    instances on one PostgreSQL database uploading at once both keep their facilities (the
    second merges into what the first committed)."""
    merged: dict = {}

    def merge(current: Optional[str]) -> dict:
        merged.clear()  # a re-run (after a serialization failure) starts again from what it read
        if current:
            merged.update((f.facility_id, f) for f in decode(current))
        for f in facilities:
            merged[f.facility_id] = f
        data = encode(sorted(merged.values())).decode()
        return {META_KEY: data, VERSION_KEY: hashlib.sha256(data.encode()).hexdigest()}

    store.update_meta(META_KEY, merge)
    return merged


# --------------------------------------------------------------------------- claims


def not_found(claim: pb.Claim) -> CallError:
    return CallError(E.FACILITY_NOT_FOUND, f"facility {prefix(claim.facility_id)!r} is not in the facility "
                     "registry; only registered facilities settle (ask the insurance office to register it)",
                     field="facility_id", claim_id=claim.claim_id, person_id=claim.person_id)


def derived_locality(facility: Facility, person_region: str) -> Optional[int]:
    """The locality the registries decide (national, province), or None in the person's own
    pooling region (county or region: the caller's)."""
    if facility.region[:2] != person_region[:2]:
        return pb.LOCALITY_NATIONAL
    if facility.region != person_region:
        return pb.LOCALITY_PROVINCE
    return None


def resolve(claim: pb.Claim, facility: Facility, person_region: str) -> Optional[CallError]:
    """Sets the claim's facility_level and locality from the registries where they decide;
    returns the CallError for a claim that contradicts them (the claim is then unchanged)."""
    kw = dict(claim_id=claim.claim_id, person_id=claim.person_id)
    level = LEVEL_TO_PB[facility.level]
    if claim.facility_level not in (0, level):
        stated = LEVEL_FROM_PB.get(claim.facility_level, str(claim.facility_level))
        return CallError(E.INVALID_VALUE, f"facility_level {stated} contradicts the facility registry (facility "
                         f"{facility.facility_id} is {facility.level}); leave facility_level unset",
                         field="facility_level", **kw)
    loc = derived_locality(facility, person_region)
    if loc is None:
        if claim.locality in (pb.LOCALITY_PROVINCE, pb.LOCALITY_NATIONAL):
            return CallError(E.INVALID_VALUE, f"locality {LOCALITY_NAME[claim.locality]} contradicts the "
                             f"registries: facility {facility.facility_id} is in the person's pooling region; give "
                             "county or region", field="locality", **kw)
    elif claim.locality not in (0, loc):
        return CallError(E.INVALID_VALUE, f"locality {LOCALITY_NAME.get(claim.locality, claim.locality)} "
                         f"contradicts the registries: facility {facility.facility_id} is "
                         f"{'in another province' if loc == pb.LOCALITY_NATIONAL else 'in another pooling region of the province'}"
                         f" than the person's region; leave locality unset", field="locality", **kw)
    claim.facility_level = level
    if loc is not None:
        claim.locality = loc
    return None


class FacilityBook:
    """The writer's copy of the facility registry (replaced whole on each upload).

    `check(claim, person_region)` is the writer's step for each claim: None when the
    registry is empty (facilities not checked), FACILITY_NOT_FOUND for an unknown facility,
    else `resolve` (which sets level and locality on the claim) when the person is known."""

    def __init__(self, facilities: Optional[dict] = None):
        self.by_id: dict = dict(facilities or {})
        self.version: Optional[str] = None

    def refresh(self, store, version=...) -> None:
        """Re-reads the stored registry when its version changed (one meta lookup, or `version`
        when the caller read it already: the writer reads it with its group's lookups)."""
        v = store.get_meta(VERSION_KEY) if version is ... else version
        if v != self.version:
            self.by_id = stored(store)
            self.version = v

    def __len__(self) -> int:
        return len(self.by_id)

    def update(self, facilities: Iterable[Facility]) -> None:
        for f in facilities:
            self.by_id[f.facility_id] = f

    def check(self, claim: pb.Claim, person_region: Optional[str]) -> Optional[CallError]:
        if not self.by_id:
            return None
        f = self.by_id.get(claim.facility_id)
        if f is None:
            return not_found(claim)
        if person_region is None:
            return None  # PERSON_NOT_FOUND comes next
        return resolve(claim, f, person_region)
