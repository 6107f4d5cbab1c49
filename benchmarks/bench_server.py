"""Load benchmark of the real-time server: open-loop latency and saturation.

    python benchmarks/bench_server.py                      # rates 500,1000,2000,4000 for 8 s each + saturation
    python benchmarks/bench_server.py --rates 2000 --duration 10 --json out.json
    python -m pytest benchmarks/bench_server.py            # pytest-benchmark record (short runs)

The script starts `python -m server` on loopback with a fresh store (SQLite,
WAL, synchronous=FULL: every acknowledged settlement is durable), registers the
persons of `engine.generate` (same seed as the claims) and then, per offered
rate, runs an *open-loop* client: request i is due at t0 + i / rate whatever
happened to earlier ones, and its latency is measured from that due time to
its response, so a stalled server (or a stalled client) shows up in the
figures instead of slowing the offered load. Requests are pre-serialized
SettleRequest bytes.

Two clients send them. `benchmarks/loadgen.c` (HTTP/2 from libnghttp2, one
thread; built here with the C compiler when Debian's libnghttp2-dev is
installed) costs ~0.05 ms of CPU per call; the Python grpc.aio client costs
~0.4 ms, which on this 2-core machine is taken from the server it measures.
`--client auto` (the default) uses the C one when it builds, else Python;
`--clients` splits the rate over several Python processes, `--connections`
over HTTP/2 connections of the C client.

Saturation: a closed loop with `--concurrency` calls in flight; settlements
per second completed (C client: a fixed number of calls, `--duration`
seconds' worth at 3,000/s; Python client: for `--duration` seconds).

Every run checks that each call succeeded (status OK) and reports errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHOD = "/medsettle.v1.Settlement/Settle"
DEFAULT_RATES = (500, 1000, 2000, 4000)


# --------------------------------------------------------------------------- setup


def make_payloads(n: int, seed: int, tag: str) -> list[bytes]:
    """`n` SettleRequest bytes: claims of engine.generate (year 2023 of the seed policies), claim ids
    prefixed with `tag` so that runs never collide."""
    import engine
    import engine.generate as gen

    from server._proto import settlement_pb2 as pb
    from server.client import claim_pb

    ps = engine.load_policies(None)
    table = gen.generate_claims(ps, n, seed, year=2023)
    rows = table.to_pylist()
    out = []
    for r in rows:
        r["claim_id"] = f"{tag}-{r['claim_id']}"
        out.append(pb.SettleRequest(claim=claim_pb(r, facility_id="H0001")).SerializeToString())
    return out


def write_registry(path: Path, n: int, seed: int) -> int:
    """The persons behind `make_payloads(n, seed)` as persons.parquet; returns how many."""
    import engine
    import engine.generate as gen
    import pyarrow.parquet as pq

    ps = engine.load_policies(None)
    t = gen.generate_persons(ps, n, seed, year=2023)
    pq.write_table(t, path)
    return t.num_rows


def start_server(store: Path, registry: Path | None = None, extra=(), *, store_url: str | None = None,
                 name: str = "") -> tuple[subprocess.Popen, int]:
    """`python -m server` on `store` (or on the PostgreSQL `store_url`); (process, port)."""
    port_file = store.with_suffix(f".{name}port" if name else ".port")
    if port_file.exists():
        port_file.unlink()
    cmd = [sys.executable, "-m", "server", "--store", store_url or str(store), "--port", "0", "--port-file",
           str(port_file), "--log-level", "WARNING", *extra]
    if registry is not None:
        cmd += ["--registry", str(registry)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _bare_server_main(port_file: str) -> None:
    """A do-nothing grpc.aio server answering Settle with fixed bytes: the floor of the
    figures (what gRPC and the client cost on this machine without any settlement)."""
    import grpc

    async def serve():
        server = grpc.aio.server()
        answer = b"x" * 700  # about the size of a SettleResponse

        async def settle(request, context):
            return answer

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "medsettle.v1.Settlement", {"Settle": grpc.unary_unary_rpc_method_handler(settle)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


def start_bare_server(work: Path) -> tuple[subprocess.Popen, int]:
    port_file = work / "bare.port"
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port_file)], cwd=ROOT)
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError("bare server exited")
        time.sleep(0.05)
    time.sleep(0.2)
    return proc, int(port_file.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- clients

#: grpc.ssl_channel_credentials of the Python client for a --tls run (None: plaintext).
TLS_CREDS = None


def _channel(target: str):
    import grpc

    return grpc.aio.secure_channel(target, TLS_CREDS) if TLS_CREDS is not None else grpc.aio.insecure_channel(target)


def tls_setup(folder: Path) -> list:
    """--tls: a CA, a server certificate and a client certificate of facility H0001 (the claims'),
    made with tests/server/certs.py; sets the client's credentials, returns the server's arguments."""
    global TLS_CREDS
    import grpc

    sys.path.insert(0, str(ROOT / "tests" / "server"))
    from certs import PKI, issue

    pki = PKI(folder)
    client = issue(pki.ca, "bench counter", facility="H0001")
    TLS_CREDS = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem, private_key=client.key_pem,
                                             certificate_chain=client.cert_pem)
    return ["--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
            "--tls-client-ca", str(folder / "ca.pem")]

LOADGEN_SRC = ROOT / "benchmarks" / "loadgen.c"
RESULT_DTYPE = np.dtype([("due_ns", "<i8"), ("done_ns", "<i8"), ("grpc_status", "<i4"), ("http_status", "<i4")])


def build_loadgen(folder: Path | None = None) -> Path | None:
    """benchmarks/loadgen.c compiled (cached by its content), or None when there is no C
    compiler or no libnghttp2 headers (Debian: apt-get install libnghttp2-dev)."""
    import hashlib

    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not LOADGEN_SRC.exists():
        return None
    digest = hashlib.sha256(LOADGEN_SRC.read_bytes()).hexdigest()[:12]
    exe = Path(folder or tempfile.gettempdir()) / f"medsettle-loadgen-{digest}"
    if exe.exists():
        return exe
    tmp = exe.with_name(exe.name + f".{os.getpid()}")
    r = subprocess.run([cc, "-O2", "-o", str(tmp), str(LOADGEN_SRC), "-lnghttp2"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    os.replace(tmp, exe)
    return exe


class CClient:
    """Runs benchmarks/loadgen.c: the open loop (or a closed one, `in_flight` > 0) of `payloads`."""

    name = "c"

    def __init__(self, exe: Path, connections: int = 1):
        self.exe, self.connections = exe, connections

    def run(self, target: str, payloads: list, rate: float, in_flight: int = 0, timeout_s: float = 60.0):
        """(results array of RESULT_DTYPE, client CPU seconds)."""
        host, port = target.rsplit(":", 1)
        with tempfile.TemporaryDirectory(prefix="medsettle-loadgen-") as d:
            src, out = Path(d) / "payloads.bin", Path(d) / "results.bin"
            with open(src, "wb") as f:
                for p in payloads:
                    f.write(len(p).to_bytes(4, "little"))
                    f.write(p)
            cmd = [str(self.exe), host, port, METHOD, str(src), str(rate), str(out), str(self.connections),
                   str(timeout_s), str(in_flight)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.last_stderr = r.stderr  # "MSG i TEXT" lines with LOADGEN_MESSAGES=1 (loadgen.c)
            if r.returncode != 0:
                raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr.strip()}")
            fields = r.stdout.split()
            cpu = float(fields[fields.index("cpu_s") + 1])
            return np.fromfile(out, dtype=RESULT_DTYPE), cpu

    def open_loop(self, target: str, payloads: list, rate: float) -> dict:
        targets = target.split(",")
        if len(targets) == 1:
            res, cpu = self.run(target, payloads, rate)
            return open_loop_figures(*_latencies(res), rate, cpu)
        # one loadgen per server, each with its share of the rate, side by side
        from concurrent.futures import ThreadPoolExecutor

        k = len(targets)
        with ThreadPoolExecutor(k) as ex:
            parts = list(ex.map(lambda i: self.run(targets[i], payloads[i::k], rate / k), range(k)))
        res = np.concatenate([p[0] for p in parts])
        return open_loop_figures(*_latencies(res), rate, sum(p[1] for p in parts))

    def saturation(self, target: str, payloads: list, concurrency: int, duration: float) -> dict:
        part = payloads[: int(3000 * duration)]
        res, cpu = self.run(target, part, 1e9, in_flight=concurrency)
        lat, ok = _latencies(res)
        done = res["done_ns"][res["done_ns"] >= 0]
        elapsed = (done.max() / 1e9) if len(done) else 0.0
        out = summarize(lat, ok, len(part), elapsed, offered=None)
        out["concurrency"] = concurrency
        out["client_cpu_per_s"] = cpu / max(elapsed, 1e-9)
        return out


def _latencies(res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seconds from due time to answer (NaN: no answer) and whether each call succeeded."""
    lat = np.where(res["done_ns"] >= 0, (res["done_ns"] - res["due_ns"]) / 1e9, np.nan)
    ok = (res["grpc_status"] == 0) & (res["http_status"] == 200) & (res["done_ns"] >= 0)
    bad = res["grpc_status"][~ok]
    if len(bad):
        codes, counts = np.unique(bad, return_counts=True)
        print("errors by grpc-status (-1: no answer): "
              + ", ".join(f"{c}: {k}" for c, k in zip(codes.tolist(), counts.tolist())), file=sys.stderr)
    return lat, ok


class PyClient:
    """The grpc.aio client of this file: `clients` processes share the rate."""

    name = "python"

    def __init__(self, clients: int = 1):
        self.clients = clients

    def open_loop(self, target: str, payloads: list, rate: float) -> dict:
        return run_open_loop(target, payloads, rate, self.clients)

    def saturation(self, target: str, payloads: list, concurrency: int, duration: float) -> dict:
        return run_saturation(target, payloads, concurrency, duration)


def make_client(kind: str = "auto", clients: int = 1, connections: int = 1, log=print):
    """The load client: "c" (error if it can't be built), "python", or "auto" (C when it builds)."""
    if kind in ("auto", "c"):
        exe = build_loadgen()
        if exe is not None:
            return CClient(exe, connections)
        if kind == "c":
            raise RuntimeError("cannot build benchmarks/loadgen.c: needs a C compiler and libnghttp2's "
                               "headers (Debian: apt-get install libnghttp2-dev)")
        log("loadgen.c does not build here (no libnghttp2-dev?): using the Python client")
    return PyClient(clients)


async def _open_loop(target: str, payloads: list, rate: float, start_at: float, phase: float, stride: float):
    """Sends payloads[i] at start_at + phase + i * stride (perf_counter clock); returns
    (latencies s, ok flags) measured from each due time."""
    n = len(payloads)
    lat = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    errs: dict = {}
    async with _channel(target) as ch:
        await ch.channel_ready()
        call = ch.unary_unary(METHOD)
        done = asyncio.get_running_loop().create_future()
        remaining = [n]
        clock = time.perf_counter

        def finished(i, due):
            def cb(c):
                lat[i] = clock() - due
                # after completion the status is known; grpc.aio only offers it as a coroutine
                ok[i] = c._cython_call.is_ok()
                remaining[0] -= 1
                if remaining[0] == 0 and not done.done():
                    done.set_result(None)
            return cb

        while clock() < start_at:
            await asyncio.sleep(min(0.01, start_at - clock()))
        base = start_at + phase
        calls: list = []
        i = 0
        while i < n:
            now = clock()
            while i < n and base + i * stride <= now:
                c = call(payloads[i], timeout=30)
                c.add_done_callback(finished(i, base + i * stride))
                calls.append(c)
                i += 1
            if i < n:
                wait = base + i * stride - clock()
                await asyncio.sleep(wait if wait > 0 else 0)
        if n:
            try:
                await asyncio.wait_for(done, 60)
            except asyncio.TimeoutError:
                pass
        for c in calls:
            if c.done() and not c._cython_call.is_ok():
                code = (await c.code()).name
                if code not in errs and os.environ.get("MEDSETTLE_BENCH_DEBUG"):
                    print(code, await c.details(), file=sys.stderr)
                errs[code] = errs.get(code, 0) + 1
    if errs:
        print(f"errors: {errs}", file=sys.stderr)
    return lat, ok


def _open_loop_proc(args):
    import gc

    target, payloads, rate, start_at, phase, stride = args
    t0 = time.process_time()
    # the client's own garbage-collector pauses would show up as server latency
    gc.collect()
    gc.disable()
    try:
        lat, ok = asyncio.run(_open_loop(target, payloads, rate, start_at, phase, stride))
    finally:
        gc.enable()
    return lat, ok, time.process_time() - t0


def run_open_loop(target: str, payloads: list, rate: float, clients: int = 1) -> dict:
    """Offers `len(payloads)` settlements at `rate`/s (open loop) and returns the latency figures.
    `target` may list several servers (comma-separated): client process k sends to server k mod n."""
    targets = target.split(",")
    clients = max(clients, len(targets))
    start_at = time.perf_counter() + 0.5
    stride = clients / rate
    jobs = [(targets[k % len(targets)], payloads[k::clients], rate / clients, start_at, k / rate, stride)
            for k in range(clients)]
    if clients == 1:
        parts = [_open_loop_proc(jobs[0])]
    else:
        ctx = mp.get_context("fork")
        with ctx.Pool(clients) as pool:
            parts = pool.map(_open_loop_proc, jobs)
    return open_loop_figures(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                             rate, sum(p[2] for p in parts))


def open_loop_figures(lat: np.ndarray, ok: np.ndarray, rate: float, client_cpu: float) -> dict:
    """The figures of an open-loop run: the run lasts from the first due time to the last answer."""
    n = len(lat)
    elapsed = np.nanmax(lat) + (n - 1) / rate if n else 0.0
    out = summarize(lat, ok, n, elapsed, offered=rate)
    out["client_cpu_per_s"] = client_cpu / max(elapsed, 1e-9)
    return out


async def _closed_loop(target: str, payloads: list, concurrency: int, duration: float):
    import grpc

    lat = []
    errors = 0
    async with _channel(target) as ch:
        await ch.channel_ready()
        call = ch.unary_unary(METHOD)
        it = iter(payloads)
        stop_at = time.perf_counter() + duration

        async def worker():
            nonlocal errors
            for p in it:
                if time.perf_counter() >= stop_at:
                    return
                t = time.perf_counter()
                try:
                    await call(p, timeout=30)
                except grpc.RpcError:
                    errors += 1
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return np.array(lat), errors, elapsed


def run_saturation(target: str, payloads: list, concurrency: int, duration: float) -> dict:
    lat, errors, elapsed = asyncio.run(_closed_loop(target, payloads, concurrency, duration))
    ok = np.ones(len(lat), dtype=bool)
    ok[:errors] = False
    out = summarize(lat, ok, len(lat), elapsed, offered=None)
    out["concurrency"] = concurrency
    return out


def summarize(lat: np.ndarray, ok: np.ndarray, n: int, elapsed: float, offered) -> dict:
    ms = lat[~np.isnan(lat)] * 1000.0
    q = (lambda p: float(np.percentile(ms, p))) if len(ms) else (lambda p: float("nan"))
    return {
        "offered_per_s": offered, "requests": int(n), "ok": int(ok.sum()), "errors": int(n - ok.sum()),
        "achieved_per_s": float(ok.sum() / elapsed) if elapsed > 0 else 0.0,
        "p50_ms": q(50), "p90_ms": q(90), "p99_ms": q(99), "p999_ms": q(99.9), "max_ms": float(ms.max()) if len(ms) else float("nan"),
    }


def _tree(pid: int) -> list:
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    out.extend(_tree(int(child)))
    except OSError:
        pass
    return out


def cpu_by_process(pid: int) -> dict:
    """CPU seconds (user + system) of the server process and of each of its descendants."""
    out = {}
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[p] = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return out


def server_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the server process and its children (the writer process)."""
    return sum(cpu_by_process(pid).values())


# --------------------------------------------------------------------------- the run


def run_baseline(rates, duration: float, client=None, concurrency: int = 256, saturation: bool = True,
                 log=print) -> dict:
    """The same open-loop (and closed-loop) runs against the do-nothing server."""
    client = client or PyClient()
    work = Path(tempfile.mkdtemp(prefix="medsettle-bare-"))
    proc, port = start_bare_server(work)
    target = f"127.0.0.1:{port}"
    out = {"client": client.name, "rates": []}
    try:
        client.open_loop(target, [b"y" * 200] * 1000, 500)
        for rate in rates:
            cpu0 = server_cpu_seconds(proc.pid)
            r = client.open_loop(target, [b"y" * 200] * int(rate * duration), rate)
            r["server_cpu_per_s"] = (server_cpu_seconds(proc.pid) - cpu0) / duration
            out["rates"].append(r)
            log("bare gRPC  " + fmt_row(r))
            time.sleep(1.0)
        if saturation:
            r = client.saturation(target, [b"y" * 200] * int(5000 * duration), concurrency, duration)
            out["saturation"] = r
            log(f"bare gRPC saturation (closed loop, {concurrency} in flight): {r['achieved_per_s']:.0f} calls/s")
    finally:
        stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)
    return out


def run(rates=DEFAULT_RATES, duration: float = 8.0, client=None,
        concurrency: int = 256, saturation: bool = True, server_args=(), workdir: str | None = None,
        tag: str | None = None, store: str | None = None, instances: int = 1, extra_pids=(), log=print) -> dict:
    """The open-loop runs (and saturation) against `instances` servers on one store: an SQLite
    file in the work folder (default), or `store`, a PostgreSQL URL. `extra_pids`: processes
    whose CPU counts as the server's too (the database's)."""
    client = client or PyClient()
    own = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="medsettle-bench-"))
    try:
        registry = work / "persons.parquet"
        t = time.time()
        total = int(sum(r * duration for r in rates) + (4000 * duration * 2 if saturation else 0)) + 2000
        # the registry behind the claims: engine.generate's population for the same (n, seed)
        n_persons = write_registry(registry, total, seed=7)
        log(f"setup: {n_persons} persons, {total} claims ...")
        payloads = make_payloads(total, seed=7, tag=tag or f"b{int(time.time())}")
        log(f"setup done in {time.time() - t:.1f} s")
        procs, ports = [], []
        try:
            for i in range(instances):
                proc, port = start_server(work / "store.db", registry, server_args, store_url=store, name=f"i{i}")
                procs.append(proc)
                ports.append(port)
        except BaseException:
            for proc in procs:
                stop_server(proc)
            raise
        proc = procs[0]
        target = ",".join(f"127.0.0.1:{p}" for p in ports)
        results = {"machine": {"cpus": os.cpu_count()}, "duration_s": duration, "persons": n_persons,
                   "client": client.name, "server_args": list(server_args), "rates": [],
                   "store": "sqlite" if store is None else "postgresql", "instances": instances}

        def cpu_now() -> tuple[dict, dict]:
            front, other = {}, {}
            for p in procs:
                c = cpu_by_process(p.pid)
                front[p.pid] = c.pop(p.pid, 0.0)
                other.update(c)
            for p in extra_pids:
                other.update({("db", k): v for k, v in cpu_by_process(p).items()})
            return front, other
        pos = 0
        try:
            # warm-up (not reported)
            warm = payloads[pos:pos + 1000]
            pos += len(warm)
            client.open_loop(target, warm, 500)
            for rate in rates:
                n = int(rate * duration)
                part = payloads[pos:pos + n]
                pos += n
                f0, o0 = cpu_now()
                r = client.open_loop(target, part, rate)
                f1, o1 = cpu_now()
                r["server_cpu_per_s"] = (sum(f1.values()) + sum(o1.values()) - sum(f0.values())
                                         - sum(o0.values())) / duration
                r["writer_cpu_per_s"] = sum(o1[p] - o0.get(p, 0) for p in o1 if not isinstance(p, tuple)) / duration
                r["db_cpu_per_s"] = sum(o1[p] - o0.get(p, 0) for p in o1 if isinstance(p, tuple)) / duration
                r["cpu_ms_per_settlement"] = r["server_cpu_per_s"] * 1e3 / max(r["achieved_per_s"], 1e-9)
                results["rates"].append(r)
                log(fmt_row(r))
                time.sleep(1.0)  # let a backlog drain before the next rate
            if saturation:
                part = payloads[pos:]
                r = client.saturation(target, part, concurrency, duration)
                results["saturation"] = r
                log(f"saturation (closed loop, {concurrency} in flight): {r['achieved_per_s']:.0f} settlements/s, "
                    f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}")
        finally:
            for p in procs:
                stop_server(p)
        return results
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def fmt_row(r: dict) -> str:
    extra = (f", db {r['db_cpu_per_s']:.2f}; {r['cpu_ms_per_settlement']:.2f} ms CPU/settlement"
             if "cpu_ms_per_settlement" in r else "")
    return (f"offered {r['offered_per_s']:>6.0f}/s  achieved {r['achieved_per_s']:>7.0f}/s  "
            f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  p99.9 {r['p999_ms']:7.2f} ms  "
            f"max {r['max_ms']:7.1f} ms  errors {r['errors']}  server CPU {r.get('server_cpu_per_s', 0):.2f} cores "
            f"(writer {r.get('writer_cpu_per_s', 0):.2f}{extra}), client CPU {r.get('client_cpu_per_s', 0):.2f}")


def run_disk_baseline(duration: float, commits_per_s: float = 250.0, rows: int = 8, folder: str | None = None,
                      log=print) -> dict:
    """The store's floor: SQLite commits (WAL, synchronous=FULL) of `rows` ledger-sized rows
    on a fixed schedule, in the folder the benchmark's stores use, nothing else running.
    Latency from each commit's due time to its end: a server that acknowledges only after
    the commit cannot answer faster than this, in its tail above all."""
    import sqlite3

    work = Path(tempfile.mkdtemp(prefix="medsettle-disk-", dir=folder))
    try:
        conn = sqlite3.connect(str(work / "disk.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, k TEXT UNIQUE, body BLOB)")
        body = os.urandom(1200)
        n = int(duration * commits_per_s)
        lat = np.empty(n)
        t0 = time.perf_counter()
        for i in range(n):
            due = t0 + i / commits_per_s
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO t (k, body) VALUES (?, ?)",
                             [(os.urandom(8).hex(), body) for _ in range(rows)])
            conn.execute("COMMIT")
            lat[i] = time.perf_counter() - due
        conn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = summarize(lat, np.ones(n, dtype=bool), n, n / commits_per_s, offered=commits_per_s)
    out.update(commits_per_s=commits_per_s, rows=rows, commits=n, over_50ms=int((lat > 0.05).sum()))
    log(f"disk: {commits_per_s:.0f} commits/s of {rows} rows (WAL, synchronous=FULL): p50 {out['p50_ms']:.2f} ms  "
        f"p99 {out['p99_ms']:.2f} ms  p99.9 {out['p999_ms']:.2f} ms  max {out['max_ms']:.1f} ms  "
        f"over 50 ms: {out['over_50ms']}")
    return out


def main(argv=None) -> int:
    global TLS_CREDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="offered rates, settlements/s")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per rate (default 8)")
    ap.add_argument("--client", choices=("auto", "c", "python"), default="auto",
                    help="load client: benchmarks/loadgen.c, the Python one, or C when it builds (default)")
    ap.add_argument("--clients", type=int, default=1, help="Python client processes sharing each rate (default 1)")
    ap.add_argument("--connections", type=int, default=1, help="HTTP/2 connections of the C client (default 1)")
    ap.add_argument("--concurrency", type=int, default=256, help="calls in flight for saturation (default 256)")
    ap.add_argument("--no-saturation", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for the server (repeatable)")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the same load against a do-nothing gRPC server, and time bare SQLite "
                         "commits on the same disk (the floors of the figures)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--workdir", metavar="DIR", help="keep the store and registry in this (new) folder, to compare "
                                                     "the ledgers of two runs")
    ap.add_argument("--tag", help="claim-id prefix (default: b<unix time>); the same tag gives the same claims")
    ap.add_argument("--tls", action="store_true",
                    help="run the rates twice, without and with mutual TLS (client certificates), with the "
                         "Python client (loadgen.c speaks plaintext HTTP/2 only)")
    ap.add_argument("--stores", default="sqlite",
                    help="comma-separated runs, one after the other: sqlite (a file), postgresql (one instance), "
                         "postgresql-2 (two instances on one database; the client splits the load). PostgreSQL "
                         "runs start a throw-away cluster (tests/server/pg.py: initdb, fsync on) with its CPU "
                         "counted as the server's (default: sqlite)")
    ap.add_argument("--bare-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_server:
        _bare_server_main(args.bare_server)
        return 0
    if args.tls:
        rates = [float(x) for x in args.rates.split(",") if x]
        client = PyClient(args.clients)
        res = {"client": client.name}
        for mode in ("plain", "tls"):
            with tempfile.TemporaryDirectory(prefix="medsettle-pki-") as pki:
                extra = tls_setup(Path(pki)) if mode == "tls" else []
                print(f"{mode}:")
                res[mode] = run(rates=rates, duration=args.duration, client=client, concurrency=args.concurrency,
                                saturation=not args.no_saturation, server_args=[*args.server_arg, *extra],
                                tag=f"{args.tag or int(time.time())}-{mode}")
                TLS_CREDS = None
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    client = make_client(args.client, args.clients, args.connections)
    print(f"client: {client.name}")
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("sqlite", "postgresql", "postgresql-2")]
    if bad:
        ap.error(f"--stores: unknown {', '.join(bad)} (sqlite, postgresql, postgresql-2)")
    cluster = None
    if any(k != "sqlite" for k in kinds):
        sys.path.insert(0, str(ROOT / "tests" / "server"))
        import pg  # the tests' throw-away cluster

        cluster = pg.start_cluster(fsync=True, settings={"synchronous_commit": "on"})
        print(f"postgresql: {cluster.url()} (fsync on)")
    runs = {}
    try:
        for kind in kinds:
            print(f"--- {kind}")
            url, pids = None, ()
            if kind != "sqlite":
                url = cluster.socket_url(cluster.create_database())
                pids = (int((cluster.data / "postmaster.pid").read_text().split()[0]),)
            workdir = None
            if args.workdir:
                workdir = str(Path(args.workdir) / kind) if len(kinds) > 1 else args.workdir
                Path(workdir).mkdir(parents=True, exist_ok=True)
            runs[kind] = run(rates=[float(x) for x in args.rates.split(",") if x], duration=args.duration,
                             client=client, concurrency=args.concurrency, saturation=not args.no_saturation,
                             server_args=args.server_arg, workdir=workdir, tag=args.tag, store=url,
                             instances=2 if kind == "postgresql-2" else 1, extra_pids=pids)
    finally:
        if cluster is not None:
            cluster.destroy()
    res = runs[kinds[0]] if len(kinds) == 1 else {"runs": runs}
    if args.baseline:
        res["disk"] = run_disk_baseline(args.duration)
        res["baseline"] = run_baseline([float(x) for x in args.rates.split(",") if x], args.duration,
                                       client=client, concurrency=args.concurrency,
                                       saturation=not args.no_saturation)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


# --------------------------------------------------------------------------- pytest-benchmark


def test_settle_roundtrip(benchmark, tmp_path):
    """One Settle call (closed loop, blocking client): the per-call cost, for the record."""
    import grpc

    registry = tmp_path / "persons.parquet"
    write_registry(registry, 6000, seed=3)
    payloads = make_payloads(6000, seed=3, tag="rt")
    proc, port = start_server(tmp_path / "store.db", registry)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = ch.unary_unary(METHOD)
        it = iter(payloads)
        call(next(it), timeout=10)
        benchmark.pedantic(lambda: call(next(it), timeout=10), rounds=2000, iterations=1, warmup_rounds=50)
        ch.close()
    finally:
        stop_server(proc)


def test_writer_group_of_16(benchmark, tmp_path):
    """One group commit of 16 settlements of different persons, without gRPC: lookups, one
    engine chunk, responses, one SQLite transaction (WAL, synchronous=FULL)."""
    import engine

    from server._proto import settlement_pb2 as pb
    from server.app import import_registry
    from server.batcher import SETTLE, GroupWriter, Pending
    from server.core import Core
    from server.store import SQLiteStore

    registry = tmp_path / "persons.parquet"
    write_registry(registry, 20000, seed=5)
    claims = [pb.SettleRequest.FromString(p).claim for p in make_payloads(20000, seed=5, tag="wg")]
    store = SQLiteStore(str(tmp_path / "store.db"))
    import_registry(store, str(registry))
    gw = GroupWriter(store, Core(engine.load_policies(None)))
    pos = [0]

    def group():
        # 16 claims of 16 different persons
        items, seen = [], set()
        while len(items) < 16:
            c = claims[pos[0]]
            pos[0] += 1
            if c.person_id not in seen:
                seen.add(c.person_id)
                items.append(Pending(SETTLE, c))
        return (items,), {}

    benchmark.pedantic(gw.process, setup=group, rounds=300, warmup_rounds=10)
    assert gw.stats["settled"] >= 16 and gw.stats["commit_failures"] == 0
    store.close()


def test_open_loop_short(benchmark, tmp_path):
    """A short open-loop run at 1,000/s (3 s) through the load runner, for the record."""
    res = {}

    def go():
        res.update(run(rates=(1000,), duration=3.0, saturation=False, workdir=str(tmp_path),
                       client=make_client(log=lambda *_: None), log=lambda *_: None)["rates"][0])

    benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["errors"] == 0


if __name__ == "__main__":
    sys.exit(main())
