"""What the command line's finishing costs over the settlement it wraps (issue 13: status_detail,
`--keep-columns` and the office summary must cost nothing measurable).

    python -m pytest benchmarks/bench_cli.py                                # 1M claims
    MEDSETTLE_BENCH_CLI_SIZE=100000 python -m pytest benchmarks/bench_cli.py --benchmark-json cli.json

The claims are the README's main job: `medsettle generate --claims N --seed 1 --invalid-rate
0.01` with the bundled policies. Each round runs in a child process (interpreter start and
imports included, as a user runs it), and the variants take turns round by round, so that a
shared, noisy machine slows them alike:

* `floor`: the same streamed settlement (`Settler.settle_batches`, 125k-row batches read
  ahead as the command line reads them, `engine.files.ClaimsFile`: name columns as
  dictionaries, the last batches smaller; written by a background thread with the command
  line's Parquet settings, `engine.files.TableWriter`) with no status_detail, no summary,
  no order check and no all-or-nothing commit: what the command line adds is measured
  against it;
* `floor_keep`: the floor with the claims' person_id, region and settle_time appended to each
  results batch as they are (what writing three more columns costs Parquet, which `keep`
  cannot avoid: 1M person ids, times and regions are about 60 ms of writing);
* `settle`: `medsettle settle CLAIMS -o RESULTS` (status_detail, summary, temporary + rename);
* `keep`: the same with `--keep-columns person_id,region,settle_time`, measured against
  `floor_keep`;
* `base` (when `MEDSETTLE_BENCH_CLI_BASE` names another built tree of this repo, e.g. a
  worktree at an older commit): that tree's `medsettle settle CLAIMS -o RESULTS`, run from
  its folder, to compare two versions of the command line in one run.

Children run with bytecode caching on (as an installed command runs; a session's
PYTHONDONTWRITEBYTECODE would recompile every module at every start) after one warm-up run.

Per variant, extra_info holds the median user+sys CPU seconds of the child (`os.wait4`), the
median wall seconds, the median over rounds of its CPU minus its floor's in the same round
(`cpu_s_over_floor_paired`: a shared machine's load drifts over a run, and the rounds'
differences cancel most of it), and every round's figures; pytest-benchmark's own timing is
of whole rounds (the variants one after the other).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
SIZE = int(os.environ.get("MEDSETTLE_BENCH_CLI_SIZE", "1000000").replace("_", ""))
ROUNDS = int(os.environ.get("MEDSETTLE_BENCH_ROUNDS", "5"))
BASE = os.environ.get("MEDSETTLE_BENCH_CLI_BASE")

# The settlement alone, streamed as `medsettle settle` streams it, results written as they come
# (with the claim columns named after the output appended as they are: `floor_keep`).
_FLOOR = """
import collections, sys, engine
import pyarrow as pa
from engine.cli.settle import SETTLE_BATCH
from engine.arrow_io import results_schema
from engine.files import ClaimsFile, TableWriter
from engine.pipeline import BackgroundWriter, prefetch
claims, out, keep = sys.argv[1], sys.argv[2], sys.argv[3:]
ps = engine.load_policies(None)
f = ClaimsFile(claims, SETTLE_BATCH)
settler = engine.Settler(ps, expected_claims=f.num_rows)
schema = pa.schema([*results_schema(dictionary=True), *(f.schema.field(k) for k in keep)])
w = TableWriter(out, schema, SETTLE_BATCH)
bg = BackgroundWriter(w.write)
pending = collections.deque()
def tap(batches):
    for b in batches:
        pending.append(b)
        yield b
for res in settler.settle_batches(tap(prefetch(f.batches())), dictionary=True):
    c = pending.popleft()
    for k in keep:
        res = res.append_column(schema.field(k), c.column(k))
    bg.submit(res)
bg.close()
w.close()
"""

_WAITER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, time.perf_counter() - t0)
"""


