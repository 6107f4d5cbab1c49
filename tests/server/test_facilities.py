"""The facility registry (server/facilities.py): validation, Parquet, store, level and locality."""
from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.schema import FACILITIES_SCHEMA
from server import facilities as fac
from server._proto import settlement_pb2 as pb
from server.errors import CallError

E = pb.ErrorCode
H1 = fac.Facility("H1", "Linfen People's Hospital", "141000", "141002", "tertiary")
H2 = fac.Facility("H2", "Yaodu Clinic", "141000", "141002", "primary")
H3 = fac.Facility("H3", "Taiyuan Hospital", "140100", "140105", "secondary")
H4 = fac.Facility("H4", "Beijing Hospital", "110000", "110101", "tertiary")


def claim(**kw):
    return pb.Claim(**{"claim_id": "C1", "person_id": "P1", "facility_id": "H1", **kw})


@pytest.mark.parametrize("values,field", [
    (("", "n", "141000", "141002", "primary"), "facility_id"),
    (("H" * 129, "n", "141000", "141002", "primary"), "facility_id"),
    (("H", "", "141000", "141002", "primary"), "name"),
    (("H", "n" * 201, "141000", "141002", "primary"), "name"),
    (("H", "n", "14100", "141002", "primary"), "region"),
    (("H", "n", "14100x", "141002", "primary"), "region"),
    (("H", "n", "141000", None, "primary"), "admin_code"),
    (("H", "n", "141000", "151002", "primary"), "admin_code"),
    (("H", "n", "141000", "141002", "quaternary"), "level"),
])
def test_invalid_records(values, field):
    with pytest.raises(CallError) as e:
        fac.facility_from_values(7, *values)
    assert e.value.code == E.INVALID_FACILITY and e.value.field == field and "#7" in e.value.message
    assert len(e.value.trailer()) < 1000


def test_pb_round_trip_and_stream():
    assert fac.facility_from_pb(0, fac.facility_to_pb(H1)) == H1
    newer = H1._replace(name="renamed")
    got = fac.facilities_from_stream([fac.facility_to_pb(H1), fac.facility_to_pb(H2), fac.facility_to_pb(newer)])
    assert got == [newer, H2]  # a later record of the same id wins
    with pytest.raises(CallError) as e:
        fac.facilities_from_stream([fac.facility_to_pb(H1), pb.Facility(facility_id="X", name="x", region="1",
                                                                         admin_code="141002", level=1)])
    assert "#1" in e.value.message


