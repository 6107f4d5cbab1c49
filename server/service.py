"""The gRPC servicers (grpc.aio): Settlement and Registry of medsettle.v1.

State-changing calls go through the writer (server/writer.py: a process of
its own by default, or a thread), which takes the request bytes as received:
Settle, PreSettle, Reverse and UpsertPersons. Reads (GetSettlement,
GetAccumulators, GetPerson) run on a small thread pool against the store's
last committed state. Handlers return serialized bytes (the writer serializes
once, for the ledger and the wire).
"""
from __future__ import annotations

import asyncio
import concurrent.futures

import grpc

from ._proto import settlement_pb2 as pb
from .batcher import PRESETTLE, REVERSE, SETTLE, UPSERT, record_pb
from .core import Core
from .errors import CallError, abort
from .registry import person_from_pb, person_from_row, person_to_pb, person_to_row
from .store import Store, StoreUnavailable
from .writer import Writer, encode_upsert

E = pb.ErrorCode
UPSERT_CHUNK = 2000


class Service:
    """Both services' handlers over one store, core and writer."""

    def __init__(self, store: Store, core: Core, writer: Writer, *, read_threads: int = 2):
        self.store = store
        self.core = core
        self.writer = writer
        self.reads = concurrent.futures.ThreadPoolExecutor(max_workers=read_threads,
                                                           thread_name_prefix="medsettle-read")

    def close(self) -> None:
        self.reads.shutdown(wait=True)

    async def _read(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.reads, fn, *args)
        except StoreUnavailable as e:  # the database cannot be reached now
            return CallError(E.STORE_FAILURE, f"the store cannot be read now ({e}); retry")

    # ------------------------------------------------------------------ Settlement

    async def _write(self, kind: int, request: bytes, context) -> bytes:
        fut = self.writer.submit(kind, request)
        if fut.__class__ is not CallError:
            out = await fut
            if out.__class__ is bytes:
                return out
            fut = out
        await abort(context, fut)

    async def Settle(self, request, context) -> bytes:
        return await self._write(SETTLE, request, context)

    async def PreSettle(self, request, context) -> bytes:
        # through the writer too: ordered with the person's settlements, engine calls shared with a group
        return await self._write(PRESETTLE, request, context)

    async def Reverse(self, request, context) -> bytes:
        return await self._write(REVERSE, request, context)

    async def GetSettlement(self, request: pb.GetSettlementRequest, context) -> bytes:
        out = await self._read(self._get_settlement, request.claim_id)
        if out.__class__ is bytes:
            return out
        await abort(context, out)

    def _get_settlement(self, claim_id: str):
        if not claim_id:
            return CallError(E.MISSING_FIELD, "claim_id is empty", field="claim_id")
        rows = self.store.ledger([claim_id]).get(claim_id) or {}
        if "settle" not in rows:
            return CallError(E.CLAIM_NOT_FOUND, f"no settlement with claim_id {claim_id}", field="claim_id",
                             claim_id=claim_id)
        return record_pb(rows["settle"], rows.get("reverse")).SerializeToString()

    async def GetAccumulators(self, request: pb.GetAccumulatorsRequest, context) -> bytes:
        out = await self._read(self._get_accumulators, request.person_id, request.year)
        if out.__class__ is bytes:
            return out
        await abort(context, out)

    def _get_accumulators(self, person_id: str, year: int):
        if not person_id:
            return CallError(E.MISSING_FIELD, "person_id is empty", field="person_id")
        rows = self.store.accumulators_of(person_id, year or None)
        if not rows and not self.store.persons([person_id]):
            return CallError(E.PERSON_NOT_FOUND, f"person {person_id} is not in the registry", field="person_id",
                             person_id=person_id)
        out = pb.GetAccumulatorsResponse()
        for blob in rows:
            out.accumulators.append(pb.Accumulators.FromString(blob))
        return out.SerializeToString()

    # ------------------------------------------------------------------ Registry

    async def UpsertPersons(self, request_iterator, context) -> bytes:
        persons = {}
        i = 0
        try:
            async for p in request_iterator:
                person = person_from_pb(i, p)
                persons[person.person_id] = person  # a later record of the same person wins
                i += 1
        except CallError as e:
            await abort(context, e)
        rows = [person_to_row(p) for p in persons.values()]
        futs = []
        for k in range(0, len(rows), UPSERT_CHUNK):
            fut = self.writer.submit(UPSERT, encode_upsert(rows[k:k + UPSERT_CHUNK]))
            if fut.__class__ is CallError:
                await abort(context, fut)
            futs.append(fut)
        total = 0
        for fut in futs:
            out = await fut
            if isinstance(out, CallError):
                await abort(context, out)
            total += out
        return pb.UpsertPersonsResponse(upserted=i).SerializeToString()

    async def GetPerson(self, request: pb.GetPersonRequest, context) -> bytes:
        out = await self._read(self._get_person, request.person_id)
        if out.__class__ is bytes:
            return out
        await abort(context, out)

    def _get_person(self, person_id: str):
        if not person_id:
            return CallError(E.MISSING_FIELD, "person_id is empty", field="person_id")
        row = self.store.persons([person_id]).get(person_id)
        if row is None:
            return CallError(E.PERSON_NOT_FOUND, f"person {person_id} is not in the registry", field="person_id",
                             person_id=person_id)
        return person_to_pb(person_from_row(row)).SerializeToString()

    # ------------------------------------------------------------------ registration

    def add_to_server(self, server) -> list:
        """Registers both services on an aio server; returns their full names."""
        uu = grpc.unary_unary_rpc_method_handler
        settlement = {  # the writer reads the request bytes of these itself
            "Settle": uu(self.Settle),
            "PreSettle": uu(self.PreSettle),
            "Reverse": uu(self.Reverse),
            "GetSettlement": uu(self.GetSettlement, request_deserializer=pb.GetSettlementRequest.FromString),
            "GetAccumulators": uu(self.GetAccumulators, request_deserializer=pb.GetAccumulatorsRequest.FromString),
        }
        registry = {
            "UpsertPersons": grpc.stream_unary_rpc_method_handler(self.UpsertPersons,
                                                                  request_deserializer=pb.Person.FromString),
            "GetPerson": uu(self.GetPerson, request_deserializer=pb.GetPersonRequest.FromString),
        }
        names = []
        for svc, handlers in (("Settlement", settlement), ("Registry", registry)):
            full = pb.DESCRIPTOR.services_by_name[svc].full_name
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full, handlers),))
            if hasattr(server, "add_registered_method_handlers"):
                server.add_registered_method_handlers(full, handlers)
            names.append(full)
        return names
