"""Fixtures of the server tests: a policy set, a running server with the
test persons registered (real socket on 127.0.0.1, real client)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from srv_helpers import ThreadedServer, persons_pb, policy_set  # noqa: E402

from server.store import SQLiteStore  # noqa: E402

#: The store backends every store and group-writer test runs on.
BACKENDS = [pytest.param("sqlite", id="sqlite")]


@pytest.fixture(scope="session")
def ps():
    return policy_set()


@pytest.fixture(params=["process", "thread"])
def srv(ps, tmp_path, request):
    """A server with the test persons registered; every test runs with the writer in its own
    process (the default) and as a thread."""
    s = ThreadedServer(ps, tmp_path / "store.db", verify=True, writer=request.param)
    s.registry.UpsertPersons(iter(persons_pb()), timeout=30)
    yield s
    s.stop()


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    """A function opening (and reopening) one fresh store of each backend; closes them after the test."""
    opened = []
    path = str(tmp_path / "store.db")

    def open_(**kw):
        s = SQLiteStore(path, **kw)
        opened.append(s)
        return s

    open_.backend = request.param
    open_.target = path
    yield open_
    for s in opened:
        try:
            s.close()
        except Exception:  # noqa: BLE001 (closed by the test)
            pass


@pytest.fixture
def store(store_factory):
    return store_factory()
