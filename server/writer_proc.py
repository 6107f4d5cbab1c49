"""The writer in its own process (the server's default).

The gRPC front-end (event loop, handlers, queries) and the writer (engine,
SQLite commits) each hold a GIL of their own, so on a 2-core machine the
engine's per-group work and the per-call gRPC work run side by side instead
of taking turns. They talk over a Unix socket pair with length-prefixed
frames; the front-end passes request bytes through as received (it does not
even parse them) and returns the writer's response bytes as they are.

    to the writer:  <u32 length><u8 kind><u64 id> payload
                    kind SETTLE / PRESETTLE: SettleRequest bytes; REVERSE: ReverseRequest
                    bytes; UPSERT: JSON list of registry rows; CLOSE: settle what is
                    queued, then exit
    to the front:   <u32 length><u8 status><u64 id> payload
                    status OK: response bytes; ERROR: <u8 grpc code> ErrorDetail bytes;
                    COUNT: <u64>; READY (id 0): the writer is up; FAILED (id 0): it
                    could not start (payload: the reason); GROUP (id 0): a group's
                    size and commit time (metrics)

The writer reads every frame available, settles them as one group (the same
`GroupWriter` as the in-process transport), commits, and writes all answers in
one send. It dies with the front-end (PR_SET_PDEATHSIG), and the front-end
fails every waiting call with UNAVAILABLE and stops if the writer dies.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import os
import select
import signal
import socket
import struct
import time
from collections import deque
from typing import Optional

import grpc

import engine

from ._proto import settlement_pb2 as pb
from .batcher import GroupWriter
from .core import Core
from .errors import CallError
from .runtime import profiled, tune_gc
from .store import open_store
from .writer import decode, run_group_loop

log = logging.getLogger("medsettle.server")
E = pb.ErrorCode

HEADER = struct.Struct("<IBQ")
HLEN = HEADER.size
CLOSE = 9  # besides the request kinds of server/batcher.py (SETTLE 1, REVERSE 2, UPSERT 3, PRESETTLE 4)
OK, ERROR, COUNT, READY, FAILED = 0, 1, 2, 3, 4
#: (id 0) <u32 size><f64 commit seconds> of a committed group, for the metrics (server/metrics.py)
GROUP = 5
GROUP_STATS = struct.Struct("<Id")
GRPC_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _frame(kind: int, ident: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind, ident) + payload


def _encode_answer(ident: int, value) -> bytes:
    if value.__class__ is bytes:
        return HEADER.pack(len(value), OK, ident) + value
    if isinstance(value, int):
        return _frame(COUNT, ident, struct.pack("<Q", value))
    err: CallError = value
    return _frame(ERROR, ident, bytes([err.grpc_code.value[0]]) + err.detail().SerializeToString())


def _decode_error(payload: bytes) -> CallError:
    d = pb.ErrorDetail.FromString(payload[1:])
    return CallError(d.code, d.message, field=d.field, claim_id=d.claim_id, person_id=d.person_id,
                     grpc_code=GRPC_BY_VALUE.get(payload[0], grpc.StatusCode.INTERNAL))


def _parse_frames(buf: bytearray) -> tuple[list, int]:
    """Complete frames at the start of `buf`: [(kind, id, payload)], bytes used."""
    out = []
    pos = 0
    n = len(buf)
    while n - pos >= HLEN:
        length, kind, ident = HEADER.unpack_from(buf, pos)
        end = pos + HLEN + length
        if end > n:
            break
        out.append((kind, ident, bytes(buf[pos + HLEN:end])))
        pos = end
    return out, pos


# --------------------------------------------------------------------------- the writer process


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 (not Linux: the EOF on the socket still stops us)
        pass


class SocketInbox:
    """The writer process's inbox: request frames from the front-end's socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.items: deque = deque()
        self.closed = False  # CLOSE frame or EOF

    def _read(self, timeout: Optional[float]) -> None:
        """Reads what is there, waiting up to `timeout` (None: until something comes)."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.buf.extend(data)
        frames, used = _parse_frames(self.buf)
        del self.buf[:used]
        for kind, ident, payload in frames:
            if kind == CLOSE:
                self.closed = True
            else:
                self.items.append(decode(kind, payload, ident))

    def get(self, timeout: Optional[float], limit: int) -> list:
        if timeout is None:
            while not self.items and not self.closed:
                self._read(None)
        elif not self.closed:
            end = time.monotonic() + timeout
            self._read(0)
            while len(self.items) < limit and not self.closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._read(left)
        q = self.items
        return [q.popleft() for _ in range(min(len(q), limit))]


def writer_main(sock: socket.socket, store_target: str, policies, options: dict, parent_pid: int) -> None:
    """Entry point of the writer process."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.get("log_level", logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[writer]: %(message)s")
    if os.getppid() != parent_pid:
        return
    try:
        if isinstance(policies, (str, os.PathLike)) or policies is None:
            policies = engine.load_policies(policies)
        store = open_store(store_target, **options.get("store_options", {}))
        store.start_background()
        core = Core(policies, verify=options.get("verify", False))
        gw = GroupWriter(store, core, person_cache=options.get("person_cache", 200_000))
    except Exception as e:  # noqa: BLE001
        sock.sendall(_frame(FAILED, 0, f"{type(e).__name__}: {e}".encode()))
        return
    tune_gc()
    sock.sendall(_frame(READY, 0, b""))

    groups: list = []
    gw.on_group = lambda size, seconds: groups.append(_frame(GROUP, 0, GROUP_STATS.pack(size, seconds)))

    def deliver(answers: list) -> None:
        try:
            sock.sendall(b"".join([*groups, *(_encode_answer(it.ref, v) for it, v in answers)]))
            groups.clear()
        except OSError:  # the front-end is gone: nothing to answer to
            inbox.closed = True

    inbox = SocketInbox(sock)
    with profiled("writer"):
        run_group_loop(gw, inbox, deliver, max_batch=options.get("max_batch", 1024),
                       min_interval=options.get("min_interval", 0.0))
    s = gw.stats
    log.info("writer stopped: %d settled, %d reversed in %d groups (largest %d), %d slow commits", s["settled"],
             s["reversed"], s["groups"], s["max_group"], s["slow_commits"])
    store.close()
    try:
        sock.close()
    except OSError:
        pass


