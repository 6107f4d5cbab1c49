"""Identity from client certificates and the authorization rules (server/auth.py), without sockets."""
from __future__ import annotations

import datetime as dt

import grpc
import pytest
from certs import NOW, expired, issue, make_ca

from server._proto import settlement_pb2 as pb
from server.auth import (TRUSTED, Authenticator, Authorizer, Caller, RecentPersons, caller_from_certificate)
from server.errors import CallError

E = pb.ErrorCode


@pytest.fixture(scope="module")
def ca():
    return make_ca()


class Ctx:
    """The part of a grpc.aio ServicerContext that Authenticator reads."""

    def __init__(self, pem=None):
        self.auth = {"transport_security_type": [b"ssl"]}
        if pem is not None:
            self.auth["x509_pem_cert"] = [pem]
            self.auth["x509_common_name"] = [b"ignored"]

    def auth_context(self):
        return self.auth


def test_facility_and_admin_from_uri_sans(ca):
    h1 = issue(ca, "Hospital One", facility="H1")
    c = caller_from_certificate(h1.cert)
    assert c == Caller("H1", False, "Hospital One")
    adm = caller_from_certificate(issue(ca, "office", admin=True).cert)
    assert adm.admin and adm.facility_id == ""
    both = caller_from_certificate(issue(ca, "H9 office", facility="H9", admin=True).cert)
    assert both.admin and both.facility_id == "H9"


def test_common_name_alone_is_not_a_facility(ca):
    # issue 15: CN=attacker-clinic settled as H1; the CN names nothing
    with pytest.raises(CallError) as e:
        caller_from_certificate(issue(ca, "H1").cert)
    assert e.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED and e.value.code == E.UNAUTHENTICATED
    with pytest.raises(CallError):  # a role we do not know is no role
        caller_from_certificate(issue(ca, "x", uris=("urn:medsettle:role:superuser",)).cert)


def test_two_facilities_refused(ca):
    two = issue(ca, "x", facility="H1", uris=("urn:medsettle:facility:H2",))
    with pytest.raises(CallError) as e:
        caller_from_certificate(two.cert)
    assert "more than one facility" in e.value.message


def test_expired_and_not_yet_valid(ca):
    with pytest.raises(CallError) as e:
        caller_from_certificate(expired(ca, "old", "H1").cert)
    assert e.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED and "not valid now" in e.value.message
    future = issue(ca, "f", facility="H1", not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=2))
    with pytest.raises(CallError):
        caller_from_certificate(future.cert)


def test_authenticator_without_tls_trusts_everyone():
    assert Authenticator(tls=False).caller(Ctx()) is TRUSTED


def test_authenticator_requires_a_certificate(ca):
    a = Authenticator(tls=True)
    with pytest.raises(CallError) as e:
        a.caller(Ctx())
    assert e.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(CallError):
        a.caller(Ctx(b"-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n"))
    assert a.caller(Ctx(issue(ca, "h", facility="H1").cert_pem)).facility_id == "H1"


def test_cached_certificate_expires_on_the_clock(ca):
    t = [NOW.timestamp()]
    a = Authenticator(tls=True, clock=lambda: t[0], cache_size=2)
    pair = issue(ca, "h", facility="H1", not_after=NOW + dt.timedelta(hours=1))
    assert a.caller(Ctx(pair.cert_pem)).facility_id == "H1"
    assert a.caller(Ctx(pair.cert_pem)).facility_id == "H1"  # from the cache
    t[0] += 7200
    with pytest.raises(CallError):
        a.caller(Ctx(pair.cert_pem))
    for k in range(4):  # bounded cache
        a.from_pem(issue(ca, f"h{k}", facility=f"H{k}", not_after=NOW + dt.timedelta(days=9)).cert_pem)
    assert len(a._cache) == 2


H1 = Caller("H1", False, "Hospital One")
H2 = Caller("H2", False, "Hospital Two")
ADMIN = Caller("", True, "office")


@pytest.mark.parametrize("method", ["Settle", "PreSettle", "Reverse"])
def test_facility_must_be_the_certificates(method):
    z = Authorizer()
    assert z.write(H1, method, "H1", "P1", "C1") is None
    err = z.write(H1, method, "H2", "P1", "C1")
    assert err.grpc_code == grpc.StatusCode.PERMISSION_DENIED and err.code == E.PERMISSION_DENIED
    assert err.field == "facility_id" and "H1" in err.message
    adm = z.write(ADMIN, method, "H1", "P1", "C1")  # an administrator does not settle for facilities
    assert adm.grpc_code == grpc.StatusCode.PERMISSION_DENIED
    assert z.write(TRUSTED, method, "anything", "P1", "C1") is None


def test_denied_message_bounds_the_callers_value():
    err = Authorizer().write(H1, "Settle", "X" * 100_000, "P1", "C1")
    assert len(err.message) < 300 and len(err.trailer()) < 1000


@pytest.mark.parametrize("method", ["UpsertPersons", "GetPerson", "UpsertFacilities", "GetFacility"])
def test_registry_needs_admin(method):
    assert Authorizer.method_allowed(H1, method).grpc_code == grpc.StatusCode.PERMISSION_DENIED
    assert Authorizer.method_allowed(ADMIN, method) is None
    assert Authorizer.method_allowed(TRUSTED, method) is None


def test_settlement_visible_only_to_its_facility():
    assert Authorizer.settlement_visible(H1, "H1")
    assert not Authorizer.settlement_visible(H2, "H1")
    assert not Authorizer.settlement_visible(H1, None)
    assert Authorizer.settlement_visible(ADMIN, "H1") and Authorizer.settlement_visible(TRUSTED, "H2")


def test_accumulators_of_persons_settled_or_being_settled():
    t = [0.0]
    z = Authorizer(RecentPersons(ttl=60, max_size=2, clock=lambda: t[0]))
    ledger = {("H1", "P1")}
    has = lambda f, p: (f, p) in ledger  # noqa: E731
    assert z.accumulators(H1, "P1", has) is None
    assert z.accumulators(ADMIN, "P9", has) is None
    denied = z.accumulators(H1, "P2", has)
    assert denied.grpc_code == grpc.StatusCode.PERMISSION_DENIED
    # the same words whether or not P2 exists: nothing about other facilities' data
    assert z.accumulators(H1, "NO-SUCH", has).message.replace("NO-SUCH", "P2") == denied.message
    assert z.write(H1, "PreSettle", "H1", "P2", "C9") is None
    assert z.accumulators(H1, "P2", has) is not None  # only once the call was answered
    z.settling(H1, "P2")  # a PreSettle of P2 answered: settling P2 now
    assert z.accumulators(H1, "P2", has) is None
    assert z.accumulators(H2, "P2", has) is not None
    t[0] += 61
    assert z.accumulators(H1, "P2", has) is not None  # forgotten after the TTL
