"""Fixtures of the server tests: a policy set, a running server with the
test persons registered (real socket on 127.0.0.1, real client)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from srv_helpers import ThreadedServer, persons_pb, policy_set  # noqa: E402

import pg  # noqa: E402
from server.store import SQLiteStore, open_store  # noqa: E402

#: The store backends every store and group-writer test runs on (PostgreSQL ones with the
#: markers `service` and `postgres`: CI runs them, the fast suite does not).
BACKENDS = [pytest.param("sqlite", id="sqlite"),
            pytest.param("postgres", id="postgres", marks=[pytest.mark.service, pytest.mark.postgres])]


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the session (fails, never skips, when it cannot start)."""
    c = pg.start_cluster()
    yield c
    c.destroy()


@pytest.fixture
def pg_url(pg_cluster):
    """A fresh database of the session's cluster."""
    return pg_cluster.url(pg_cluster.create_database())


@pytest.fixture(scope="session")
def ps():
    return policy_set()


@pytest.fixture(params=["process", "thread",
                        pytest.param("postgres", marks=[pytest.mark.service, pytest.mark.postgres])])
def srv(ps, tmp_path, request):
    """A server with the test persons registered; every test runs with the writer in its own
    process (the default) and as a thread on an SQLite file, and on PostgreSQL (writer process)."""
    if request.param == "postgres":
        s = ThreadedServer(ps, request.getfixturevalue("pg_url"), verify=True, writer="process")
    else:
        s = ThreadedServer(ps, tmp_path / "store.db", verify=True, writer=request.param)
    s.registry.UpsertPersons(iter(persons_pb()), timeout=30)
    yield s
    s.stop()


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    """A function opening (and reopening) one fresh store of each backend; closes them after the test."""
    opened = []
    if request.param == "postgres":
        target = request.getfixturevalue("pg_url")
    else:
        target = str(tmp_path / "store.db")

    def open_(**kw):
        s = open_store(target, **kw) if request.param == "postgres" else SQLiteStore(target, **kw)
        opened.append(s)
        return s

    open_.backend = request.param
    open_.target = target
    yield open_
    for s in opened:
        try:
            s.close()
        except Exception:  # noqa: BLE001 (closed by the test)
            pass


@pytest.fixture
def store(store_factory):
    return store_factory()
