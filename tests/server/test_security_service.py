"""Issue 15 through live gRPC with mutual TLS: every method refused to the unauthenticated,
to the wrong facility and to the wrong role; the facility registry; bounded inputs; the
metrics scrape. One server (writer process) for the module."""
from __future__ import annotations

import asyncio
import threading
import urllib.request

import grpc
import pytest
from certs import PKI
from srv_helpers import PERSONS, T, claim_row, persons_pb, policy_set, rpc_error, settle_request

from server._proto import settlement_pb2 as pb
from server._proto import settlement_pb2_grpc as pb_grpc
from server.facilities import Facility, write_facilities_parquet

pytestmark = pytest.mark.service
E = pb.ErrorCode
FACILITIES = [Facility("H1", "Hospital One", "000001", "000101", "secondary"),
              Facility("H2", "Hospital Two", "000001", "000102", "secondary"),
              Facility("H3", "Hospital Three", "000002", "000201", "tertiary"),
              Facility("H9", "Far Hospital", "110000", "110101", "tertiary")]


class TLSServer:
    """server.app.Server with mutual TLS on 127.0.0.1, on its own event loop thread."""

    def __init__(self, tmp_path, **kw):
        from server.app import Server

        self.pki = PKI(tmp_path / "pki")
        write_facilities_parquet(FACILITIES, tmp_path / "facilities.parquet")
        creds = grpc.ssl_server_credentials([(self.pki.server.key_pem, self.pki.server.cert_pem)],
                                            root_certificates=self.pki.ca_pem, require_client_auth=True)
        self.srv = Server(policy_set(), str(tmp_path / "store.db"), credentials=creds, client_auth=True,
                          facilities_file=str(tmp_path / "facilities.parquet"), metrics_port=0, **kw)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.srv.start(), self.loop).result(60)
        self.channels = []

    def channel(self, pair=None):
        creds = grpc.ssl_channel_credentials(root_certificates=self.pki.ca_pem,
                                             private_key=pair.key_pem if pair else None,
                                             certificate_chain=pair.cert_pem if pair else None)
        ch = grpc.secure_channel(f"127.0.0.1:{self.port}", creds)
        self.channels.append(ch)
        return ch

    def stubs(self, pair=None):
        ch = self.channel(pair)
        return pb_grpc.SettlementStub(ch), pb_grpc.RegistryStub(ch)

    def stop(self):
        for ch in self.channels:
            ch.close()
        asyncio.run_coroutine_threadsafe(self.srv.stop(5), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    s = TLSServer(tmp_path_factory.mktemp("tls"))
    _, reg = s.stubs(s.pki.admin)
    reg.UpsertPersons(iter(persons_pb()), timeout=30)
    yield s
    s.stop()


def req(cid, pid="p-plain", facility="H1", **kw):
    r = settle_request(claim_row(cid, pid, T(2024, 3, 1, 10), **kw), facility_id=facility)
    r.claim.ClearField("facility_level")  # the registry's
    return r


def ledger_len(s) -> int:
    return s.srv.store.max_seq()


ALL_METHODS = [
    ("Settlement", "Settle", lambda: req("C-X")),
    ("Settlement", "PreSettle", lambda: req("C-X")),
    ("Settlement", "Reverse", lambda: pb.ReverseRequest(claim_id="C-X", facility_id="H1")),
    ("Settlement", "GetSettlement", lambda: pb.GetSettlementRequest(claim_id="C-X")),
    ("Settlement", "GetAccumulators", lambda: pb.GetAccumulatorsRequest(person_id="p-plain")),
    ("Registry", "GetPerson", lambda: pb.GetPersonRequest(person_id="p-plain")),
    ("Registry", "GetFacility", lambda: pb.GetFacilityRequest(facility_id="H1")),
]
STREAMS = [("UpsertPersons", lambda: persons_pb()[:1]), ("UpsertFacilities", lambda: [pb.Facility(
    facility_id="H7", name="x", region="000001", admin_code="000101", level=pb.FACILITY_LEVEL_PRIMARY)])]


def call(s, pair, svc, method, request, timeout=10):
    sett, reg = s.stubs(pair)
    return getattr(sett if svc == "Settlement" else reg, method)(request, timeout=timeout)


@pytest.mark.parametrize("who", ["none", "other_ca", "expired"])
def test_handshake_refuses_without_a_valid_certificate(tls, who):
    pair = {"none": None, "other_ca": tls.pki.foreign, "expired": tls.pki.expired}[who]
    before = ledger_len(tls)
    for svc, method, make in ALL_METHODS:
        code, _ = rpc_error(call, tls, pair, svc, method, make(), timeout=5)
        assert code == grpc.StatusCode.UNAVAILABLE, (who, method)
    _, reg = tls.stubs(pair)
    for method, make in STREAMS:
        code, _ = rpc_error(getattr(reg, method), iter(make()), timeout=5)
        assert code == grpc.StatusCode.UNAVAILABLE
    assert ledger_len(tls) == before


def test_certificate_without_facility_or_role_is_unauthenticated(tls):
    before = ledger_len(tls)
    for svc, method, make in ALL_METHODS:
        code, d = rpc_error(call, tls, tls.pki.cn_only, svc, method, make())
        assert code == grpc.StatusCode.UNAUTHENTICATED and d.reason == "UNAUTHENTICATED", method
    _, reg = tls.stubs(tls.pki.cn_only)
    for method, make in STREAMS:
        code, _ = rpc_error(getattr(reg, method), iter(make()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert ledger_len(tls) == before


def test_wrong_facility_settles_and_reverses_nothing(tls):
    h1, _ = tls.stubs(tls.pki.h1)
    h2, _ = tls.stubs(tls.pki.h2)
    r = h1.Settle(req("W-1"), timeout=10)
    assert r.result.status == "ok" and r.ledger_seq > 0
    before = ledger_len(tls)
    for method in ("Settle", "PreSettle"):  # H2's certificate claiming to be H1
        code, d = rpc_error(getattr(h2, method), req("W-2", facility="H1"), timeout=10)
        assert code == grpc.StatusCode.PERMISSION_DENIED and d.field == "facility_id" and "H2" in d.message
    code, d = rpc_error(h2.Reverse, pb.ReverseRequest(claim_id="W-1", facility_id="H1"), timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # as itself, H2 learns nothing of H1's claim: the answer of a claim never settled
    code, d = rpc_error(h2.Reverse, pb.ReverseRequest(claim_id="W-1", facility_id="H2"), timeout=10)
    code0, d0 = rpc_error(h2.Reverse, pb.ReverseRequest(claim_id="W-0", facility_id="H2"), timeout=10)
    assert code == code0 == grpc.StatusCode.NOT_FOUND and d.reason == d0.reason == "CLAIM_NOT_FOUND"
    assert d.message.replace("W-1", "W-0") == d0.message and "H1" not in d.message
    code, d = rpc_error(h2.GetSettlement, pb.GetSettlementRequest(claim_id="W-1"), timeout=10)
    code0, d0 = rpc_error(h2.GetSettlement, pb.GetSettlementRequest(claim_id="W-0"), timeout=10)
    assert code == code0 == grpc.StatusCode.NOT_FOUND and d.message.replace("W-1", "W-0") == d0.message
    # a PreSettle guessing another facility's claim_id learns nothing of its content
    code, d = rpc_error(h2.PreSettle, req("W-1", pid="p-poor", facility="H2"), timeout=10)
    assert d.reason == "DUPLICATE_CLAIM" and "differs" not in d.message and "person_id" not in d.message
    code, d = rpc_error(h2.GetAccumulators, pb.GetAccumulatorsRequest(person_id="p-plain"), timeout=10)
    code0, d0 = rpc_error(h2.GetAccumulators, pb.GetAccumulatorsRequest(person_id="nobody"), timeout=10)
    assert code == code0 == grpc.StatusCode.PERMISSION_DENIED
    assert d.message.replace("p-plain", "nobody") == d0.message
    assert ledger_len(tls) == before
    # the settling facility reads and reverses its own
    assert h1.GetSettlement(pb.GetSettlementRequest(claim_id="W-1"), timeout=10).claim.facility_id == "H1"
    assert h1.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-plain"), timeout=10).accumulators
    assert not h1.Reverse(pb.ReverseRequest(claim_id="W-1", facility_id="H1"), timeout=10).already_reversed


def test_accumulators_of_a_person_being_settled(tls):
    h2, _ = tls.stubs(tls.pki.h2)
    code, _ = rpc_error(h2.GetAccumulators, pb.GetAccumulatorsRequest(person_id="p-kid"), timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    h2.PreSettle(req("K-1", pid="p-kid", facility="H2"), timeout=10)
    h2.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-kid"), timeout=10)


def test_facility_versus_admin(tls):
    h1s, h1r = tls.stubs(tls.pki.h1)
    adm_s, adm_r = tls.stubs(tls.pki.admin)
    poor = [p for p in persons_pb() if p.person_id == "p-plain"][0]
    rich = pb.Person()
    rich.CopyFrom(poor)
    rich.identities.add(identity="extreme_poverty")  # issue 15: a facility raising benefits
    code, d = rpc_error(h1r.UpsertPersons, iter([rich]), timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED and d.reason == "PERMISSION_DENIED"
    assert adm_r.GetPerson(pb.GetPersonRequest(person_id="p-plain"), timeout=10) == poor
    for method, request in (("GetPerson", pb.GetPersonRequest(person_id="p-plain")),
                            ("GetFacility", pb.GetFacilityRequest(facility_id="H1"))):
        code, _ = rpc_error(getattr(h1r, method), request, timeout=10)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = rpc_error(h1r.UpsertFacilities, iter([pb.Facility(facility_id="H1", name="x", region="000001",
                                                                admin_code="000101", level=1)]), timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert adm_r.GetFacility(pb.GetFacilityRequest(facility_id="H1"), timeout=10).level == pb.FACILITY_LEVEL_SECONDARY
    # an administrator reads everything, settles nothing
    h1s.Settle(req("A-1"), timeout=10)
    assert adm_s.GetSettlement(pb.GetSettlementRequest(claim_id="A-1"), timeout=10).claim.facility_id == "H1"
    adm_s.GetAccumulators(pb.GetAccumulatorsRequest(person_id="p-plain"), timeout=10)
    code, _ = rpc_error(adm_s.Settle, req("A-2"), timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert adm_r.UpsertPersons(iter([poor]), timeout=10).upserted == 1


def test_facility_registry_decides_level_and_locality(tls):
    from certs import issue

    h3 = issue(tls.pki.ca, "Hospital Three", facility="H3")
    h4 = issue(tls.pki.ca, "Unregistered", facility="H4")
    s3, _ = tls.stubs(h3)
    s4, _ = tls.stubs(h4)
    code, d = rpc_error(s4.Settle, req("F-1", facility="H4"), timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND and d.reason == "FACILITY_NOT_FOUND"
    r = req("F-2", facility="H3")
    r.claim.facility_level = pb.FACILITY_LEVEL_PRIMARY  # a tertiary hospital claiming primary ratios
    code, d = rpc_error(s3.Settle, r, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.field == "facility_level"
    r = req("F-3", facility="H3")
    r.claim.locality = pb.LOCALITY_COUNTY  # H3 is in another pooling region of the province
    code, d = rpc_error(s3.Settle, r, timeout=10)
    assert d.field == "locality"
    r = req("F-4", facility="H3")
    r.claim.ClearField("locality")
    first = s3.Settle(r, timeout=10)
    rec = s3.GetSettlement(pb.GetSettlementRequest(claim_id="F-4"), timeout=10)
    assert (rec.claim.facility_level, rec.claim.locality) == (pb.FACILITY_LEVEL_TERTIARY, pb.LOCALITY_PROVINCE)
    again = s3.Settle(r, timeout=10)  # the same request again: a replay
    assert again.replayed and again.ledger_seq == first.ledger_seq


def test_inputs_bounded(tls):
    h1, _ = tls.stubs(tls.pki.h1)
    r = req("B-1")
    data = r.SerializeToString() + b"\xfa\x07\x80\x80\x20" + b"x" * (1 << 19)  # a 512 KiB unknown field
    raw = tls.channel(tls.pki.h1).unary_unary("/medsettle.v1.Settlement/Settle")
    code, d = rpc_error(raw, data, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_REQUEST"
    small = r.SerializeToString() + b"\xfa\x07\x10" + b"y" * 16  # an unknown field within the size bound
    out = pb.SettleResponse.FromString(raw(small, timeout=10))
    assert out.result.status == "ok"
    rec = h1.GetSettlement(pb.GetSettlementRequest(claim_id="B-1"), timeout=10)
    assert rec.claim.SerializeToString() == pb.Claim.FromString(rec.claim.SerializeToString()).SerializeToString()
    assert b"yyyy" not in rec.SerializeToString()  # dropped before it was stored
    code, d = rpc_error(h1.Reverse, pb.ReverseRequest(claim_id="B-1", facility_id="H1", reason="r" * 600), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.field == "reason"
    code, d = rpc_error(h1.Reverse, pb.ReverseRequest(claim_id="B-1", facility_id="H1", reason="r" * (100 << 10)),
                        timeout=20)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_REQUEST"
    code, _ = rpc_error(h1.Reverse, pb.ReverseRequest(claim_id="B-1", facility_id="H1", reason="r" * (10 << 20)),
                        timeout=20)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own limit: 1 MB
    assert not h1.GetSettlement(pb.GetSettlementRequest(claim_id="B-1"), timeout=10).reversal_seq
    code, d = rpc_error(h1.Settle, req("B-2", pid="p" * 20_000), timeout=10)  # echoed as a bounded prefix
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.field == "person_id" and len(d.SerializeToString()) < 1000
    bad_utf8 = tls.channel(tls.pki.h1).unary_unary("/medsettle.v1.Settlement/GetSettlement")
    code, d = rpc_error(bad_utf8, b"\x0a\x04\xff\xfe\xfd\xfc", timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_REQUEST" and "UTF-8" in d.message
    code, d = rpc_error(raw, b"\x0a\x04\xff\xfe\xfd\xfc", timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_REQUEST"
    _, adm = tls.stubs(tls.pki.admin)
    big = persons_pb()[0]
    big.identities.extend([pb.IdentitySpell(identity="low_income")] * 65)
    code, d = rpc_error(adm.UpsertPersons, iter([big]), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d.field == "identities"


def test_metrics_scrape(tls):
    h1, _ = tls.stubs(tls.pki.h1)
    h1.Settle(req("M-1"), timeout=10)
    rpc_error(h1.Settle, req("M-2", facility="H2"), timeout=10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{tls.srv.metrics.port}/metrics", timeout=10).read().decode()
    assert 'medsettle_calls_total{code="OK",method="Settle"}' in text
    assert 'medsettle_calls_total{code="PERMISSION_DENIED",method="Settle"}' in text
    assert 'medsettle_errors_total{error="PERMISSION_DENIED",method="Settle"}' in text
    assert "medsettle_call_latency_seconds_bucket" in text and "medsettle_group_size_bucket" in text
    assert "medsettle_commit_latency_seconds_count" in text and "medsettle_queue_depth" in text
    assert "medsettle_serving 1.0" in text
