"""Error codes of a real-time call and how they travel as gRPC status.

Every failure of a call is a `CallError`: an `ErrorCode` (the spec section 7
codes plus the server's own), a message a person at the counter or the
integrator can act on, and the field / claim / person concerned. It goes back
as a gRPC status whose code is fixed by the error code (`GRPC_CODE`), whose
message is "CODE: message", and whose `grpc-status-details-bin` trailer holds a
`medsettle.v1.RpcStatus` (wire-compatible with google.rpc.Status) packing one
`medsettle.v1.ErrorDetail`.
"""
from __future__ import annotations

import grpc

from ._proto import settlement_pb2 as pb

DETAILS_KEY = "grpc-status-details-bin"

E = pb.ErrorCode

#: gRPC status per error code (docs/SERVER.md, "Errors").
GRPC_CODE = {
    E.MISSING_FIELD: grpc.StatusCode.INVALID_ARGUMENT,
    E.INVALID_VALUE: grpc.StatusCode.INVALID_ARGUMENT,
    E.INVALID_AMOUNT: grpc.StatusCode.INVALID_ARGUMENT,
    E.AMOUNT_OUT_OF_RANGE: grpc.StatusCode.INVALID_ARGUMENT,  # FAILED_PRECONDITION for the yearly limit
    E.AMOUNT_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    E.UNKNOWN_POLICY: grpc.StatusCode.FAILED_PRECONDITION,
    E.UNKNOWN_IDENTITY: grpc.StatusCode.FAILED_PRECONDITION,
    E.DUPLICATE_CLAIM: grpc.StatusCode.ALREADY_EXISTS,
    E.NO_BENEFIT_RULE: grpc.StatusCode.FAILED_PRECONDITION,
    E.PERSON_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    E.CLAIM_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    E.CLAIM_REVERSED: grpc.StatusCode.FAILED_PRECONDITION,
    E.FACILITY_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    E.INVALID_PERSON: grpc.StatusCode.INVALID_ARGUMENT,
    E.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E.STORE_FAILURE: grpc.StatusCode.UNAVAILABLE,
    E.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
    E.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    E.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    E.FACILITY_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    E.INVALID_FACILITY: grpc.StatusCode.INVALID_ARGUMENT,
    E.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
}

#: What to do about each engine status, appended to the message.
ADVICE = {
    "MISSING_FIELD": "fill it in and send the claim again",
    "INVALID_VALUE": "use one of the enum values of medsettle.v1",
    "INVALID_AMOUNT": "amounts are fen and never negative",
    "AMOUNT_OUT_OF_RANGE": "each amount must be at most 10^12 fen (10 billion yuan)",
    "AMOUNT_MISMATCH": ("total_amount must equal self_funded + over_limit + class_b_copay + in_scope, "
                        "and in_scope_class_b must not exceed in_scope"),
    "UNKNOWN_POLICY": "no policy is loaded for the person's region and scheme in that year; "
                      "check the registry record and settle_time, or load the year's policy",
    "UNKNOWN_IDENTITY": "the registry gives the person an assistance identity that the policy does not "
                        "declare; correct the registry record",
    "NO_BENEFIT_RULE": "the policy has no basic-layer rule for this kind of visit; check visit_type, "
                       "facility_level and locality",
}


class CallError(Exception):
    """A failed call: error code, message, and what it concerns."""

    __slots__ = ("code", "message", "field", "claim_id", "person_id", "grpc_code")

    def __init__(self, code: int, message: str, *, field: str = "", claim_id: str = "", person_id: str = "",
                 grpc_code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.claim_id = claim_id
        self.person_id = person_id
        self.grpc_code = grpc_code or GRPC_CODE[code]

    @property
    def reason(self) -> str:
        return E.Name(self.code)

    def detail(self) -> pb.ErrorDetail:
        return pb.ErrorDetail(code=self.code, reason=self.reason, message=self.message,
                              claim_id=self.claim_id, person_id=self.person_id, field=self.field)

    def status_message(self) -> str:
        return f"{self.reason}: {self.message}"

    def trailer(self) -> bytes:
        st = pb.RpcStatus(code=self.grpc_code.value[0], message=self.status_message())
        st.details.add().Pack(self.detail())
        return st.SerializeToString()

    def __repr__(self) -> str:
        return f"CallError({self.reason}, {self.message!r})"


async def abort(context, err: CallError):
    """Ends an aio call with `err` (raises, like context.abort)."""
    await context.abort(err.grpc_code, err.status_message(), trailing_metadata=((DETAILS_KEY, err.trailer()),))


def error_from_rpc(exc: grpc.RpcError) -> pb.ErrorDetail | None:
    """The ErrorDetail of a failed call as a client sees it (None if there is none)."""
    md = exc.trailing_metadata() or ()
    for key, value in md:
        if key == DETAILS_KEY:
            st = pb.RpcStatus.FromString(value)
            for any_ in st.details:
                d = pb.ErrorDetail()
                if any_.Unpack(d):
                    return d
    return None
