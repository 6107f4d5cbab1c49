"""`medsettle serve`: the real-time settlement server.

    medsettle serve --policies DIR --store PATH --port N [--registry persons.parquet]
    python -m server --policies DIR --store PATH --port N ...     (the same, without the CLI)

`add_arguments(parser)` and `serve_main(args)` are what the CLI wires to
`medsettle serve`. The server listens on loopback (127.0.0.1) unless TLS is
configured (--tls-cert/--tls-key) or --insecure-listen-all is given; it serves
medsettle.v1.Settlement and medsettle.v1.Registry, grpc.health.v1.Health and
server reflection. SIGTERM (or SIGINT) marks it NOT_SERVING, stops taking
calls, lets in-flight ones finish within --drain-seconds, commits what the
writer holds, checkpoints the store and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("medsettle.server")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("settlement")
    g.add_argument("--policies", metavar="DIR", default=None,
                   help="folder of policy YAML files (default: the bundled seed policies)")
    g.add_argument("--store", metavar="PATH", required=True,
                   help="SQLite store file (created if missing): ledger, accumulators, registry")
    g.add_argument("--registry", metavar="PERSONS_PARQUET", default=None,
                   help="import (upsert) this persons.parquet into the registry before serving; skipped when "
                        "the same file was imported before")
    n = parser.add_argument_group("network")
    n.add_argument("--port", type=int, default=50051, help="TCP port (0 = any free port; default 50051)")
    n.add_argument("--insecure-listen-all", action="store_true",
                   help="listen on every interface without TLS (default: loopback only)")
    n.add_argument("--tls-cert", metavar="PEM", help="server certificate chain; with --tls-key enables TLS and "
                                                     "listening on every interface")
    n.add_argument("--tls-key", metavar="PEM", help="server private key")
    n.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    n.add_argument("--port-file", metavar="PATH", help="write the bound port to this file once serving")
    t = parser.add_argument_group("tuning")
    t.add_argument("--drain-seconds", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight calls may take to finish (default 10)")
    t.add_argument("--max-batch", type=int, default=1024, help="most calls committed in one group (default 1024)")
    t.add_argument("--max-pending", type=int, default=20_000,
                   help="queued calls beyond which Settle answers RESOURCE_EXHAUSTED (default 20000)")
    t.add_argument("--group-interval-ms", type=float, default=2.0,
                   help="start a group at most once per this many ms unless --max-batch calls are waiting "
                        "(default 2; 0: settle what is queued as soon as the writer is free)")
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


def import_registry(store, path: str) -> int:
    """Upserts every person of a persons.parquet in one transaction (all or nothing);
    returns how many, or -1 when the same file was imported before."""
    from .registry import person_to_row, read_persons_parquet
    from .store import UPSERT_PERSON

    fp = file_fingerprint(path)
    if store.get_meta("registry_import_sha256") == fp:
        return -1
    conn = store.conn
    count = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for chunk in read_persons_parquet(path):
            conn.executemany(UPSERT_PERSON, [person_to_row(p) for p in chunk])
            count += len(chunk)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('registry_import_sha256', ?)", (fp,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return count


def tune_gc() -> None:
    """Fewer, cheaper garbage collections: what is loaded at start (policies, modules) is frozen
    out of the collector's view, and the young generation is collected every 20,000 allocations
    instead of 700 (each collection is a pause every in-flight call waits out)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


