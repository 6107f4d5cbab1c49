"""Who is calling, and what they may do: identity from the TLS client
certificate and the authorization rules of every method.

Deployed, the server runs with mutual TLS: gRPC's handshake already refuses a
certificate that a CA other than `--tls-client-ca` signed, or one that has
expired, and a client without a certificate. What the handshake leaves to
us is *who* the certificate was issued to and *what* they may do:

* **Facility.** The facility a certificate was issued to is its URI subject
  alternative name `urn:medsettle:facility:<facility_id>` (exactly one). The
  subject CN is shown in logs only: it is free text in most CAs' practice and
  was the way in of issue 15's `CN=attacker-clinic`.
* **Role.** A certificate with the URI SAN `urn:medsettle:role:admin` is an
  administrator's. Without it, the certificate is a facility's. An
  administrator certificate need not name a facility (and settles nothing
  unless it does).

Rules (`Authorizer`):

* Settle, PreSettle, Reverse: a facility certificate whose facility equals the
  request's facility_id (an administrator cannot settle for a facility).
* UpsertPersons, GetPerson, facility registry calls: administrator.
* GetSettlement: an administrator, or the facility that settled the claim;
  another facility's claim is answered exactly like a claim that does not
  exist (NOT_FOUND), so a guesser learns nothing.
* GetAccumulators: an administrator, or a facility that has settled the person
  (a `settle` row of that facility and person in the ledger) or is settling
  them (a Settle or PreSettle of that facility for the person in the last
  `RECENT_TTL_S` seconds). Refused with the same words whether or not the
  person exists.

Refused calls are UNAUTHENTICATED (no usable identity) or PERMISSION_DENIED
(an identity that may not do this); the messages name only the caller's own
facility and a bounded prefix of what the caller sent.

Without TLS, every caller is `TRUSTED` (the server then listens on loopback
only and says so in its log).
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from ._proto import settlement_pb2 as pb
from .errors import CallError
from .limits import MAX_ID_LEN, prefix

E = pb.ErrorCode

FACILITY_URN = "urn:medsettle:facility:"
ROLE_URN = "urn:medsettle:role:"
ADMIN_ROLE = "admin"
#: How long a facility's Settle/PreSettle of a person lets it read the person's accumulators
#: without a ledger row (a pre-settlement at the counter, a settlement in flight).
RECENT_TTL_S = 3600.0
RECENT_MAX = 100_000
CACHE_MAX = 4096

#: Methods and what they need (the full method name's last part).
FACILITY_METHODS = frozenset({"Settle", "PreSettle", "Reverse"})
ADMIN_METHODS = frozenset({"UpsertPersons", "GetPerson", "UpsertFacilities", "GetFacility"})
READ_METHODS = frozenset({"GetSettlement", "GetAccumulators"})


class Caller(NamedTuple):
    """An authenticated caller: the facility its certificate names ("" for none), whether it
    is an administrator, the subject for logs, and whether every caller is trusted (no TLS)."""

    facility_id: str
    admin: bool
    subject: str
    trusted: bool = False

    def label(self) -> str:
        if self.trusted:
            return "trusted"
        return ("admin" if self.admin else "facility") + (f":{self.facility_id}" if self.facility_id else "")


#: The caller of a server without TLS: everyone, allowed everything.
TRUSTED = Caller("", True, "no TLS: every caller is trusted", True)


def unauthenticated(what: str) -> CallError:
    return CallError(E.UNAUTHENTICATED, f"{what}; call with a client certificate issued by the settlement "
                     "operator's CA", grpc_code=grpc.StatusCode.UNAUTHENTICATED)


def denied(what: str, *, field: str = "", claim_id: str = "", person_id: str = "") -> CallError:
    return CallError(E.PERMISSION_DENIED, what, field=field, claim_id=prefix(claim_id), person_id=prefix(person_id),
                     grpc_code=grpc.StatusCode.PERMISSION_DENIED)


def caller_from_certificate(cert: x509.Certificate, now: Optional[dt.datetime] = None) -> Caller:
    """The caller a certificate identifies; raises CallError (UNAUTHENTICATED) for one that is
    not valid now or names no facility and no role, or more than one facility."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if now < cert.not_valid_before_utc or now > cert.not_valid_after_utc:
        raise unauthenticated("the client certificate is not valid now (expired or not yet valid)")
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        subject = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    except ValueError:
        subject = "?"
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    facilities = sorted({u[len(FACILITY_URN):] for u in uris if u.startswith(FACILITY_URN)})
    roles = {u[len(ROLE_URN):] for u in uris if u.startswith(ROLE_URN)}
    if len(facilities) > 1:
        raise unauthenticated("the client certificate names more than one facility")
    facility = facilities[0] if facilities else ""
    if facility and (len(facility) > MAX_ID_LEN or not facility.isprintable()):
        raise unauthenticated("the client certificate's facility id is not a valid facility_id")
    admin = ADMIN_ROLE in roles
    if not facility and not admin:
        raise unauthenticated(f"the client certificate names no facility ({FACILITY_URN}<id>) and no role "
                              f"({ROLE_URN}{ADMIN_ROLE})")
    return Caller(facility, admin, prefix(subject, 64))


