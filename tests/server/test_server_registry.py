"""The enrollment registry: upload, lookup, validation, persons.parquet import."""
from __future__ import annotations

import datetime as dt

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
from srv_helpers import D, T, claim_row, pb, rpc_error, settle_request
from server.app import import_registry
from server.client import person_pb
from server.registry import PERSONS_SCHEMA, Person, basis_at, persons_table, read_persons_parquet, date_to_days
from server.store import SQLiteStore

pytestmark = pytest.mark.service


def test_upsert_and_get(srv):
    p = person_pb("q1", "000001", "resident", D(1988, 8, 8),
                  [("low_income", D(2024, 1, 1), None), ("monitored", None, D(2023, 12, 31))])
    assert srv.registry.UpsertPersons(iter([p])).upserted == 1
    assert srv.registry.GetPerson(pb.GetPersonRequest(person_id="q1")) == p
    code, d = rpc_error(srv.registry.GetPerson, pb.GetPersonRequest(person_id="nobody"))
    assert code == grpc.StatusCode.NOT_FOUND and d.reason == "PERSON_NOT_FOUND"


def test_invalid_upload_stores_nothing(srv):
    good = person_pb("q2", "000001", "resident", D(1970, 1, 1))
    bad_cases = [
        pb.Person(person_id="q3", scheme=pb.SCHEME_RESIDENT, birth_date=pb.Date(year=1970, month=1, day=1)),
        pb.Person(person_id="q3", region="000001", birth_date=pb.Date(year=1970, month=1, day=1)),
        pb.Person(person_id="q3", region="000001", scheme=pb.SCHEME_RESIDENT),
        pb.Person(person_id="q3", region="000001", scheme=pb.SCHEME_RESIDENT,
                  birth_date=pb.Date(year=1970, month=2, day=30)),
        person_pb("q3", "000001", "resident", D(1970, 1, 1), [("low_income", D(2024, 5, 1), D(2024, 4, 1))]),
        pb.Person(region="000001", scheme=pb.SCHEME_RESIDENT, birth_date=pb.Date(year=1970, month=1, day=1)),
    ]
    for bad in bad_cases:
        code, d = rpc_error(srv.registry.UpsertPersons, iter([good, bad]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_PERSON", bad
        assert "person #1" in d.message and "nothing" in d.message
    code, _ = rpc_error(srv.registry.GetPerson, pb.GetPersonRequest(person_id="q2"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_registry_change_moves_the_person_to_another_key(srv, ps):
    srv.stub.Settle(settle_request(claim_row("mv1", "p-plain", T(2024, 3, 1), in_scope=20_000_00)))
    # p-plain becomes an employee: later claims settle under the employee policy and its own accumulators
    srv.registry.UpsertPersons(iter([person_pb("p-plain", "000001", "employee", D(1960, 7, 1))]))
    r = srv.stub.Settle(settle_request(claim_row("mv2", "p-plain", T(2024, 9, 1), in_scope=20_000_00)))
    assert r.result.policy_id == "t-employee-2024" and r.basis.scheme == pb.SCHEME_EMPLOYEE
    accs = srv.stub.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-plain", year=2024)).accumulators
    assert sorted((a.scheme, a.compliant_total) for a in accs) == [(pb.SCHEME_EMPLOYEE, 20_000_00),
                                                                   (pb.SCHEME_RESIDENT, 20_000_00)]
    # a caller cannot raise benefits: nothing in the claim says scheme, region, age or identity
    assert {f.name for f in pb.Claim.DESCRIPTOR.fields} & {"scheme", "region", "age", "identities"} == set()


def test_identities_and_age_at_settle_time():
    p = Person("x", "000001", "resident", (dt.date(2000, 2, 29) - dt.date(1970, 1, 1)).days,
               (("a", date_to_days(dt.date(2024, 1, 1)), date_to_days(dt.date(2024, 1, 31))),
                ("b", None, None), ("a", date_to_days(dt.date(2024, 3, 1)), None)))
    us = lambda t: int((t - dt.datetime(1970, 1, 1)).total_seconds() * 1_000_000)  # noqa: E731
    assert basis_at(p, us(dt.datetime(2024, 1, 31, 23, 59))).identities == ["a", "b"]
    assert basis_at(p, us(dt.datetime(2024, 2, 1))).identities == ["b"]
    assert basis_at(p, us(dt.datetime(2024, 3, 1))).identities == ["b", "a"]  # spell order, once each
    assert basis_at(p, us(dt.datetime(2023, 2, 28))).age == 22
    assert basis_at(p, us(dt.datetime(2023, 3, 1))).age == 23
    assert basis_at(p, us(dt.datetime(2024, 2, 29))).age == 24
    assert basis_at(p, us(dt.datetime(2024, 3, 1))).year == 2024


def test_parquet_import(tmp_path, ps):
    persons = [Person("z1", "000001", "resident", 3000, (("low_income", 19723, None),)),
               Person("z2", "000001", "employee", -400, ())]
    path = tmp_path / "persons.parquet"
    pq.write_table(persons_table(persons), path)
    store = SQLiteStore(str(tmp_path / "s.db"))
    assert import_registry(store, str(path)) == 2
    assert import_registry(store, str(path)) == -1  # same file: skipped
    rows = store.persons(["z1", "z2"])
    assert rows["z1"][1:4] == ("000001", "resident", 3000) and rows["z2"][3] == -400
    # the generator's persons.parquet (`medsettle generate --persons`) has the same schema
    gen = __import__("engine.generate", fromlist=["generate_persons"]).generate_persons(
        engine.load_policies(None), 400, seed=1)
    assert gen.schema.remove_metadata().equals(PERSONS_SCHEMA)
    pq.write_table(gen, tmp_path / "gen.parquet")
    assert import_registry(store, str(tmp_path / "gen.parquet")) == gen.num_rows
    # a file without a column fails whole, naming the column
    pq.write_table(persons_table(persons).drop(["birth_date"]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="birth_date"):
        list(read_persons_parquet(tmp_path / "bad.parquet"))
    bad = persons_table(persons).set_column(2, "scheme", pa.array(["resident", "army"]))
    pq.write_table(bad, tmp_path / "bad2.parquet")
    with pytest.raises(ValueError, match="row 1: .*army"):
        import_registry(store, str(tmp_path / "bad2.parquet"))
    assert store.persons(["z1"])  # the earlier import is intact
    store.close()
