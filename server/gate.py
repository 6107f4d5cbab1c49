"""The gate in front of the servicers: every call is counted, admitted,
authenticated, read within limits and authorized before it reaches the
writer or a read, and every refusal is bounded.

Order per call (docs/SERVER.md, "Security"):

1. metrics and the call log start (server/metrics.py);
2. admission, for the calls that go to the writer (server/admission.py):
   OVERLOADED at once when the server is at capacity;
3. the caller from the client certificate (server/auth.py): UNAUTHENTICATED;
4. the request read from its bytes (server/limits.py): INVALID_REQUEST for a
   message that is not one, unknown fields dropped, INVALID_VALUE for a string
   over its limit;
5. authorization: PERMISSION_DENIED for a facility_id other than the
   certificate's or a role that may not call the method;
6. the servicer (server/service.py) or the writer; what comes back is
   filtered so a facility never learns of another facility's settlements
   (GetSettlement of one, and Reverse of one, answer CLAIM_NOT_FOUND exactly
   as for a claim_id never settled).

A refused call changes nothing: nothing reaches the writer before step 6.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import grpc

from ._proto import settlement_pb2 as pb
from .admission import Admission, HealthWatch, abort_overloaded
from .auth import Authenticator, Authorizer, Caller
from .batcher import PRESETTLE, REVERSE, SETTLE
from .errors import CallError, abort
from .facilities import facility_from_pb, facility_to_pb
from .limits import (MAX_RECORDS_PER_UPSERT, check_claim, check_id, check_person, check_reverse, clamp,
                     invalid_request, parse, prefix, too_many_records)
from .metrics import Metrics, note, status_of

E = pb.ErrorCode


def claim_not_found(claim_id: str) -> CallError:
    """The one answer for a claim_id the caller may not see, whether or not it exists."""
    return CallError(E.CLAIM_NOT_FOUND, f"no settlement with claim_id {prefix(claim_id)!r} by this facility; check "
                     "the id", field="claim_id", claim_id=prefix(claim_id))


class Gate:
    """Handlers for every method of medsettle.v1 over a `Service`.

    `has_settled(facility_id, person_id) -> bool` asks the ledger (blocking: run on the
    read threads); `facilities` is the facility registry's store access (`load()` and
    `upsert(list)`, blocking), or None when facility RPCs are not served."""

    def __init__(self, service, *, authenticator: Authenticator, authorizer: Optional[Authorizer] = None,
                 admission: Optional[Admission] = None, metrics: Optional[Metrics] = None,
                 health: Optional[HealthWatch] = None, has_settled: Callable[[str, str], bool] = lambda f, p: False,
                 facilities=None):
        self.service = service
        self.authn = authenticator
        self.authz = authorizer if authorizer is not None else Authorizer()
        self.admission = admission if admission is not None else Admission()
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = health
        self.has_settled = has_settled
        self.facilities = facilities

    # ------------------------------------------------------------------ the frame of every call

    def _unary(self, method: str, body, *, admit: bool = False):
        """A unary method's handler. With `admit` it is registered as stream-unary (`handlers`) and
        reads its one request only once admitted: grpc.aio reads a unary request before calling the
        handler, and that read (a batch and an event-loop round trip) made a refusal cost 1.6 times
        grpc.aio's own "Concurrent RPC limit exceeded!" (docs/SERVER.md "Overload"). Same bytes on
        the wire: clients see a unary method."""
        async def handler(data, context):
            begun = self.metrics.begin()
            status = [grpc.StatusCode.OK]
            t0 = time.perf_counter()
            admitted = False
            try:
                if admit:
                    err = self.admission.enter()
                    if err is not None:
                        await self._fail(context, err, status)
                    admitted = True
                try:
                    if admit:
                        data = await context.read()
                        if data is grpc.aio.EOF:
                            raise invalid_request("the call carried no request message")
                    caller = self.authn.caller(context)
                    note(caller=caller.label())
                    err = self.authz.method_allowed(caller, method)
                    if err is not None:
                        raise err
                    out = await body(caller, data, context)
                except CallError as e:
                    out = e
                if out.__class__ is bytes:
                    return out
                await self._fail(context, out, status)
            except BaseException as e:
                if status[0] is grpc.StatusCode.OK:  # not one of ours
                    status[0] = status_of(context, e)
                raise
            finally:
                if admitted:
                    self.admission.leave(time.perf_counter() - t0)
                self.metrics.end(method, begun, status[0])
        handler.__name__ = method
        return handler

    async def _fail(self, context, err: CallError, status: list):
        err = clamp(err)
        status[0] = err.grpc_code
        note(error=err.reason)
        if err.code == E.STORE_FAILURE and self.health is not None:
            await self.health.store_failed(err.message)
        if err.code == E.OVERLOADED:
            if not hasattr(err, "retry_ms"):
                err.retry_ms = self.admission.retry_after_ms()
            await abort_overloaded(context, err)
        await abort(context, err)

    async def _submit(self, kind: int, payload: bytes):
        fut = self.service.writer.submit(kind, payload)
        if fut.__class__ is CallError:
            return fut
        return await fut

    # ------------------------------------------------------------------ Settlement

    def _settle(self, kind: int, method: str):
        async def body(caller: Caller, data: bytes, context):
            req = parse(pb.SettleRequest, data)
            c = req.claim
            note(claim_id=prefix(c.claim_id, 128), facility_id=prefix(c.facility_id, 128))
            if self.metrics.detail:
                note(person_id=prefix(c.person_id, 128), disease_code=prefix(c.disease_code, 64),
                     total_amount=c.total_amount)
            err = check_claim(c) or self.authz.write(caller, method, c.facility_id, c.person_id, c.claim_id)
            if err is not None:
                return err
            out = await self._submit(kind, req.SerializeToString())
            if out.__class__ is bytes:
                note(outcome="settled" if kind == SETTLE else "presettled")
                self.authz.settling(caller, c.person_id)
            return out
        return body

    async def _reverse(self, caller: Caller, data: bytes, context):
        req = parse(pb.ReverseRequest, data)
        note(claim_id=prefix(req.claim_id, 128), facility_id=prefix(req.facility_id, 128))
        err = check_reverse(req) or self.authz.write(caller, "Reverse", req.facility_id, "", req.claim_id)
        if err is not None:
            return err
        out = await self._submit(REVERSE, req.SerializeToString())
        if out.__class__ is bytes:
            note(outcome="reversed")
        elif not caller.trusted and out.code in (E.FACILITY_MISMATCH, E.CLAIM_NOT_FOUND):
            return claim_not_found(req.claim_id)  # whether another facility's or none
        return out

    async def _get_settlement(self, caller: Caller, data: bytes, context):
        req = parse(pb.GetSettlementRequest, data)
        note(claim_id=prefix(req.claim_id, 128))
        err = check_id("claim_id", req.claim_id)
        if err is not None:
            return err
        out = await self.service._read(self.service._get_settlement, req.claim_id)
        if caller.trusted or caller.admin:
            return out
        if out.__class__ is bytes:
            if pb.SettlementRecord.FromString(out).claim.facility_id == caller.facility_id:
                return out
            return claim_not_found(req.claim_id)
        return claim_not_found(req.claim_id) if out.code == E.CLAIM_NOT_FOUND else out

    async def _get_accumulators(self, caller: Caller, data: bytes, context):
        req = parse(pb.GetAccumulatorsRequest, data)
        err = check_id("person_id", req.person_id)
        if err is not None:
            return err
        if req.person_id and not (caller.trusted or caller.admin):
            pid = req.person_id
            settled = (caller.facility_id, pid) in self.authz.recent or await self.service._read(
                self.has_settled, caller.facility_id, pid)  # the ledger query on a read thread
            err = self.authz.accumulators(caller, pid, lambda f, p: settled)
            if err is not None:
                return err
        return await self.service._read(self.service._get_accumulators, req.person_id, req.year)

    # ------------------------------------------------------------------ Registry

    async def _get_person(self, caller: Caller, data: bytes, context):
        req = parse(pb.GetPersonRequest, data)
        err = check_id("person_id", req.person_id)
        if err is not None:
            return err
        return await self.service._read(self.service._get_person, req.person_id)

    def _stream(self, method: str, body):
        """A client-streaming call's wrapper (metrics, caller, method check, status), so each
        upsert handler holds only its own reading of the stream."""
        async def handler(request_iterator, context):
            begun = self.metrics.begin()
            status = [grpc.StatusCode.OK]
            try:
                try:
                    caller = self.authn.caller(context)
                    note(caller=caller.label())
                    err = self.authz.method_allowed(caller, method)
                    if err is not None:
                        raise err
                except CallError as e:
                    await self._fail(context, e, status)
                return await body(request_iterator, context, status)
            except BaseException as e:
                if status[0] is grpc.StatusCode.OK:
                    status[0] = status_of(context, e)
                raise
            finally:
                self.metrics.end(method, begun, status[0])
        return handler

    async def _upsert_persons(self, request_iterator, context, status: list):
        async def checked():
            i = 0
            async for data in request_iterator:
                if i >= MAX_RECORDS_PER_UPSERT:
                    raise too_many_records("persons")
                p = parse(pb.Person, data)
                err = check_person(i, p)
                if err is not None:
                    raise err
                i += 1
                yield p

        return await self.service.UpsertPersons(checked(), context)

    async def _upsert_facilities(self, request_iterator, context, status: list):
        try:
            out = {}
            i = 0
            async for data in request_iterator:
                if i >= MAX_RECORDS_PER_UPSERT:
                    raise too_many_records("facilities")
                f = facility_from_pb(i, parse(pb.Facility, data))
                out[f.facility_id] = f
                i += 1
            await self.facilities.upsert(list(out.values()))
        except CallError as e:
            await self._fail(context, e, status)
        return pb.UpsertFacilitiesResponse(upserted=i).SerializeToString()

    async def _get_facility(self, caller: Caller, data: bytes, context):
        req = parse(pb.GetFacilityRequest, data)
        err = check_id("facility_id", req.facility_id)
        if err is not None:
            return err
        f = (await self.facilities.all()).get(req.facility_id)
        if f is None:
            return CallError(E.FACILITY_NOT_FOUND, f"facility {prefix(req.facility_id)!r} is not in the facility "
                             "registry", field="facility_id")
        return facility_to_pb(f).SerializeToString()

    # ------------------------------------------------------------------ registration

    def handlers(self) -> dict:
        """{service name: {method: RpcMethodHandler}}; every request arrives as bytes."""
        uu = grpc.unary_unary_rpc_method_handler
        su = grpc.stream_unary_rpc_method_handler
        settlement = {
            # admitted before their request is read (see _unary): stream-unary on the server side
            "Settle": su(self._unary("Settle", self._settle(SETTLE, "Settle"), admit=True)),
            "PreSettle": su(self._unary("PreSettle", self._settle(PRESETTLE, "PreSettle"), admit=True)),
            "Reverse": su(self._unary("Reverse", self._reverse, admit=True)),
            "GetSettlement": uu(self._unary("GetSettlement", self._get_settlement)),
            "GetAccumulators": uu(self._unary("GetAccumulators", self._get_accumulators)),
        }
        registry = {
            "UpsertPersons": su(self._stream("UpsertPersons", self._upsert_persons)),
            "GetPerson": uu(self._unary("GetPerson", self._get_person)),
        }
        if self.facilities is not None:
            registry["UpsertFacilities"] = su(self._stream("UpsertFacilities", self._upsert_facilities))
            registry["GetFacility"] = uu(self._unary("GetFacility", self._get_facility))
        return {pb.DESCRIPTOR.services_by_name["Settlement"].full_name: settlement,
                pb.DESCRIPTOR.services_by_name["Registry"].full_name: registry}

    def add_to_server(self, server) -> list:
        names = []
        for full, handlers in self.handlers().items():
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full, handlers),))
            if hasattr(server, "add_registered_method_handlers"):
                server.add_registered_method_handlers(full, handlers)
            names.append(full)
        return names