def test_parquet_round_trip_and_errors(tmp_path):
    path = tmp_path / "facilities.parquet"
    fac.write_facilities_parquet([H1, H2, H3], path)
    assert pq.read_schema(path) == FACILITIES_SCHEMA
    assert fac.read_facilities_parquet(path) == [H1, H2, H3]
    bad = fac.facilities_table([H1, H2]).to_pylist()
    bad[1]["level"] = "great"
    pq.write_table(pa.Table.from_pylist(bad, schema=FACILITIES_SCHEMA), path)
    with pytest.raises(ValueError, match=r"facilities.parquet: row 1: .*level"):
        fac.read_facilities_parquet(path)
    pq.write_table(pa.table({"facility_id": ["H1"]}), path)
    with pytest.raises(ValueError, match="column name is missing"):
        fac.read_facilities_parquet(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        fac.read_facilities_parquet(path)


def test_stored_in_meta_merged_and_versioned(store):
    """On both backends (the `store` fixture of conftest.py): the registry lives in `meta`."""
    assert fac.stored(store) == {}
    book = fac.FacilityBook()
    book.refresh(store)
    assert len(book) == 0
    assert fac.store_upload(store, [H1, H2]) == {"H1": H1, "H2": H2}
    assert fac.store_upload(store, [H1._replace(level="secondary")])["H2"] == H2
    assert fac.stored(store) == {"H1": H1._replace(level="secondary"), "H2": H2}
    book.refresh(store)
    assert book.by_id == fac.stored(store) and book.version
    v = book.version
    book.by_id = {}
    book.refresh(store)  # same version: not re-read
    assert book.by_id == {} and book.version == v
    fac.store_upload(store, [H3])
    book.refresh(store)
    assert set(book.by_id) == {"H1", "H2", "H3"}
    assert fac.decode(fac.encode([H1, H4])) == [H1, H4]


def test_level_from_the_registry():
    c = claim(locality=pb.LOCALITY_COUNTY)
    assert fac.resolve(c, H1, "141000") is None and c.facility_level == pb.FACILITY_LEVEL_TERTIARY
    c = claim(facility_level=pb.FACILITY_LEVEL_TERTIARY, locality=pb.LOCALITY_REGION)
    assert fac.resolve(c, H1, "141000") is None
    # issue 15: a tertiary hospital claiming primary-level ratios
    c = claim(facility_level=pb.FACILITY_LEVEL_PRIMARY, locality=pb.LOCALITY_COUNTY)
    err = fac.resolve(c, H1, "141000")
    assert err.code == E.INVALID_VALUE and err.field == "facility_level" and "tertiary" in err.message
    assert c.facility_level == pb.FACILITY_LEVEL_PRIMARY  # unchanged when refused


def test_locality_derived_where_the_registry_can():
    c = claim()
    assert fac.resolve(c, H3, "141000") is None and c.locality == pb.LOCALITY_PROVINCE  # other region, same province
    c = claim()
    assert fac.resolve(c, H4, "141000") is None and c.locality == pb.LOCALITY_NATIONAL  # other province
    for loc in (pb.LOCALITY_COUNTY, pb.LOCALITY_REGION, pb.LOCALITY_NATIONAL):
        err = fac.resolve(claim(locality=loc), H3, "141000")
        assert err.field == "locality" and err.code == E.INVALID_VALUE
    assert fac.resolve(claim(locality=pb.LOCALITY_PROVINCE), H4, "141000").field == "locality"
    # own pooling region: county or region is the caller's; unset stays unset (MISSING_FIELD in the engine)
    for loc in (pb.LOCALITY_COUNTY, pb.LOCALITY_REGION):
        c = claim(locality=loc)
        assert fac.resolve(c, H1, "141000") is None and c.locality == loc
    c = claim()
    assert fac.resolve(c, H1, "141000") is None and c.locality == 0
    for loc in (pb.LOCALITY_PROVINCE, pb.LOCALITY_NATIONAL):
        assert fac.resolve(claim(locality=loc), H1, "141000").field == "locality"


def test_not_found_bounded():
    err = fac.not_found(claim(facility_id="Z" * 100_000))
    assert err.code == E.FACILITY_NOT_FOUND and err.field == "facility_id" and len(err.trailer()) < 1000


def test_book():
    book = fac.FacilityBook()
    c = claim(facility_id="NOPE", facility_level=pb.FACILITY_LEVEL_PRIMARY)
    assert book.check(c, "141000") is None and c.facility_level == pb.FACILITY_LEVEL_PRIMARY  # empty: unchecked
    book.update([H1, H3])
    assert len(book) == 2
    assert book.check(c, "141000").code == E.FACILITY_NOT_FOUND
    assert book.check(claim(facility_id="H1"), None) is None  # unknown person: PERSON_NOT_FOUND follows
    c = claim(facility_id="H3")
    assert book.check(c, "141000") is None
    assert (c.facility_level, c.locality) == (pb.FACILITY_LEVEL_SECONDARY, pb.LOCALITY_PROVINCE)


def test_concurrent_uploads_of_two_instances_both_survive(store_factory, monkeypatch):
    """Two store objects on one database (two server instances) upload disjoint facilities at
    the same moment: the first is held inside its merge (after its read) until the second has
    either finished (a lost update without the lock) or waited for it 1 s; both uploads
    survive, on either backend."""
    a, b = store_factory(), store_factory()
    in_merge, b_done = threading.Event(), threading.Event()
    encode = fac.encode

    def held_encode(facilities):
        if threading.current_thread().name == "upload-a":
            in_merge.set()
            b_done.wait(1.0)  # B cannot finish while A holds the registry: this times out
        return encode(facilities)

    monkeypatch.setattr(fac, "encode", held_encode)
    errors = []

    def upload(store, facilities, done=None):
        try:
            fac.store_upload(store, facilities)
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)
        if done is not None:
            done.set()

    ta = threading.Thread(target=upload, args=(a, [H1, H2]), name="upload-a")
    ta.start()
    assert in_merge.wait(30)
    tb = threading.Thread(target=upload, args=(b, [H3, H4], b_done), name="upload-b")
    tb.start()
    ta.join(30)
    tb.join(30)
    assert not errors
    expected = {"H1": H1, "H2": H2, "H3": H3, "H4": H4}
    assert fac.stored(a) == expected and fac.stored(b) == expected
    book = fac.FacilityBook()
    book.refresh(a)
    assert book.by_id == expected
