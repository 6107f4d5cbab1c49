"""Metrics and the call log (server/metrics.py), without sockets (the HTTP scrape is in
tests/server/test_security_service.py)."""
from __future__ import annotations

import json
import logging

import grpc
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics, note, status_of


def samples(m: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_calls_errors_latency_and_log(caplog):
    m = Metrics()
    with caplog.at_level(logging.INFO, logger="medsettle.calls"):
        b = m.begin()
        note(claim_id="C1", facility_id="H1", caller="facility:H1", person_id="P1", disease_code="C34",
             total_amount=123, outcome="settled")
        m.end("Settle", b, grpc.StatusCode.OK)
        b = m.begin()
        note(claim_id="C2", facility_id="H1", error="STORE_FAILURE")
        m.end("Settle", b, grpc.StatusCode.UNAVAILABLE)
        b = m.begin()
        note(error="OVERLOADED")
        m.end("Reverse", b, grpc.StatusCode.RESOURCE_EXHAUSTED)
    s = samples(m)
    assert s[("medsettle_calls_total", (("code", "OK"), ("method", "Settle")))] == 1
    assert s[("medsettle_calls_total", (("code", "UNAVAILABLE"), ("method", "Settle")))] == 1
    assert s[("medsettle_errors_total", (("error", "STORE_FAILURE"), ("method", "Settle")))] == 1
    assert s[("medsettle_store_failures_total", ())] == 1
    assert s[("medsettle_admission_refused_total", ())] == 1
    assert s[("medsettle_settlements_total", (("outcome", "settled"),))] == 1
    assert s[("medsettle_call_latency_seconds_count", (("method", "Settle"),))] == 2
    assert s[("medsettle_in_flight", ())] == 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "medsettle.calls"]
    assert [x["claim_id"] for x in lines] == ["C1", "C2", ""]
    assert lines[0]["status"] == "OK" and lines[0]["facility_id"] == "H1" and lines[0]["latency_ms"] >= 0
    assert lines[1]["error"] == "STORE_FAILURE"
    # no person, diagnosis or amounts unless asked
    assert not {"person_id", "disease_code", "total_amount"} & set(lines[0])


def test_detail_when_asked(caplog):
    m = Metrics(detail=True)
    with caplog.at_level(logging.INFO, logger="medsettle.calls"):
        b = m.begin()
        note(claim_id="C1", person_id="P1", disease_code="C34", total_amount=123)
        m.end("Settle", b, grpc.StatusCode.OK)
    line = json.loads(caplog.records[-1].getMessage())
    assert line["disease_code"] == "C34" and line["total_amount"] == 123 and line["person_id"] == "P1"


def test_groups_and_gauges_and_separate_registries():
    a, b = Metrics(), Metrics()
    a.observe_group(12, 0.004)
    a.queue_depth.set(7)
    sa, sb = samples(a), samples(b)
    assert sa[("medsettle_group_size_count", ())] == 1 and sa[("medsettle_group_size_sum", ())] == 12
    assert sa[("medsettle_commit_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert sa[("medsettle_queue_depth", ())] == 7 and sb[("medsettle_queue_depth", ())] == 0
    assert sa[("medsettle_serving", ())] == 1


def test_note_outside_a_call_is_harmless():
    note(claim_id="x")


def test_status_of():
    class Ctx:
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

    assert status_of(Ctx(None), None) is grpc.StatusCode.OK
    assert status_of(Ctx(grpc.StatusCode.NOT_FOUND), Exception()) is grpc.StatusCode.NOT_FOUND
    assert status_of(Ctx(7), Exception()) is grpc.StatusCode.PERMISSION_DENIED
    assert status_of(Ctx(None), Exception()) is grpc.StatusCode.UNKNOWN
