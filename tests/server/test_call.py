"""`medsettle call` (server/call.py): the JSON conversions (fast) and a session against a live
server (service): settle, replay, presettle, get, accumulators, person, reverse, and errors
as JSON with exit code 1."""
from __future__ import annotations

import datetime as dt
import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

import engine.cli as cli
from server._proto import settlement_pb2 as pb
from server.call import claim_from_json, error_json, message_to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from srv_helpers import ThreadedServer, claim_row, engine_results, engine_table, persons_pb, policy_set  # noqa: E402

CLAIM = {"claim_id": "J1", "person_id": "p-plain", "facility_id": "H1", "settle_time": "2024-03-01T09:30:00",
         "visit_type": "inpatient", "facility_level": "secondary", "locality": "county", "referred": False,
         "disease_code": "K35.800", "total_amount": 1_200_000, "self_funded_amount": 100_000,
         "over_limit_amount": 0, "class_b_copay_amount": 100_000, "in_scope_amount": 1_000_000,
         "in_scope_class_b_amount": 200_000}


# --------------------------------------------------------------------------- fast: conversions


def test_claim_from_json():
    c = claim_from_json(CLAIM)
    assert c.claim_id == "J1" and c.facility_id == "H1"
    assert c.settle_time_us == (dt.datetime(2024, 3, 1, 9, 30) - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    assert c.visit_type == pb.VISIT_TYPE_INPATIENT and c.facility_level == pb.FACILITY_LEVEL_SECONDARY
    assert c.locality == pb.LOCALITY_COUNTY and c.in_scope_class_b_amount == 200_000
    us = claim_from_json({**{k: v for k, v in CLAIM.items() if k != "settle_time"}, "settle_time_us": 5},
                         facility_id="H2")
    assert us.settle_time_us == 5 and us.facility_id == "H2"
    # a claims file's row: the registry's columns are accepted and not sent
    assert claim_from_json({**CLAIM, "region": "000001", "scheme": "resident", "age": 3, "identities": []}) == c


@pytest.mark.parametrize("change, fragment", [
    ({"total_amount": 12000.5}, "integer fen"),
    ({"visit_type": "ward"}, "visit_type 'ward' is not one of inpatient"),
    ({"settle_time": "yesterday"}, "not an ISO date-time"),
    ({"settle_time": "2024-03-01T09:30:00+08:00"}, "without a time zone"),
    ({"settle_time_us": 1}, "not both"),
    ({"hospital": "x"}, "unknown key(s) hospital"),
    ({"claim_id": ""}, "claim_id must be a non-empty string"),
])
def test_claim_errors_name_the_key(change, fragment):
    with pytest.raises(ValueError) as e:
        claim_from_json({**CLAIM, **change})
    assert fragment in str(e.value)


def test_message_to_json():
    r = pb.SettleResponse(result=pb.SettlementResult(claim_id="J1", status="ok", basic_pay=123,
                                                     layer_pays=[pb.LayerPay(layer="basic", pay=123)]),
                          accumulators=pb.Accumulators(scheme=pb.SCHEME_RESIDENT, year=2024), ledger_seq=7)
    j = message_to_json(r)
    assert j["result"]["basic_pay"] == 123 and isinstance(j["ledger_seq"], int)
    assert j["result"]["layer_pays"] == [{"layer": "basic", "pay": 123}]
    assert j["accumulators"]["scheme"] == "SCHEME_RESIDENT"
    assert j["result"]["identity"] == "" and j["replayed"] is False  # defaults are printed
    assert j["basis"] is None and j["delta"] is None  # unset messages are null
    c = message_to_json(claim_from_json({k: v for k, v in CLAIM.items() if k != "settle_time"}))
    assert c["settle_time_us"] is None and c["visit_type"] == "VISIT_TYPE_INPATIENT"
    json.dumps(j)


def test_usage_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "plugins", lambda: [EntryPoint("call", "server.call:register", cli.ENTRY_POINT_GROUP)])
    base = ["call", "settle", "--server", "127.0.0.1:1"]
    for argv, fragment in ((base + ["--claim", "{nope"], "not JSON"),
                           (base + ["--claim", json.dumps({**CLAIM, "total_amount": 1.5})], "integer fen"),
                           (base + ["--claim", "@" + str(tmp_path / "none.json")], "none.json"),
                           (base + ["--claims-file", str(tmp_path / "c.parquet")], "needs --claim-id"),
                           (base + ["--claim", json.dumps(CLAIM), "--tls-cert", "x.pem"], "go together")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
    assert cli.main(["call", "get", "--server", "x"]) == 2  # --claim-id missing: argparse's usage error
    capsys.readouterr()


def test_unreachable_server_is_an_error_answer(capsys, monkeypatch):
    monkeypatch.setattr(cli, "plugins", lambda: [EntryPoint("call", "server.call:register", cli.ENTRY_POINT_GROUP)])
    assert cli.main(["call", "get", "--server", "127.0.0.1:1", "--claim-id", "x", "--timeout", "2"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["grpc_status"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


# --------------------------------------------------------------------------- service: a session


@pytest.fixture
def server(tmp_path):
    s = ThreadedServer(policy_set(), tmp_path / "store.db", writer="thread")
    s.registry.UpsertPersons(iter(persons_pb()), timeout=30)
    yield s
    s.stop()


def call(capsys, monkeypatch, *argv) -> tuple[int, dict]:
    monkeypatch.setattr(cli, "plugins", lambda: [EntryPoint("call", "server.call:register", cli.ENTRY_POINT_GROUP)])
    code = cli.main(["call", *map(str, argv)])
    out, err = capsys.readouterr()
    assert err == "", err
    return code, json.loads(out)


@pytest.mark.service
def test_session(capsys, monkeypatch, server, tmp_path):
    srv = ["--server", server.target]
    code, settled = call(capsys, monkeypatch, "settle", *srv, "--claim", json.dumps(CLAIM))
    assert code == 0
    row = claim_row("J1", "p-plain", dt.datetime(2024, 3, 1, 9, 30), in_scope=1_000_000, self_funded=100_000,
                    class_b_copay=100_000, in_scope_class_b=200_000, disease_code="K35.800")
    want, _ = engine_results(policy_set(), [row])
    got = {k: settled["result"][k] for k in want[0]}
    assert got == {**want[0], "identity": want[0]["identity"] or ""}
    assert settled["replayed"] is False and settled["ledger_seq"] >= 1
    assert settled["basis"]["scheme"] == "SCHEME_RESIDENT"

    code, again = call(capsys, monkeypatch, "settle", *srv, "--claim", json.dumps(CLAIM))
    assert code == 0 and again["replayed"] is True and again["result"] == settled["result"]

    # a claims file's row by id, and a claim from a JSON file
    table = engine_table([claim_row("J2", "p-poor", dt.datetime(2024, 3, 2, 10), in_scope=500_000)])
    pq.write_table(table, tmp_path / "c.parquet")
    code, pre = call(capsys, monkeypatch, "presettle", *srv, "--claims-file", tmp_path / "c.parquet",
                     "--claim-id", "J2", "--facility-id", "H1")
    assert code == 0 and pre["ledger_seq"] == 0 and pre["result"]["claim_id"] == "J2"
    (tmp_path / "j1.json").write_text(json.dumps({**CLAIM, "claim_id": "J3"}))
    code, j3 = call(capsys, monkeypatch, "settle", *srv, "--claim", f"@{tmp_path / 'j1.json'}")
    assert code == 0 and j3["ledger_seq"] > settled["ledger_seq"]

    code, rec = call(capsys, monkeypatch, "get", *srv, "--claim-id", "J1")
    assert code == 0 and rec["state"] == "SETTLEMENT_STATE_SETTLED" and rec["settlement"]["result"] == settled["result"]
    code, acc = call(capsys, monkeypatch, "accumulators", *srv, "--person-id", "p-plain", "--year", 2024)
    assert code == 0 and acc["accumulators"][0]["admissions"] == 2
    code, person = call(capsys, monkeypatch, "person", *srv, "--person-id", "p-poor")
    assert code == 0 and person["identities"][0]["identity"] == "extreme_poverty"

    code, rev = call(capsys, monkeypatch, "reverse", *srv, "--claim-id", "J1", "--facility-id", "H1",
                     "--reason", "entered twice")
    assert code == 0 and rev["already_reversed"] is False and rev["accumulators"]["admissions"] == 1
    code, rev2 = call(capsys, monkeypatch, "reverse", *srv, "--claim-id", "J1", "--facility-id", "H1")
    assert code == 0 and rev2["already_reversed"] is True

    code, err = call(capsys, monkeypatch, "settle", *srv, "--claim", json.dumps(CLAIM))
    assert code == 1
    assert err["error"]["grpc_status"] == "FAILED_PRECONDITION" and err["error"]["code"] == "CLAIM_REVERSED"
    assert err["error"]["claim_id"] == "J1"
    code, err = call(capsys, monkeypatch, "person", *srv, "--person-id", "nobody")
    assert code == 1 and err["error"]["code"] == "PERSON_NOT_FOUND"


def test_error_json_without_detail():
    class Plain(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection refused"

        def trailing_metadata(self):
            return ()

    assert error_json(Plain()) == {"error": {"grpc_status": "UNAVAILABLE", "message": "connection refused"}}