class Authenticator:
    """The caller of a gRPC call, from the peer certificate of its TLS connection.

    Certificates are parsed once and cached by their PEM (a connection's calls share it);
    validity dates are checked on every call against `clock`."""

    def __init__(self, tls: bool, *, clock: Callable[[], float] = time.time, cache_size: int = CACHE_MAX):
        self.tls = tls
        self.clock = clock
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()  # pem -> (Caller, not_before, not_after) as epoch seconds
        self._lock = threading.Lock()

    def caller(self, context) -> Caller:
        """The caller of `context` (a grpc(.aio) servicer context); raises CallError."""
        if not self.tls:
            return TRUSTED
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise unauthenticated("no client certificate was presented")
        return self.from_pem(pems[0])

    def from_pem(self, pem: bytes) -> Caller:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(pem)
            if hit is not None:
                self._cache.move_to_end(pem)
        if hit is not None:
            caller, nb, na = hit
            if not nb <= now <= na:
                raise unauthenticated("the client certificate is not valid now (expired or not yet valid)")
            return caller
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise unauthenticated("the client certificate cannot be read") from None
        caller = caller_from_certificate(cert, dt.datetime.fromtimestamp(now, dt.timezone.utc))
        with self._lock:
            self._cache[pem] = (caller, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return caller


class RecentPersons:
    """(facility, person) pairs a facility has lately pre-settled or settled: they may read the
    person's accumulators before (or without) a ledger row. Bounded, oldest forgotten first."""

    def __init__(self, ttl: float = RECENT_TTL_S, max_size: int = RECENT_MAX,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._seen: OrderedDict = OrderedDict()

    def add(self, facility_id: str, person_id: str) -> None:
        k = (facility_id, person_id)
        self._seen[k] = self.clock()
        self._seen.move_to_end(k)
        while len(self._seen) > self.max_size:
            self._seen.popitem(last=False)

    def __contains__(self, k: tuple) -> bool:
        t = self._seen.get(k)
        return t is not None and self.clock() - t <= self.ttl


class Authorizer:
    """The rules. Each check returns None (allowed) or the CallError to answer."""

    def __init__(self, recent: Optional[RecentPersons] = None):
        self.recent = recent if recent is not None else RecentPersons()

    @staticmethod
    def method_allowed(caller: Caller, method: str) -> Optional[CallError]:
        """What the role alone decides, before the request is read."""
        if caller.trusted:
            return None
        if method in ADMIN_METHODS and not caller.admin:
            return denied(f"{method} needs an administrator certificate")
        if method in FACILITY_METHODS and not caller.facility_id:
            return denied(f"{method} needs a facility's certificate; this administrator certificate names no "
                          "facility")
        return None

    def write(self, caller: Caller, method: str, facility_id: str, person_id: str = "",
              claim_id: str = "") -> Optional[CallError]:
        """Settle, PreSettle, Reverse: the request's facility_id must be the certificate's."""
        if caller.trusted:
            return None
        err = self.method_allowed(caller, method)
        if err is not None:
            return err
        if facility_id != caller.facility_id:
            return denied(f"facility_id {prefix(facility_id)!r} is not the facility of the client certificate "
                          f"({caller.facility_id}); a facility settles and reverses only as itself",
                          field="facility_id", claim_id=claim_id, person_id=person_id)
        return None

    def settling(self, caller: Caller, person_id: str) -> None:
        """A Settle or PreSettle of the person by the caller's facility was answered (its answer
        held the person's accumulators already): the facility may read them for a while."""
        if not caller.trusted and caller.facility_id:
            self.recent.add(caller.facility_id, person_id)

    @staticmethod
    def settlement_visible(caller: Caller, settled_by: Optional[str]) -> bool:
        """May the caller see a settlement recorded for `settled_by` (None: there is none)?
        When not, answer as if there were none."""
        return settled_by is not None and (caller.trusted or caller.admin or settled_by == caller.facility_id)

    def accumulators(self, caller: Caller, person_id: str,
                     has_settled: Callable[[str, str], bool]) -> Optional[CallError]:
        """GetAccumulators: `has_settled(facility_id, person_id)` asks the ledger."""
        if caller.trusted or caller.admin:
            return None
        if (caller.facility_id, person_id) in self.recent or has_settled(caller.facility_id, person_id):
            return None
        return denied(f"facility {caller.facility_id} has settled no claim of person {prefix(person_id)!r}; a "
                      "facility reads only the accumulators of persons it settles", field="person_id",
                      person_id=person_id)
