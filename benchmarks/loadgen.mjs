// Open-loop gRPC load generator on Node's built-in HTTP/2 (no packages to install).
//
//   node benchmarks/loadgen.mjs --target 127.0.0.1:50051 --method /medsettle.v1.Settlement/Settle \
//        --payloads FILE --rate 2000 [--start-in-ms 500] [--out FILE]
//
// FILE holds the request messages, each as <u32 little-endian length><protobuf bytes>.
// Request i is due at start + i / rate whatever happened to earlier ones; its latency
// is measured from that due time to the end of its response (trailers), so a stalled
// server or client shows up in the figures. The output (stdout or --out) is JSON:
// {"latency_ms": [...], "grpc_status": [...], "cpu_s": client CPU seconds, "elapsed_s"}.
//
// Why Node: the load client shares the machine's two cores with the server, and a
// Python grpc.aio client costs about as much CPU per call as the server it measures.
// gRPC over HTTP/2 is a POST with a 5-byte length prefix and a grpc-status trailer.
import http2 from "node:http2";
import fs from "node:fs";
import { performance } from "node:perf_hooks";

function parseArgs(argv) {
  const out = { startInMs: 500, timeoutMs: 60000 };
  for (let i = 2; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    out[k] = argv[i + 1];
  }
  for (const k of ["target", "method", "payloads", "rate"]) {
    if (out[k] === undefined) {
      process.stderr.write(`loadgen: --${k} is required\n`);
      process.exit(2);
    }
  }
  out.rate = Number(out.rate);
  out.startInMs = Number(out.startInMs);
  out.timeoutMs = Number(out.timeoutMs);
  return out;
}

function readPayloads(path) {
  const buf = fs.readFileSync(path);
  const frames = [];
  let pos = 0;
  while (pos + 4 <= buf.length) {
    const n = buf.readUInt32LE(pos);
    const frame = Buffer.allocUnsafe(5 + n);
    frame[0] = 0; // not compressed
    frame.writeUInt32BE(n, 1);
    buf.copy(frame, 5, pos + 4, pos + 4 + n);
    frames.push(frame);
    pos += 4 + n;
  }
  if (pos !== buf.length) throw new Error(`${path}: truncated payload file`);
  return frames;
}

const args = parseArgs(process.argv);
const frames = readPayloads(args.payloads);
const n = frames.length;
const latency = new Float64Array(n).fill(NaN);
const status = new Int32Array(n).fill(-1);
const headers = {
  ":method": "POST",
  ":path": args.method,
  "content-type": "application/grpc",
  te: "trailers",
  "grpc-timeout": `${Math.ceil(args.timeoutMs / 1000)}S`,
};

const session = http2.connect(`http://${args.target}`, { settings: { enablePush: false } });
session.on("error", (e) => {
  process.stderr.write(`loadgen: ${e.message}\n`);
});

let remaining = n;
let finish;
const finished = new Promise((resolve) => (finish = resolve));

function send(i, due) {
  const req = session.request(headers);
  let code = -1;
  req.on("response", (h) => {
    if (h["grpc-status"] !== undefined) code = Number(h["grpc-status"]); // trailers-only answer
  });
  req.on("trailers", (t) => {
    if (t["grpc-status"] !== undefined) code = Number(t["grpc-status"]);
  });
  req.on("data", () => {});
  const done = () => {
    if (status[i] !== -1 || !Number.isNaN(latency[i])) return;
    latency[i] = performance.now() - due;
    status[i] = code === -1 ? 14 : code; // no status: UNAVAILABLE
    if (--remaining === 0) finish();
  };
  req.on("close", done);
  req.on("error", done);
  req.end(frames[i]);
}

await new Promise((resolve, reject) => {
  session.once("connect", resolve);
  session.once("error", reject);
});

const cpu0 = process.cpuUsage();
const start = performance.now() + args.startInMs;
const stride = 1000 / args.rate;
let next = 0;

function tick() {
  const now = performance.now();
  while (next < n && start + next * stride <= now) {
    send(next, start + next * stride);
    next++;
  }
  if (next < n) setTimeout(tick, Math.max(0, start + next * stride - performance.now()));
}
if (n === 0) finish();
else tick();

const timer = setTimeout(() => finish(), (n / args.rate) * 1000 + args.startInMs + args.timeoutMs);
await finished;
clearTimeout(timer);
const cpu = process.cpuUsage(cpu0);
session.close();

const out = JSON.stringify({
  latency_ms: Array.from(latency, (x) => (Number.isNaN(x) ? null : x)),
  grpc_status: Array.from(status),
  cpu_s: (cpu.user + cpu.system) / 1e6,
  elapsed_s: (performance.now() - start) / 1000,
});
if (args.out) fs.writeFileSync(args.out, out);
else process.stdout.write(out);
