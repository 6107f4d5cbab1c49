"""`medsettle serve`: the real-time settlement server.

    medsettle serve --policies DIR --store PATH|URL --port N [--registry persons.parquet]
    python -m server --policies DIR --store PATH|URL --port N ...     (the same, without the CLI)

`add_arguments(parser)` and `serve_main(args)` are what `medsettle serve` runs
(registered by server/commands.py). The store is an SQLite file (one
instance) or a postgresql:// URL (several instances on one database). The server listens on loopback (127.0.0.1) unless TLS is
configured (--tls-cert/--tls-key) or --insecure-listen-all is given; it serves
medsettle.v1.Settlement and medsettle.v1.Registry, grpc.health.v1.Health and
server reflection. SIGTERM (or SIGINT) marks it NOT_SERVING, stops taking
calls, lets in-flight ones finish within --drain-seconds, commits what the
writer holds, checkpoints the store and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import errno
import hashlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import engine

from . import facilities as fac
from .admission import Admission, HealthWatch, probe_directory
from .auth import Authenticator, Authorizer
from .core import Core
from .errors import CallError
from .gate import Gate
from .limits import CORE_PENDING, MAX_CONCURRENT_RPCS, MAX_IN_FLIGHT, MAX_RECEIVE_BYTES
from .metrics import Metrics
from .registry import person_to_row, read_persons_parquet
from .runtime import tune_gc
from .service import Service
from .store import Store, StoreError, StoreUnavailable, is_url, open_store
from .writer import ThreadWriter
from .writer_proc import WriterProcess

log = logging.getLogger("medsettle.server")

#: Exit codes (as every medsettle command): 0 ok, 1 failure, 2 usage error.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("settlement")
    g.add_argument("--policies", metavar="DIR", default=None,
                   help="folder of policy YAML files (default: the bundled seed policies)")
    g.add_argument("--store", metavar="PATH|URL", required=True,
                   help="SQLite store file (created if missing), or a postgresql:// URL: ledger, accumulators, "
                        "registry")
    g.add_argument("--registry", metavar="PERSONS_PARQUET", default=None,
                   help="import (upsert) this persons.parquet into the registry before serving; skipped when "
                        "the same file was imported before")
    n = parser.add_argument_group("network")
    n.add_argument("--port", type=int, default=50051, help="TCP port (0 = any free port; default 50051)")
    n.add_argument("--insecure-listen-all", action="store_true",
                   help="listen on every interface without client certificates: every caller is trusted (default: "
                        "without TLS loopback only, with TLS --tls-client-ca required)")
    n.add_argument("--tls-cert", metavar="PEM", help="server certificate chain; with --tls-key enables TLS and "
                                                     "listening on every interface")
    n.add_argument("--tls-key", metavar="PEM", help="server private key")
    n.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    n.add_argument("--port-file", metavar="PATH", help="write the bound port to this file once serving")
    s = parser.add_argument_group("security and operations (docs/SERVER.md)")
    s.add_argument("--facilities", metavar="FACILITIES_PARQUET", default=None,
                   help="load (upsert) this facilities.parquet into the facility registry before serving; all or "
                        "nothing")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this HTTP port (0 = any free port); no TLS: bind it inside")
    s.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics port (default 127.0.0.1; an internal interface for a remote "
                        "Prometheus)")
    s.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                   help="Settle/PreSettle/Reverse calls in flight beyond which calls get RESOURCE_EXHAUSTED with "
                        f"retry advice at once (default {MAX_IN_FLIGHT})")
    s.add_argument("--max-concurrent-rpcs", type=int, default=MAX_CONCURRENT_RPCS,
                   help="calls of any method in flight beyond which grpc.aio answers RESOURCE_EXHAUSTED without "
                        f"retry advice before our handlers run (0 = no limit; default {MAX_CONCURRENT_RPCS})")
    s.add_argument("--core-pending", type=int, default=CORE_PENDING,
                   help="calls waiting in gRPC's core for the event loop beyond which it refuses some (twice this: "
                        "all); gRPC 1.85 answers those CANCELLED (docs/SERVER.md \"Overload\"; 0 = gRPC's "
                        f"defaults 1000/3000; default {CORE_PENDING})")
    s.add_argument("--latency-budget-ms", type=float, default=250.0,
                   help="refuse new Settle/PreSettle/Reverse calls while the recent mean latency is above this "
                        "(default 250)")
    s.add_argument("--log-call-detail", action="store_true",
                   help="add person_id, disease_code and total_amount to the per-call JSON log lines")
    t = parser.add_argument_group("tuning")
    t.add_argument("--drain-seconds", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight calls may take to finish (default 10)")
    t.add_argument("--max-batch", type=int, default=1024, help="most calls committed in one group (default 1024)")
    t.add_argument("--max-pending", type=int, default=20_000,
                   help="queued calls beyond which Settle answers RESOURCE_EXHAUSTED (default 20000)")
    t.add_argument("--group-interval-ms", type=float, default=2.0,
                   help="start a group at most once per this many ms unless --max-batch calls are waiting "
                        "(default 2; 0: settle what is queued as soon as the writer is free)")
    t.add_argument("--pool-size", type=int, default=4,
                   help="PostgreSQL store: connections for the queries (default 4; the writer has its own)")
    t.add_argument("--writer", choices=("process", "thread"), default="process",
                   help="run the writer (engine + commits) in its own process (default) or as a thread of the "
                        "server process")
    t.add_argument("--read-threads", type=int, default=2, help="threads for PreSettle and queries (default 2)")
    t.add_argument("--verify", action="store_true",
                   help="check after every engine call that the fold of the deltas equals the engine's closing "
                        "accumulators (slower; for testing)")
    t.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_registry(store: Store, path: str) -> int:
    """Upserts every person of a persons.parquet in one transaction (all or nothing);
    returns how many, or -1 when the same file was imported before."""
    fp = file_fingerprint(path)
    if store.get_meta("registry_import_sha256") == fp:
        return -1
    parts = ([person_to_row(p) for p in chunk] for chunk in read_persons_parquet(path))
    return store.import_persons(parts, {"registry_import_sha256": fp})


class Server:
    """One server: store, writer, gRPC services (settlement, registry, health, reflection).

    `await start()` binds and serves (returns the port); `await stop(grace)`
    drains: NOT_SERVING, no new calls, in-flight calls get `grace` seconds,
    then the writer commits what it holds and the store is closed."""

    def __init__(self, policies, store_target: str, *, port: int = 0, host: str = "127.0.0.1", credentials=None,
                 max_batch: int = 1024, max_pending: int = 20_000, min_interval: float = 0.0,
                 read_threads: int = 2, verify: bool = False, store=None, writer: str = "process",
                 policies_source=None, pool_size: int = 4, client_auth: bool = False,
                 facilities_file=None, metrics_port=None, metrics_host: str = "127.0.0.1",
                 max_in_flight: int = MAX_IN_FLIGHT, latency_budget_ms: float = 250.0, log_call_detail: bool = False,
                 max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS, core_pending: int = CORE_PENDING):
        if writer not in ("process", "thread"):
            raise ValueError(f"writer must be 'process' or 'thread', not {writer!r}")
        self.ps = policies
        self.store = store if store is not None else open_store(store_target, exclusive=True)
        shared = is_url(store_target)  # other instances may write the registry: no person cache
        self.core = Core(policies, verify=verify)
        self.died = asyncio.Event()
        cache = 0 if shared else 200_000
        if writer == "process":
            # the writer process loads the policies itself from their folder when there is one
            self.writer = WriterProcess(store_target, policies_source if policies_source is not None else policies,
                                        max_batch=max_batch, max_pending=max_pending, min_interval=min_interval,
                                        verify=verify, log_level=logging.getLogger().level or logging.INFO,
                                        person_cache=cache, store_options={} if not shared else {"pool_size": 1},
                                        on_death=self.died.set)
        else:
            self.writer = ThreadWriter(self.store, self.core, max_batch=max_batch, max_pending=max_pending,
                                       min_interval=min_interval, person_cache=cache, on_death=self.died.set)
        self.host, self.port = host, port
        self.credentials = credentials
        self.client_auth = client_auth  # mutual TLS: callers identified by their certificates
        self.facilities_file = facilities_file
        self.metrics = Metrics(detail=log_call_detail)
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.admission = Admission(max_in_flight, latency_budget_ms / 1000.0)
        self.max_concurrent_rpcs = max_concurrent_rpcs or None
        self.core_pending = core_pending
        self.watch = None
        self.gate = None
        self.read_threads = read_threads
        self.server = None
        self.health = None
        self.service = None

    async def start(self) -> int:
        await self.writer.start()
        m = self.metrics
        if isinstance(self.writer, ThreadWriter):
            self.writer.writer.on_group = m.observe_group
            m.queue_depth.set_function(lambda: len(self.writer._inbox))
        else:
            self.writer.on_group = m.observe_group
            m.queue_depth.set_function(lambda: len(self.writer._pending))
        if self.facilities_file:
            n = await self.load_facilities(fac.read_facilities_parquet(self.facilities_file))
            log.info("facilities %s: %d loaded", self.facilities_file, n)
        self.server = server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            # the largest valid request is a few KB (server/limits.py); 1 MB bounds what calls in flight hold
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # calls gRPC's core holds until the event loop takes them: beyond the soft limit it refuses
            # a growing share at random, beyond the hard one all (RESOURCE_EXHAUSTED, before Python)
            *([("grpc.server.max_pending_requests", self.core_pending),
               ("grpc.server.max_pending_requests_hard_limit", 2 * self.core_pending)] if self.core_pending else []),
        ], maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        self.service = Service(self.store, self.core, self.writer, read_threads=self.read_threads)
        self.health = health.aio.HealthServicer()
        self.watch = HealthWatch(self._set_serving, lambda: self._probe())
        self.gate = Gate(self.service, authenticator=Authenticator(self.client_auth), authorizer=Authorizer(),
                         admission=self.admission, metrics=self.metrics, health=self.watch,
                         has_settled=self.store.settled_by, facilities=self)
        names = self.gate.add_to_server(server)
        self._names = names
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        addr = f"{self.host}:{self.port}"
        try:
            port = (server.add_secure_port(addr, self.credentials) if self.credentials
                    else server.add_insecure_port(addr))
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {addr}")
        self.port = port
        await server.start()
        for name in ("", *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port is not None:
            mport = m.start_http(self.metrics_port, self.metrics_host)
            log.info("metrics on http://%s:%d/metrics", self.metrics_host, mport)
        if not self.client_auth:
            log.warning("%s: every caller is trusted (it may settle as any facility and change the registry)",
                        "no TLS" if self.credentials is None else "TLS without client certificates")
        if not len(await self.all()):
            log.warning("the facility registry is empty: facility level and locality come from the caller "
                        "(load it with --facilities or Registry.UpsertFacilities)")
        return port

    # ---- health: NOT_SERVING while the store cannot commit (server/admission.py)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.metrics.serving.set(1 if serving else 0)
        if self.server is not None:
            for name in ("", *self._names):
                await self.health.set(name, status)

    def _probe(self) -> None:
        if is_url(self.store.location):
            self.store.max_seq()  # PostgreSQL: reachable (its own server watches its disk)
        else:
            probe_directory(self.store.location)

    # ---- the facility registry, for the gate (uploads go through the writer, in order)

    async def load_facilities(self, facilities: list) -> int:
        from .batcher import FACILITIES

        out = self.writer.submit(FACILITIES, fac.encode(facilities))
        if not isinstance(out, CallError):
            out = await out
        if isinstance(out, CallError):
            raise out
        return out

    async def upsert(self, facilities: list) -> None:
        await self.load_facilities(facilities)

    async def all(self) -> dict:
        return await self.service._read(fac.stored, self.store)

    async def stop(self, grace: float = 10.0) -> None:
        if self.watch is not None:
            await self.watch.close()
        self.metrics.stop_http()
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
            self.server = None
        await self.writer.close()
        if self.service is not None:
            self.service.close()
        self.store.close()


class UsageError(Exception):
    """A command line that cannot work as given (exit 2)."""


def _listen(args) -> tuple[str, object]:
    """(host, credentials or None) from the network options."""
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together (give both, or neither)")
        try:
            ca = Path(args.tls_client_ca).read_bytes() if args.tls_client_ca else None
            key, cert = Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes()
        except OSError as e:
            raise UsageError(f"TLS file {e.filename}: {e.strerror}") from None
        if ca is None and not args.insecure_listen_all:  # issue 15: anyone on the network would be trusted
            raise UsageError("--tls-cert without --tls-client-ca lets every caller on the network settle as any "
                             "facility and change the registry; give --tls-client-ca (client certificates, "
                             "docs/SERVER.md \"Security\"), or add --insecure-listen-all to accept that")
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        return "[::]", creds
    if args.tls_client_ca:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    return ("[::]" if args.insecure_listen_all else "127.0.0.1"), None


def check_port(host: str, port: int) -> None:
    """Refuses a busy port before anything is created (gRPC's own bind failure would print
    its C-core log lines and could only be told from other errors by its text)."""
    if port == 0:
        return
    family, addr = (socket.AF_INET6, "::") if host.startswith("[") else (socket.AF_INET, host)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                what = "in use (another server?)" if e.errno == errno.EADDRINUSE else "not allowed for this user"
                raise UsageError(f"port {port} on {host} is {what}; choose another --port") from None
            raise


def _store_files(target: str) -> list:
    """The files an SQLite store at `target` consists of (none for a URL)."""
    if is_url(target):
        return []
    return [target + x for x in ("", "-wal", "-shm", ".lock")]


class _Cleanup:
    """Removes, after a failed start, the store files that this start created."""

    def __init__(self, target: str):
        self.created = [f for f in _store_files(target) if not os.path.exists(f)]

    def __call__(self) -> None:
        for f in self.created:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass


async def _serve(args) -> int:
    try:
        ps = engine.load_policies(args.policies)
    except engine.PolicyError as e:
        raise UsageError(str(e)) from None
    host, creds = _listen(args)
    if args.facilities:  # a bad file is a usage error before anything is created (Server.start loads it)
        try:
            fac.read_facilities_parquet(args.facilities)
        except ValueError as e:
            raise UsageError(f"facilities: {e}") from None
    check_port(host, args.port)
    cleanup = _Cleanup(args.store)
    store = open_store(args.store, exclusive=True, **({"pool_size": args.pool_size} if is_url(args.store) else {}))
    srv = None
    try:
        if args.registry:
            try:
                n = import_registry(store, args.registry)
            except (OSError, ValueError) as e:
                raise UsageError(f"registry {args.registry}: {e}") from None
            log.info("registry %s: %s", args.registry, "unchanged since last import" if n < 0 else f"{n} persons")
        srv = Server(ps, args.store, port=args.port, host=host, credentials=creds, max_batch=args.max_batch,
                     max_pending=args.max_pending, min_interval=args.group_interval_ms / 1000.0,
                     read_threads=args.read_threads, verify=args.verify, store=store, writer=args.writer,
                     policies_source=args.policies, client_auth=bool(args.tls_client_ca),
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                     max_in_flight=args.max_in_flight, latency_budget_ms=args.latency_budget_ms,
                     max_concurrent_rpcs=args.max_concurrent_rpcs, core_pending=args.core_pending,
                     log_call_detail=args.log_call_detail, facilities_file=args.facilities)
        port = await srv.start()
    except BaseException as e:
        if srv is not None:
            await srv.stop(0)
        else:
            store.close()
        cleanup()
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {args.port} on {host} is in use (another server?); choose another --port") \
                from None
        raise

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        Path(tmp).write_text(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"medsettle serve: listening on {host}:{port} ({len(ps.policies)} policies, store {store.location})",
          flush=True)
    tune_gc()

    died = loop.create_task(srv.died.wait())
    await asyncio.wait([loop.create_task(stop.wait()), died], return_when=asyncio.FIRST_COMPLETED)
    if srv.died.is_set():
        log.error("stopping: the writer process died")
        await srv.stop(0)
        return EXIT_FAILURE
    log.info("draining: no new calls; in-flight calls have %.1f s", args.drain_seconds)
    await srv.stop(args.drain_seconds)
    s = srv.writer.stats
    if s:
        log.info("stopped: %d settled, %d reversed in %d groups (largest %d), %d slow commits", s["settled"],
                 s["reversed"], s["groups"], s["max_group"], s.get("slow_commits", 0))
    print("medsettle serve: stopped", flush=True)
    return EXIT_OK


def serve_main(args) -> int:
    """`medsettle serve`: 0 after a clean stop, 1 when the writer died or the store failed,
    2 on a usage error (bad option, policy folder, registry file, busy port, store path)."""
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        prof_path = os.environ.get("MEDSETTLE_PROFILE")
        if prof_path:  # development aid: profile the event loop thread (the writer profiles itself)
            prof = cProfile.Profile()
            try:
                return prof.runcall(asyncio.run, _serve(args))
            finally:
                prof.dump_stats(prof_path + ".loop")
        return asyncio.run(_serve(args))
    except UsageError as e:
        print(f"medsettle serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as e:  # cannot be reached now: not the command line's fault
        print(f"medsettle serve: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except StoreError as e:  # a missing folder, a store in use, of another schema version, a bad URL
        print(f"medsettle serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # the writer could not start: the reason is in its message
        print(f"medsettle serve: {e}", file=sys.stderr)
        return EXIT_FAILURE


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m server", description="medsettle real-time settlement server")
    add_arguments(parser)
    return serve_main(parser.parse_args(argv))
