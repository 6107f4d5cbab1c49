"""Every input bounded: the limits on what a caller may send, how requests are
parsed, and how much of a caller's value any answer echoes.

Why: whatever a caller sends may end up in the ledger (kept for years), in
every later answer that reads it, and in error messages and trailers. Issue
15 stored a 10 MB unknown field and a 10 MB reversal reason, after which every
read of that claim failed in a default client's 4 MB receive limit, and
copied oversized ids into trailers past gRPC's metadata limit. So:

* every string field has a length limit (in characters; UTF-8 takes at most 4
  bytes per character, so the byte size is bounded too), and so do the spells
  of a person and the records of one upload stream;
* a request is parsed here, not by gRPC: at most `MAX_REQUEST_BYTES`, a
  `DecodeError` (invalid UTF-8 in a string, a truncated field) is
  INVALID_ARGUMENT / INVALID_REQUEST with the parser's words, and unknown
  fields are dropped before anything is stored or forwarded;
* messages and trailers quote at most `ECHO_CHARS` characters of a caller's
  value (`prefix`), and `clamp` bounds any CallError before it is sent.

With these limits a `ReverseResponse` (the largest answer: the claim, the
settlement, the accumulators, the reason) stays far below a client's default
4 MB receive limit; tests/server/test_limits.py computes the worst case.
"""
from __future__ import annotations

from typing import Optional

from google.protobuf.message import DecodeError

from ._proto import settlement_pb2 as pb
from .errors import CallError

E = pb.ErrorCode

#: claim_id, person_id, facility_id.
MAX_ID_LEN = 128
#: disease_code (ICD-10 codes are at most 8 characters; room for local extensions).
MAX_CODE_LEN = 64
#: A pooling region or administrative division code (6 digits in GB/T 2260).
MAX_REGION_LEN = 32
#: An assistance identity's name (e.g. "extreme_poverty").
MAX_IDENTITY_LEN = 64
#: A facility's name.
MAX_NAME_LEN = 200
#: A reversal's reason, kept in the ledger and returned with the settlement record.
MAX_REASON_LEN = 500
#: Identity spells of one person.
MAX_SPELLS = 64
#: Records of one UpsertPersons / UpsertFacilities stream (all or nothing: split larger uploads).
MAX_RECORDS_PER_UPSERT = 100_000
#: One request message. The largest valid one (a claim with every string at its limit) is ~1.5 KB.
MAX_REQUEST_BYTES = 64 << 10
#: gRPC's own limit on a received message: beyond it gRPC answers RESOURCE_EXHAUSTED before the
#: service sees the call. Between MAX_REQUEST_BYTES and this, INVALID_REQUEST with the detail.
MAX_RECEIVE_BYTES = 1 << 20
#: Settle/PreSettle/Reverse calls admitted and unanswered beyond which admission answers
#: RESOURCE_EXHAUSTED / OVERLOADED with retry advice (server/admission.py). Above
#: MAX_CONCURRENT_RPCS, so it bounds the writes when that limit is turned off (--max-concurrent-rpcs 0).
MAX_IN_FLIGHT = 2000
#: Calls of any method in flight beyond which grpc.aio answers RESOURCE_EXHAUSTED "Concurrent RPC
#: limit exceeded!" before any handler of ours runs (grpc.aio.server's maximum_concurrent_rpcs;
#: grpcio 1.85.4 src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi, _handle_rpc). Its
#: answer has no retry advice, but it costs the event loop about 0.6 times admission's refusal
#: (measured), and every call the loop cannot take in time is one gRPC's core answers CANCELLED
#: (CORE_PENDING below): at 1.3-1.7 times saturation this limit left 0.1-3 % of the calls CANCELLED
#: where admission alone left 4-17 % (docs/SERVER.md "Overload"). From the measured saturation
#: (about 3,000-3,700 accepted Settle/s on this machine) and the 250 ms latency budget: 256 in
#: flight at 3,000/s is about 85 ms of queue.
MAX_CONCURRENT_RPCS = 256
#: Calls gRPC's core holds for the event loop (not yet seen by Python) beyond which it refuses a
#: growing share (at twice this, all); 0 keeps gRPC's 1000/3000. gRPC 1.85.4 answers those
#: refusals CANCELLED, not RESOURCE_EXHAUSTED (src/core/server/server.cc:687-691; see
#: docs/SERVER.md "Where CANCELLED comes from"): they only happen when the event loop cannot take
#: calls as fast as they arrive.
CORE_PENDING = 0
#: Characters of a caller's value quoted in any message.
ECHO_CHARS = 32
#: Characters of any error message sent (a guard behind the messages' own bounds): the message
#: travels twice (status and detail), at most 4 bytes a character, under gRPC's 8 KB metadata limit.
MAX_MESSAGE_CHARS = 512