class Server:
    """One server: store, writer, gRPC services (settlement, registry, health, reflection).

    `await start()` binds and serves (returns the port); `await stop(grace)`
    drains: NOT_SERVING, no new calls, in-flight calls get `grace` seconds,
    then the writer commits what it holds and the store is checkpointed."""

    def __init__(self, policies, store_path: str, *, port: int = 0, host: str = "127.0.0.1", credentials=None,
                 max_batch: int = 1024, max_pending: int = 20_000, min_interval: float = 0.0,
                 read_threads: int = 2, verify: bool = False, store=None, writer: str = "process",
                 policies_source=None):
        from .batcher import Batcher
        from .core import Core
        from .store import Store
        from .writer_proc import WriterProcess

        self.ps = policies
        self.store = store if store is not None else Store(store_path, exclusive=True)
        self.core = Core(policies, verify=verify)
        self.died = asyncio.Event()
        if writer == "process":
            # the writer process loads the policies itself from their folder when there is one
            self.batcher = WriterProcess(self.store.path, policies_source if policies_source is not None else policies,
                                         max_batch=max_batch, max_pending=max_pending, min_interval=min_interval,
                                         verify=verify, log_level=logging.getLogger().level or logging.INFO,
                                         on_death=self.died.set)
        elif writer == "thread":
            self.batcher = Batcher(self.store, self.core, max_batch=max_batch, max_pending=max_pending,
                                   min_interval=min_interval)
        else:
            raise ValueError(f"writer must be 'process' or 'thread', not {writer!r}")
        self.host, self.port = host, port
        self.credentials = credentials
        self.read_threads = read_threads
        self.server = None
        self.health = None

    async def start(self) -> int:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from .batcher import Batcher
        from .service import Service

        if isinstance(self.batcher, Batcher):
            self.batcher.start()
        else:
            await self.batcher.start()
        self.server = server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        self.service = Service(self.store, self.core, self.batcher, read_threads=self.read_threads)
        names = self.service.add_to_server(server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        addr = f"{self.host}:{self.port}"
        port = server.add_secure_port(addr, self.credentials) if self.credentials else server.add_insecure_port(addr)
        if not port:
            raise OSError(f"cannot listen on {addr}")
        self.port = port
        await server.start()
        for name in ("", *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    async def stop(self, grace: float = 10.0) -> None:
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
            self.server = None
        if hasattr(self.batcher, "submit_raw"):
            await self.batcher.close()
        else:
            self.batcher.close()
        if getattr(self, "service", None) is not None:
            self.service.close()
        self.store.close()


def _listen(args) -> tuple[str, object]:
    """(host, credentials or None) from the network options."""
    import grpc

    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("medsettle serve: --tls-cert and --tls-key go together")
        ca = Path(args.tls_client_ca).read_bytes() if args.tls_client_ca else None
        creds = grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())],
                                            root_certificates=ca, require_client_auth=ca is not None)
        return "[::]", creds
    return ("[::]" if args.insecure_listen_all else "127.0.0.1"), None


async def _serve(args) -> int:
    import engine

    from .store import Store

    try:
        ps = engine.load_policies(args.policies)
    except engine.PolicyError as e:
        print(f"medsettle serve: {e}", file=sys.stderr)
        return 2
    host, creds = _listen(args)
    store = Store(args.store, exclusive=True)
    if args.registry:
        try:
            n = import_registry(store, args.registry)
        except (OSError, ValueError) as e:
            print(f"medsettle serve: registry {args.registry}: {e}", file=sys.stderr)
            store.close()
            return 2
        log.info("registry %s: %s", args.registry, "unchanged since last import" if n < 0 else f"{n} persons")
    srv = Server(ps, args.store, port=args.port, host=host, credentials=creds, max_batch=args.max_batch,
                 max_pending=args.max_pending, min_interval=args.group_interval_ms / 1000.0,
                 read_threads=args.read_threads, verify=args.verify, store=store, writer=args.writer,
                 policies_source=args.policies)
    try:
        port = await srv.start()
    except (OSError, RuntimeError) as e:
        print(f"medsettle serve: {e}", file=sys.stderr)
        await srv.stop(0)
        return 2

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        Path(tmp).write_text(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"medsettle serve: listening on {host}:{port} ({len(ps.policies)} policies, store {args.store})",
          flush=True)
    tune_gc()

    died = loop.create_task(srv.died.wait())
    await asyncio.wait([loop.create_task(stop.wait()), died], return_when=asyncio.FIRST_COMPLETED)
    if srv.died.is_set():
        log.error("stopping: the writer process died")
        await srv.stop(0)
        return 1
    log.info("draining: no new calls; in-flight calls have %.1f s", args.drain_seconds)
    await srv.stop(args.drain_seconds)
    s = srv.batcher.stats
    if s:
        log.info("stopped: %d settled, %d reversed in %d groups (largest %d), %d slow commits", s["settled"],
                 s["reversed"], s["groups"], s["max_group"], s.get("slow_commits", 0))
    print("medsettle serve: stopped", flush=True)
    return 0


def serve_main(args) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .store import StoreError

    try:
        prof_path = os.environ.get("MEDSETTLE_PROFILE")
        if prof_path:  # development aid: profile the event loop thread (the writer profiles itself)
            import cProfile

            prof = cProfile.Profile()
            try:
                return prof.runcall(asyncio.run, _serve(args))
            finally:
                prof.dump_stats(prof_path + ".loop")
        return asyncio.run(_serve(args))
    except StoreError as e:
        print(f"medsettle serve: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m server", description="medsettle real-time settlement server")
    add_arguments(parser)
    return serve_main(parser.parse_args(argv))