def _child(argv: list[str], root: Path = ROOT) -> tuple[float, float]:
    """(user+sys CPU s, wall s) of `python ARGV` run in the tree `root`, in a child of a small
    waiter process (so that the child's figures are its own, not this big pytest process's)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, "-c", _WAITER, sys.executable, *argv], capture_output=True, text=True,
                         env=env, cwd=root, check=True).stdout.split()
    code, cpu, wall = int(out[0]), float(out[1]), float(out[2])
    assert code == 0, argv
    return cpu, wall


@pytest.fixture(scope="module")
def claims(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bench_cli")
    path = d / "claims.parquet"
    subprocess.run([sys.executable, "-m", "engine.cli", "generate", "-o", str(path), "--claims", str(SIZE),
                    "--seed", "1", "--invalid-rate", "0.01"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return path


KEEP = ("person_id", "region", "settle_time")
VARIANTS = {
    "floor": lambda c, out: ["-c", _FLOOR, str(c), str(out)],
    "floor_keep": lambda c, out: ["-c", _FLOOR, str(c), str(out), *KEEP],
    "settle": lambda c, out: ["-m", "engine.cli", "settle", str(c), "-o", str(out)],
    "keep": lambda c, out: ["-m", "engine.cli", "settle", str(c), "-o", str(out),
                            "--keep-columns", ",".join(KEEP)],
}
if BASE:
    VARIANTS["base"] = VARIANTS["settle"]
FLOOR_OF = {"keep": "floor_keep"}  # each variant is measured against the floor that writes what it writes


def test_settle_side_by_side(benchmark, claims):
    """Every variant once per round, in turn; pytest-benchmark times whole rounds (all of them),
    extra_info has each variant's medians and the CPU it adds over `floor`."""
    figures: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}

    for name, argv in VARIANTS.items():  # warm-up: bytecode written, files cached
        root = Path(BASE).resolve() if name == "base" else ROOT
        _child(argv(claims, claims.parent / f"results_{name}.parquet"), root)

    def one_round():
        for name, argv in VARIANTS.items():
            out = claims.parent / f"results_{name}.parquet"
            root = Path(BASE).resolve() if name == "base" else ROOT
            figures[name].append(_child(argv(claims, out), root))
            assert pq.ParquetFile(out).metadata.num_rows == SIZE

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    cpu = {v: statistics.median(c for c, _ in rounds) for v, rounds in figures.items()}
    wall = {v: statistics.median(w for _, w in rounds) for v, rounds in figures.items()}
    benchmark.extra_info.update(claims=SIZE, rounds=ROUNDS)
    # what a variant adds, round by round: the difference to the floor of the same round (the
    # load of a shared machine drifts over a run; the rounds' differences cancel most of it)
    paired = {v: statistics.median(c - f for (c, _), (f, _) in zip(rounds, figures[FLOOR_OF.get(v, "floor")]))
              for v, rounds in figures.items()}
    for v, rounds in figures.items():
        floor = FLOOR_OF.get(v, "floor")
        benchmark.extra_info[v] = {"cpu_s_median": round(cpu[v], 3), "wall_s_median": round(wall[v], 3),
                                   "floor": floor, "cpu_s_over_floor": round(cpu[v] - cpu[floor], 3),
                                   "cpu_s_over_floor_paired": round(paired[v], 3),
                                   "cpu_s": [round(c, 3) for c, _ in rounds],
                                   "wall_s": [round(w, 3) for _, w in rounds]}
        print(f"\n{v:>10}: {SIZE:,} claims, {ROUNDS} rounds in turn: median CPU {cpu[v]:.3f} s "
              f"({cpu[v] - cpu[floor]:+.3f} over {floor}; {paired[v]:+.3f} the median of the rounds' own), "
              f"wall {wall[v]:.3f} s", end="")
    print()


INSTRUCTIONS = os.environ.get("MEDSETTLE_BENCH_INSTRUCTIONS", "") not in ("", "0")


@pytest.mark.skipif(not INSTRUCTIONS, reason="set MEDSETTLE_BENCH_INSTRUCTIONS=1 (needs valgrind; ~2 min per "
                                             "variant at 1M claims)")
def test_instructions_side_by_side(benchmark, claims):
    """Each variant once under callgrind: instructions executed, which a shared machine's load
    does not change (the same count twice to within 0.05 %), so that a difference of 1 % is
    seen where CPU seconds vary by 10 % from run to run. OPENBLAS_NUM_THREADS=1: NumPy's
    BLAS threads spin for a while after start, a count that varies and that no variant causes."""
    counts: dict[str, int] = {}

    def one_round():
        for name, argv in VARIANTS.items():
            root = Path(BASE).resolve() if name == "base" else ROOT
            out = claims.parent / f"results_{name}.parquet"
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            subprocess.run([sys.executable, *argv(claims, out)], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL)  # bytecode written, files cached
            err = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                                  *argv(claims, out)], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True).stderr
            counts[name] = int(next(line for line in err.splitlines() if "Collected" in line).split()[-1])

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    benchmark.extra_info.update(claims=SIZE, instructions=counts)
    for v, n in counts.items():
        floor = FLOOR_OF.get(v, "floor")
        over = n - counts[floor]
        print(f"\n{v:>10}: {SIZE:,} claims: {n / 1e6:,.1f} M instructions ({over / 1e6:+,.1f} M, "
              f"{100 * over / counts[floor]:+.2f} % over {floor})", end="")
    print()