# --------------------------------------------------------------------------- the front-end side


class WriterProcess:
    """The front-end's handle on the writer process: submit request bytes, await answers."""

    def __init__(self, store_target: str, policies, *, max_batch: int = 1024, max_pending: int = 20_000,
                 min_interval: float = 0.0, verify: bool = False, log_level: int = logging.INFO,
                 person_cache: int = 200_000, store_options: Optional[dict] = None, on_death=None):
        self.store_target = store_target
        self.policies = policies
        self.options = {"max_batch": max_batch, "min_interval": min_interval, "verify": verify,
                        "log_level": log_level, "person_cache": person_cache,
                        "store_options": store_options or {}}
        self.max_pending = max_pending
        self.on_death = on_death
        self.on_group = None  # (size, commit seconds) of each committed group: metrics
        self.stats = {}
        self._pending: dict = {}
        self._next = 1
        self._accepting = False
        self._proc = None
        self._writer = None
        self._reader_task = None
        self._closing = False
        self._out: list = []
        self._flush_scheduled = False

    async def start(self, timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._proc = ctx.Process(target=writer_main, name="medsettle-writer", daemon=True,
                                 args=(child, self.store_target, self.policies, self.options, os.getpid()))
        self._proc.start()
        child.close()
        parent.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=parent, limit=1 << 22)
        self._writer = writer
        try:
            head = await asyncio.wait_for(reader.readexactly(HLEN), timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            self._proc.kill()
            raise RuntimeError("the writer process did not start") from None
        length, status, _ = HEADER.unpack(head)
        payload = await reader.readexactly(length)
        if status != READY:
            self._proc.join(5)
            raise RuntimeError(f"the writer process could not start: {payload.decode(errors='replace')}")
        self._accepting = True
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def submit(self, kind: int, payload: bytes):
        """A future of the answer (bytes, int or CallError), or a CallError at once."""
        if not self._accepting:
            return CallError(E.SHUTTING_DOWN, "the server is shutting down; retry on another instance or later")
        if len(self._pending) >= self.max_pending:
            return CallError(E.OVERLOADED, f"{len(self._pending)} settlements are waiting; retry with backoff")
        ident = self._next
        self._next += 1
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[ident] = fut
        # frames of one event-loop turn leave in one write
        self._out.append(HEADER.pack(len(payload), kind, ident))
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            try:
                self._writer.write(data)
            except (ConnectionError, OSError, RuntimeError):
                pass

    async def _read(self, reader: asyncio.StreamReader) -> None:
        pending = self._pending
        buf = bytearray()
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                buf.extend(data)
                frames, used = _parse_frames(buf)
                del buf[:used]
                for status, ident, payload in frames:
                    if status == GROUP:
                        if self.on_group is not None:
                            self.on_group(*GROUP_STATS.unpack(payload))
                        continue
                    fut = pending.pop(ident, None)
                    if fut is None or fut.done():
                        continue
                    if status == OK:
                        fut.set_result(payload)
                    elif status == ERROR:
                        fut.set_result(_decode_error(payload))
                    elif status == COUNT:
                        fut.set_result(struct.unpack("<Q", payload)[0])
        except (ConnectionError, OSError):
            pass
        # the writer is gone
        self._accepting = False
        err = CallError(E.STORE_FAILURE, "the settlement writer stopped; the outcome of this call is unknown: "
                        "retry it (a settled claim is then answered from the ledger)",
                        grpc_code=grpc.StatusCode.UNAVAILABLE)
        for fut in pending.values():
            if not fut.done():
                fut.set_result(err)
        pending.clear()
        if not self._closing:
            log.error("the writer process died (exit code %s)", self._proc.exitcode if self._proc else "?")
            if self.on_death is not None:
                self.on_death()

    async def close(self, timeout: float = 60.0) -> None:
        """Lets the writer settle what it holds, then waits for it to exit."""
        self._accepting = False
        self._closing = True
        if self._writer is not None:
            self._flush()
            try:
                self._writer.write(_frame(CLOSE, 0, b""))
                await self._writer.drain()
            except (ConnectionError, OSError):
                pass
        if self._reader_task is not None:
            try:
                await asyncio.wait_for(self._reader_task, timeout)
            except asyncio.TimeoutError:
                pass
        if self._proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, timeout)
            if self._proc.is_alive():
                self._proc.kill()
        if self._writer is not None:
            self._writer.close()
