"""The vectorized as-of rule (engine/registry.py) agrees with the server's per-claim one."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from conftest import claims_table
from engine import load_policies
from engine.generate import generate_persons
from engine.registry import BASIS_BEFORE_BIRTH, BASIS_OK, BASIS_UNKNOWN_PERSON, ages, as_of
from engine.schema import PERSONS_SCHEMA


def _persons(rows):
    return pa.Table.from_pylist(rows, schema=PERSONS_SCHEMA)


def test_agrees_with_server_basis_at_on_generated_persons():
    server_registry = pytest.importorskip("server.registry")
    persons = generate_persons(load_policies(), 40_000, seed=7)
    rng = np.random.default_rng(3)
    n = 10_000
    pick = rng.integers(0, persons.num_rows, n)
    # dates across the generated years and around spell bounds and birthdays
    start = int(dt.datetime(2016, 6, 1).timestamp()) * 1_000_000
    span = 9 * 365 * 86_400_000_000
    times = start + rng.integers(0, span, n)
    pids = persons.column("person_id").take(pa.array(pick)).to_pylist()
    rows = [{"claim_id": f"c{i}", "person_id": pids[i], "region": "x", "scheme": "employee", "age": 1,
             "identities": ["stale"], "settle_time": dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(t))}
            for i, t in enumerate(times)]
    claims = claims_table(rows)
    got = as_of(claims, persons)
    reg = {p.person_id: p for batch in _server_persons(server_registry, persons) for p in batch}
    out = got.claims.to_pylist()
    compared = 0
    for i, row in enumerate(out):
        person = reg[pids[i]]
        if int(times[i]) // 86_400_000_000 < person.birth_days:
            assert got.basis_status[i] == BASIS_BEFORE_BIRTH
            continue
        b = server_registry.basis_at(person, int(times[i]))
        assert got.basis_status[i] == BASIS_OK
        assert (row["region"], row["scheme"], row["age"], row["identities"]) == \
            (b.region, b.scheme, b.age, b.identities), (i, row, b)
        compared += 1
    assert compared > 7_000
    assert sum(1 for r in out if r["identities"]) > 250  # identities are exercised


def _server_persons(server_registry, table, tmp=None):
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "persons.parquet"
        pq.write_table(table, path)
        yield from server_registry.read_persons_parquet(path)


def test_spell_bounds_inclusive_open_and_deduplicated():
    persons = _persons([
        {"person_id": "a", "region": "140600", "scheme": "resident", "birth_date": dt.date(2000, 2, 29),
         "identities": [
             {"identity": "low_income", "valid_from": dt.date(2022, 3, 1), "valid_to": dt.date(2022, 3, 31)},
             {"identity": "monitored", "valid_from": None, "valid_to": dt.date(2022, 3, 1)},
             {"identity": "low_income", "valid_from": dt.date(2022, 3, 15), "valid_to": None}]},
    ])
    days = [dt.datetime(2022, 2, 28, 23, 59), dt.datetime(2022, 3, 1), dt.datetime(2022, 3, 31, 12),
            dt.datetime(2022, 4, 1), dt.datetime(1999, 1, 1)]
    claims = claims_table([{"person_id": "a", "settle_time": t, "age": 99, "identities": ["x"]} for t in days]
                          + [{"person_id": "nobody", "age": 5, "identities": ["y"], "region": "r"}])
    got = as_of(claims, persons)
    rows = got.claims.to_pylist()
    assert [r["identities"] for r in rows[:4]] == [["monitored"], ["low_income", "monitored"], ["low_income"],
                                                   ["low_income"]]
    assert [r["age"] for r in rows[:4]] == [21, 22, 22, 22]  # 29 February: a year older on 1 March
    assert [r["region"] for r in rows[:4]] == ["140600"] * 4
    assert got.basis_status.tolist() == [BASIS_OK] * 4 + [BASIS_BEFORE_BIRTH, BASIS_UNKNOWN_PERSON]
    # rows without a basis keep their own columns
    assert (rows[4]["age"], rows[4]["identities"]) == (99, ["x"])
    assert (rows[5]["region"], rows[5]["age"], rows[5]["identities"]) == ("r", 5, ["y"])


def test_ages_vectorized():
    def d(y, m, dd):
        return (dt.date(y, m, dd) - dt.date(1970, 1, 1)).days
    birth = np.array([d(2000, 2, 29), d(2000, 2, 29), d(1960, 12, 31), d(1960, 12, 31)])
    day = np.array([d(2001, 2, 28), d(2001, 3, 1), d(2020, 12, 30), d(2020, 12, 31)])
    assert ages(birth, day).tolist() == [0, 1, 59, 60]


def test_civil_dates_equal_numpys_calendar():
    """The integer civil_from_days against numpy's datetime64, 2,190 years either side of 1970."""
    import numpy as np

    from engine.registry import _civil

    days = np.arange(-800_000, 800_000, dtype=np.int64)
    y, m, d = _civil(days)
    dd = days.astype("datetime64[D]")
    yy, mm = dd.astype("datetime64[Y]"), dd.astype("datetime64[M]")
    assert (y == yy.astype(np.int64) + 1970).all()
    assert (m == (mm - yy).astype(np.int64) + 1).all()
    assert (d == (dd - mm).astype(np.int64) + 1).all()
