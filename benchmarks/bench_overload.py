"""Overload: what the server answers, how fast, and how much memory it holds when
offered more than it can settle, for a sustained period (issue 15, part 4).

    python benchmarks/bench_overload.py --rate 5000 --duration 60 --clients 2
    python benchmarks/bench_overload.py ... --server-arg=--max-in-flight --server-arg=1000000   # admission off

Starts `python -m server` like benchmarks/bench_server.py (fresh store, the
registry of engine.generate's claims), then `--clients` Python processes offer
`--rate` Settle calls per second between them (open loop: call i is sent at its
due time whatever happened to earlier ones) for `--duration` seconds, while
the server's resident memory (its process and the writer's, from /proc) is
sampled every second. Reported: calls answered per gRPC status; latency of
accepted and of refused calls from the moment each was sent (so a lagging
client does not count against the server); the server's RSS at start, peak
and end. The Python client costs about 0.3 ms of CPU per call: on a small
machine the offered rate is bounded by it (the achieved send rate is shown).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_server import (METHOD, _tree, build_loadgen, CClient, make_payloads, start_server,  # noqa: E402
                          stop_server, write_registry)


def rss_bytes(pid: int) -> int:
    """Resident memory of the server process and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def _offer(target: str, payloads: list, start_at: float, phase: float, stride: float):
    import grpc

    n = len(payloads)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    code = np.full(n, -1, dtype=np.int32)
    async with grpc.aio.insecure_channel(target) as ch:
        await ch.channel_ready()
        call = ch.unary_unary(METHOD)
        clock = time.perf_counter
        left = [n]
        finished = asyncio.get_running_loop().create_future()

        def cb_for(i):
            def cb(c):
                done[i] = clock()
                left[0] -= 1
                if left[0] == 0 and not finished.done():
                    finished.set_result(None)
            return cb

        calls = []
        while clock() < start_at:
            await asyncio.sleep(min(0.01, start_at - clock()))
        base = start_at + phase
        i = 0
        while i < n:
            now = clock()
            while i < n and base + i * stride <= now:
                sent[i] = clock()
                c = call(payloads[i], timeout=30)
                c.add_done_callback(cb_for(i))
                calls.append(c)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, base + i * stride - clock()))
        try:
            await asyncio.wait_for(finished, 60)
        except asyncio.TimeoutError:
            pass
        for k, c in enumerate(calls):
            if c.done():
                code[k] = (await c.code()).value[0]
    return sent, done, code


def refusal_texts(stderr: str, status) -> dict:
    """{"STATUS: text with digits as N": count} of the non-OK answers, from loadgen's MSG lines."""
    import grpc

    names = {c.value[0]: c.name for c in grpc.StatusCode}
    out: dict = {}
    for line in stderr.splitlines():
        if not line.startswith("MSG "):
            continue
        _, i, text = line.split(" ", 2)
        code = int(status[int(i)])
        if code in (0, -1):
            continue
        key = f"{names.get(code, code)}: {re.sub(r'[0-9]+', 'N', text)[:90]}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _proc(args):
    return asyncio.run(_offer(*args))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=5000.0, help="offered Settle calls per second (all clients)")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=2, help="Python client processes sharing the rate")
    ap.add_argument("--client", choices=("auto", "c", "python"), default="auto",
                    help="benchmarks/loadgen.c (about 0.05 ms of CPU per call; when it builds) or the Python client")
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--messages", action="store_true",
                    help="C client: count the refused calls by status and message text (digits as N), to tell "
                         "admission's refusals (retry advice) from gRPC's")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    import grpc

    work = Path(tempfile.mkdtemp(prefix="medsettle-overload-"))
    n = int(args.rate * args.duration)
    write_registry(work / "persons.parquet", n, seed=11)
    payloads = make_payloads(n, seed=11, tag=f"o{int(time.time())}")
    proc, port = start_server(work / "store.db", work / "persons.parquet", args.server_arg)
    target = f"127.0.0.1:{port}"
    samples = []
    stop = threading.Event()
    texts = None

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_bytes(proc.pid)))
            stop.wait(1.0)

    try:
        rss0 = rss_bytes(proc.pid)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        exe = build_loadgen() if args.client in ("auto", "c") else None
        if exe is not None:  # due times are kept by the C client itself: latency from due time
            if args.messages:
                os.environ["LOADGEN_MESSAGES"] = "1"
            cc = CClient(exe)
            res, _ = cc.run(target, payloads, args.rate, timeout_s=30.0)
            if args.messages:
                texts = refusal_texts(cc.last_stderr, res["grpc_status"])
            ok = res["done_ns"] >= 0
            code = np.where(ok & (res["http_status"] == 200), res["grpc_status"], -1).astype(np.int32)
            parts = [(res["due_ns"] / 1e9, np.where(ok, res["done_ns"] / 1e9, np.nan), code)]
            client = "c"
        else:
            start_at = time.perf_counter() + 1.0
            k = args.clients
            jobs = [(target, payloads[j::k], start_at, j / args.rate, k / args.rate) for j in range(k)]
            with mp.get_context("fork").Pool(k) as pool:
                parts = pool.map(_proc, jobs)
            client = "python"
        stop.set()
        t.join()
        rss_end = rss_bytes(proc.pid)
    finally:
        stop.set()
        stop_server(proc)
    sent = np.concatenate([p[0] for p in parts])
    done = np.concatenate([p[1] for p in parts])
    code = np.concatenate([p[2] for p in parts])
    lat = (done - sent) * 1000.0
    names = {c.value[0]: c.name for c in grpc.StatusCode}
    span = np.nanmax(sent) - np.nanmin(sent)
    out = {"client": client, "offered_per_s": args.rate, "sent_per_s": float(np.sum(~np.isnan(sent)) / span), "calls": n,
           "duration_s": args.duration, "server_args": args.server_arg,
           "by_status": {names.get(int(c), "NO_ANSWER"): int((code == c).sum()) for c in np.unique(code)},
           "rss_mb": {"start": rss0 / 2**20, "peak": max(r for _, r in samples) / 2**20, "end": rss_end / 2**20}}
    for label, mask in (("accepted", code == 0), ("refused", code == 8), ("cancelled", code == 1)):
        v = lat[mask & ~np.isnan(lat)]
        if len(v):
            out[label] = {"count": int(len(v)), "per_s": float(len(v) / span), "p50_ms": float(np.percentile(v, 50)),
                          "p99_ms": float(np.percentile(v, 99)), "max_ms": float(v.max())}
    if texts is not None:
        out["refusal_texts"] = texts
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
