"""server/batcher.py: the group writer without gRPC (slow commits)."""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time

import engine
from server.batcher import SETTLE, GroupWriter, Pending
from server.client import claim_pb
from server.core import Core
from server.registry import Person, person_to_row
from server.store import SQLiteStore

SHUOZHOU = ("140600", "resident")


def _claim(i: int) -> Pending:
    row = {"claim_id": f"c{i}", "person_id": f"p{i}", "settle_time": dt.datetime(2023, 3, 1, 9, 0, i),
           "visit_type": "outpatient", "facility_level": "primary", "locality": "county",
           "total_amount": 10_000, "in_scope_amount": 10_000}
    return Pending(SETTLE, claim_pb(row))


def test_a_slow_commit_is_logged_and_answered(tmp_path, monkeypatch, caplog):
    store = SQLiteStore(str(tmp_path / "store.db"))
    store.upsert_persons([person_to_row(Person(f"p{i}", *SHUOZHOU, 0, ())) for i in range(6)])
    gw = GroupWriter(store, Core(engine.load_policies()))
    group = store.group

    @contextlib.contextmanager
    def slow_group():
        with group() as g:
            commit = g.commit

            def slow_commit(*args, **kwargs):
                time.sleep(0.08)
                return commit(*args, **kwargs)

            g.commit = slow_commit
            yield g

    monkeypatch.setattr(store, "group", slow_group)
    with caplog.at_level(logging.WARNING, logger="medsettle.server"):
        answers = gw.process([_claim(i) for i in range(4)])
    assert all(isinstance(a, bytes) for _, a in answers) and len(answers) == 4
    assert gw.stats["slow_commits"] == 1 and gw.stats["settled"] == 4
    assert any("commit of 4 ledger rows took" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(store, "group", group)
    gw.process([_claim(i) for i in range(4, 6)])
    assert gw.stats["slow_commits"] == 1 and gw.stats["settled"] == 6
    store.close()