def prefix(value, n: int = ECHO_CHARS) -> str:
    """At most `n` characters of a caller's value, marked when cut."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= n:
        return s
    return f"{s[:n]}...({len(s)} characters)"


def clamp(err: CallError) -> CallError:
    """The error with every caller-influenced part bounded (status message and trailer stay
    far below gRPC's 8 KB metadata limit whatever the message's author quoted)."""
    if len(err.message) > MAX_MESSAGE_CHARS:
        err.message = err.message[:MAX_MESSAGE_CHARS] + "..."
    if len(err.claim_id) > MAX_ID_LEN:
        err.claim_id = prefix(err.claim_id)
    if len(err.person_id) > MAX_ID_LEN:
        err.person_id = prefix(err.person_id)
    if len(err.field) > MAX_ID_LEN:
        err.field = prefix(err.field)
    return err


def invalid_request(what: str) -> CallError:
    return CallError(E.INVALID_REQUEST, what)


def parse(cls, data: bytes):
    """A request message from its bytes: bounded, decoded (a DecodeError is INVALID_REQUEST
    with the parser's words), unknown fields dropped. Raises CallError."""
    name = cls.DESCRIPTOR.full_name
    if len(data) > MAX_REQUEST_BYTES:
        raise invalid_request(f"the {name} is {len(data)} bytes, more than the {MAX_REQUEST_BYTES} any valid one "
                              "takes; send only the documented fields")
    try:
        msg = cls.FromString(data)
    except DecodeError as e:
        raise invalid_request(f"the request is not a valid {name} ({prefix(str(e), 120)}); strings must be valid "
                              "UTF-8") from None
    msg.DiscardUnknownFields()
    return msg


def _too_long(name: str, value: str, limit: int, **kw) -> CallError:
    return CallError(E.INVALID_VALUE, f"{name} {prefix(value)!r} is longer than {limit} characters", field=name, **kw)


def check_claim(c: pb.Claim) -> Optional[CallError]:
    """Length limits of a claim's strings (empty ones are the core's MISSING_FIELD)."""
    if len(c.claim_id) > MAX_ID_LEN:
        return _too_long("claim_id", c.claim_id, MAX_ID_LEN, claim_id=prefix(c.claim_id))
    kw = dict(claim_id=c.claim_id)
    if len(c.person_id) > MAX_ID_LEN:
        return _too_long("person_id", c.person_id, MAX_ID_LEN, person_id=prefix(c.person_id), **kw)
    kw["person_id"] = c.person_id
    if len(c.facility_id) > MAX_ID_LEN:
        return _too_long("facility_id", c.facility_id, MAX_ID_LEN, **kw)
    if len(c.disease_code) > MAX_CODE_LEN:
        return _too_long("disease_code", c.disease_code, MAX_CODE_LEN, **kw)
    return None


def check_reverse(r: pb.ReverseRequest) -> Optional[CallError]:
    if len(r.claim_id) > MAX_ID_LEN:
        return _too_long("claim_id", r.claim_id, MAX_ID_LEN, claim_id=prefix(r.claim_id))
    if len(r.facility_id) > MAX_ID_LEN:
        return _too_long("facility_id", r.facility_id, MAX_ID_LEN, claim_id=r.claim_id)
    if len(r.reason) > MAX_REASON_LEN:
        return CallError(E.INVALID_VALUE, f"reason is {len(r.reason)} characters; at most {MAX_REASON_LEN} are "
                         "kept (write the details elsewhere and refer to them)", field="reason", claim_id=r.claim_id)
    return None


def check_id(name: str, value: str) -> Optional[CallError]:
    """A lookup key (GetSettlement's claim_id, GetPerson's person_id, ...)."""
    if len(value) > MAX_ID_LEN:
        return _too_long(name, value, MAX_ID_LEN)
    return None


def check_person(i: int, p: pb.Person) -> Optional[CallError]:
    """Length limits of one registry record (index `i` of its stream), INVALID_PERSON."""
    def bad(what, field):
        return CallError(E.INVALID_PERSON, f"person #{i}: {what}; nothing of this upload was stored", field=field,
                         person_id=prefix(p.person_id))

    if len(p.person_id) > MAX_ID_LEN:
        return bad(f"person_id {prefix(p.person_id)!r} is longer than {MAX_ID_LEN} characters", "person_id")
    if len(p.region) > MAX_REGION_LEN:
        return bad(f"region {prefix(p.region)!r} is longer than {MAX_REGION_LEN} characters", "region")
    if len(p.identities) > MAX_SPELLS:
        return bad(f"{len(p.identities)} identity spells, more than {MAX_SPELLS}", "identities")
    for j, s in enumerate(p.identities):
        if len(s.identity) > MAX_IDENTITY_LEN:
            return bad(f"identities[{j}].identity {prefix(s.identity)!r} is longer than {MAX_IDENTITY_LEN} "
                       "characters", f"identities[{j}].identity")
    return None


def check_person_values(person_id: str, region: str, spells) -> Optional[tuple]:
    """The same limits for a record read from a file: (reason, field), or None."""
    if person_id and len(person_id) > MAX_ID_LEN:
        return f"person_id {prefix(person_id)!r} is longer than {MAX_ID_LEN} characters", "person_id"
    if region and len(region) > MAX_REGION_LEN:
        return f"region {prefix(region)!r} is longer than {MAX_REGION_LEN} characters", "region"
    spells = spells or ()
    if len(spells) > MAX_SPELLS:
        return f"{len(spells)} identity spells, more than {MAX_SPELLS}", "identities"
    for j, sp in enumerate(spells):
        if sp[0] and len(sp[0]) > MAX_IDENTITY_LEN:
            return (f"identities[{j}].identity {prefix(sp[0])!r} is longer than {MAX_IDENTITY_LEN} characters",
                    f"identities[{j}].identity")
    return None


def too_many_records(kind: str) -> CallError:
    code = E.INVALID_PERSON if kind == "persons" else E.INVALID_FACILITY
    return CallError(code, f"a stream holds at most {MAX_RECORDS_PER_UPSERT} {kind}; split the upload (each stream "
                     "is all or nothing); nothing of this upload was stored", field="")
