"""Throughput benchmarks of the engine (pytest-benchmark records, not timed tests).

    python -m pytest benchmarks/bench_engine.py                       # 1M and 10M claims
    MEDSETTLE_BENCH_SIZES=1000000 python -m pytest benchmarks/bench_engine.py
    python -m pytest benchmarks/bench_engine.py --benchmark-json bench.json -k "kernel or cli"

Claims are generated once per session (engine.generate, seed 2022, 1 % invalid
rows) under the Shuozhou 2022 resident policy alone (the bundled set filtered
to it) into a temporary folder as Parquet (LZ4). Measured, per size:

* `kernel_loop`: the per-claim loop alone (`Settler.run_kernel` over a prepared chunk);
* `policy_lookup`: the version in force per row, as the prepare pass finds it;
* `kernel`: `engine.settle` on an in-memory table (one chunk);
* `settler`: `engine.Settler(...).settle_batch` over 1M-row batches (the streaming path);
* `cli`: `medsettle settle` Parquet to Parquet through `engine.cli.main`, default batch size,
  from an LZ4 claims file (what `medsettle generate` writes) and from a Snappy one;
* `cli_peak_memory`: the same in a child process, closing accumulators written too, its
  peak RSS (`os.wait4`) in extra_info;
* `accumulators`: the closing accumulators of the settled claims (`Settler.accumulators`),
  next to a plain numpy version of the same table;

and on `MEDSETTLE_BENCH_REF_SIZE` claims (default 100,000) the plain-Python
reference (`tests/reference.py`), the kernel on the same claims, and a
vectorized pyarrow/numpy baseline (first layer only, claim axis, no
accumulators: the floor cost of reading the columns and doing the arithmetic).
Every benchmark stores `claims` and `claims_per_s` (from the mean and from the
fastest round) in `extra_info`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from engine.cli import SETTLE_BATCH  # noqa: E402
from engine.generate import write_claims  # noqa: E402

REGION, SCHEME, YEAR = "140600", "resident", 2022  # Shuozhou residents 2022
SEED = 2022
INVALID_RATE = 0.01
BATCH = 1_000_000


def _sizes() -> list[int]:
    text = os.environ.get("MEDSETTLE_BENCH_SIZES", "1000000,10000000")
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip() and int(x.replace("_", "")) > 0]


SIZES = _sizes()
REF_SIZE = int(os.environ.get("MEDSETTLE_BENCH_REF_SIZE", "100000").replace("_", ""))
BIG_ROUNDS = int(os.environ.get("MEDSETTLE_BENCH_ROUNDS", "3"))


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else (f"{n // 1000}k" if n % 1000 == 0 else str(n))


def _record(benchmark, n: int, **extra) -> None:
    benchmark.extra_info.update(extra)
    if benchmark.stats is None:  # --benchmark-disable: the code ran once, nothing was timed
        return
    stats = benchmark.stats.stats
    benchmark.extra_info["claims"] = n
    benchmark.extra_info["claims_per_s"] = round(n / stats.mean) if stats.mean else None
    benchmark.extra_info["claims_per_s_best"] = round(n / stats.min) if stats.min else None
    benchmark.extra_info.update(extra)


# --------------------------------------------------------------------------- session data


@pytest.fixture(scope="session")
def policy():
    p = engine.load_policies(None).find(REGION, SCHEME, YEAR)
    if p is None:
        pytest.skip(f"no bundled policy for ({REGION}, {SCHEME}, {YEAR})")
    return p


@pytest.fixture(scope="session")
def ps(policy):
    return engine.PolicySet(policies=(policy,))


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_engine")


@pytest.fixture(scope="session")
def policy_dir(bench_dir, policy, ps):
    """A policy folder with the Shuozhou 2022 file alone, for the command line."""
    d = bench_dir / "policies"
    d.mkdir(exist_ok=True)
    src = Path(policy.path)
    if not src.is_file():
        pytest.skip(f"policy {policy.id}: its file {policy.path!r} is not there")
    shutil.copy(src, d / src.name)
    assert [p.id for p in engine.load_policies(d).policies] == [policy.id]
    return d


class _Data:
    """Claims files and tables per size, generated on first use."""

    def __init__(self, ps, folder: Path):
        self.ps, self.folder = ps, folder
        self._tables: dict[int, pa.Table] = {}

    def path(self, n: int, compression: str = "lz4") -> Path:
        """The claims file of size n, as `medsettle generate` writes it (LZ4) or in another codec."""
        p = self.folder / f"claims_{_label(n)}{'' if compression == 'lz4' else '_' + compression}.parquet"
        if not p.exists():
            write_claims(p, self.ps, n, SEED, INVALID_RATE, block=BATCH, year=YEAR, compression=compression)
        return p

    def table(self, n: int) -> pa.Table:
        if n not in self._tables:
            self._tables.clear()  # one big table in memory at a time
            self._tables[n] = pq.read_table(self.path(n)).combine_chunks()
        return self._tables[n]


@pytest.fixture(scope="session")
def data(ps, bench_dir):
    return _Data(ps, bench_dir)


@pytest.fixture(scope="session")
def reference():
    """tests/reference.py, imported by path."""
    path = ROOT / "tests" / "reference.py"
    if not path.exists():
        pytest.skip("tests/reference.py is missing")
    spec = importlib.util.spec_from_file_location("medsettle_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


big = pytest.mark.parametrize("n", SIZES, ids=[_label(n) for n in SIZES])


# --------------------------------------------------------------------------- the kernel


@big
def test_kernel_loop(benchmark, data, ps, n):
    """The per-claim loop alone (`_kernel.settle`, nogil, one core) over a prepared chunk.

    Column preparation, dedup and ordering happen once outside the timing;
    each round starts from empty accumulators, as a year-end re-settlement does.
    The first calls (untimed by the benchmark, the first one's seconds in
    `extra_info`) also fault in the output arrays, fresh memory which a process
    streaming chunk after chunk takes back from Arrow's pool; two sets of
    outputs, as a round runs while the last round's result is still held. The
    rounds measure that steady state.
    """
    settler = engine.Settler(ps)
    chunk = settler.prepare(data.table(n))
    empty_state = settler._state.copy()

    def fresh_state():
        settler._state[...] = empty_state
        return (chunk,), {}

    fresh_state()
    t0 = time.perf_counter()
    warm = [settler.run_kernel(chunk)]
    first = time.perf_counter() - t0
    fresh_state()
    warm.append(settler.run_kernel(chunk))
    del warm
    out = benchmark.pedantic(settler.run_kernel, setup=fresh_state, rounds=BIG_ROUNDS, iterations=1)
    _record(benchmark, n, ok=int((out.status == 0).sum()), first_call_s=round(first, 3))


@big
def test_policy_lookup(benchmark, data, ps, n):
    """The prepare pass's policy lookup alone: the version in force per row from (region,
    scheme, settle_time), as `PreparedClaims` does it (issue 14: it must stay cheap)."""
    from engine.arrow_io import _codes, _policy_index
    from engine.schema import SCHEMES

    table = data.table(n)
    c = engine.Settler(ps).compiled
    region = _codes(table.column("region").chunk(0), c.names.region_names)
    scheme = _codes(table.column("scheme").chunk(0), SCHEMES)
    micros = np.asarray(table.column("settle_time").chunk(0).cast(pa.int64()).fill_null(0))
    policy, _ = benchmark.pedantic(_policy_index, args=(region, scheme, micros, c), rounds=BIG_ROUNDS * 3,
                                   iterations=1)
    _record(benchmark, n, unknown_policy=int((policy < 0).sum()))


@big
def test_kernel(benchmark, data, ps, n):
    """`engine.settle` on an in-memory table: preparation, dedup, ordering, the loop, results."""
    table = data.table(n)
    res = benchmark.pedantic(engine.settle, args=(table, ps), rounds=BIG_ROUNDS, iterations=1)
    ok = pc.sum(pc.equal(res.results.column("status"), "ok")).as_py()
    _record(benchmark, n, ok=ok)


@big
def test_settler(benchmark, data, ps, n):
    batches = data.table(n).to_batches(max_chunksize=BATCH)

    def run():
        s = engine.Settler(ps)
        rows = 0
        for b in batches:
            rows += s.settle_batch(b).num_rows
        s.accumulators()
        return rows

    assert benchmark.pedantic(run, rounds=BIG_ROUNDS, iterations=1) == n
    _record(benchmark, n, batch=BATCH)


# --------------------------------------------------------------------------- the command line


@big
@pytest.mark.parametrize("codec", ["lz4", "snappy"])
def test_cli(benchmark, data, policy_dir, bench_dir, n, codec, capsys):
    """From a claims file in LZ4 (as `medsettle generate` writes) and in Snappy (as many
    exporters do, and as pyarrow does by default): the same claims, a slower read."""
    from engine.cli import main

    src = data.path(n, codec)
    out = bench_dir / f"results_{_label(n)}.parquet"

    def run():
        return main(["settle", str(src), "-o", str(out), "--policies", str(policy_dir)])

    assert benchmark.pedantic(run, rounds=BIG_ROUNDS, iterations=1) == 0
    capsys.readouterr()
    assert pq.ParquetFile(out).metadata.num_rows == n
    _record(benchmark, n, batch=SETTLE_BATCH, input_mb=round(src.stat().st_size / 1e6, 1), input_codec=codec)


# Run in a small intermediate process: a child forked straight from this (big) pytest process would
# count the parent's pages in its ru_maxrss until it execs.
_WAITER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.perf_counter() - t0)
"""


def run_cli_child(argv: list[str]) -> tuple[int, int, float]:
    """`medsettle ARGV` in a child process: (exit code, peak RSS in bytes, seconds)."""
    code = "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _WAITER, sys.executable, "-c", code, *argv], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssertionError(f"medsettle {' '.join(argv)}: {proc.stderr}")
    exit_code, maxrss, seconds = proc.stdout.split()
    if int(exit_code) != 0:
        raise AssertionError(f"medsettle {' '.join(argv)} exited {exit_code}: {proc.stderr}")
    rss = int(maxrss) * (1 if sys.platform == "darwin" else 1024)  # bytes
    return int(exit_code), rss, float(seconds)


@big
def test_cli_peak_memory(benchmark, data, policy_dir, bench_dir, n):
    src = data.path(n)
    out = bench_dir / f"results_mem_{_label(n)}.parquet"
    argv = ["settle", str(src), "-o", str(out), "--policies", str(policy_dir),
            "--accumulators-out", str(bench_dir / f"accumulators_mem_{_label(n)}.parquet")]
    result = {}

    def run():
        result["code"], result["rss"], result["seconds"] = run_cli_child(argv)

    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, n, peak_rss_mb=round(result["rss"] / 2**20, 1), batch=SETTLE_BATCH,
            note="child process wall time, interpreter start and imports included")


# --------------------------------------------------------------------------- closing accumulators


@pytest.fixture(scope="session")
def settled(data, ps):
    """A Settler that has settled n claims, one size at a time (a 10M one holds 1.2 GB)."""
    held: dict = {}

    def get(n: int) -> engine.Settler:
        if n not in held:
            held.clear()
            s = engine.Settler(ps, expected_claims=n)
            for _ in s.settle_batches(data.table(n).to_batches(max_chunksize=SETTLE_BATCH)):
                pass
            held[n] = s
        return held[n]

    return get


def _numpy_accumulators(settler: engine.Settler) -> pa.Table:
    """The simplest vectorized version of `Settler.accumulators()` (no carried values aside):
    every key's columns gathered out of the compact rows, then masks and fancy indexing."""
    from engine.arrow_io import ACCUMULATORS_SCHEMA, LAYER_ENTRY

    c = settler.compiled
    starts, arena = settler._keys.export()
    count = len(starts) - 1
    state = settler._state[:count]
    policy = np.ascontiguousarray(arena[(starts[:-1, None] + np.arange(4)).ravel()]).view(np.int32)
    acc = c.acc_values(state, policy)
    keep = np.nonzero((state[:, 0] != 0) | (state[:, 1] != 0) | (acc != 0).any(axis=(1, 2)))[0]
    lengths = (starts[1:] - starts[:-1] - 4)[keep]
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = arena[np.repeat(starts[keep] + 4 - offsets[:-1], lengths) + np.arange(offsets[-1])]
    person = pa.LargeStringArray.from_buffers(len(keep), pa.py_buffer(offsets), pa.py_buffer(data))
    values, pol = acc[keep], policy[keep]
    nonzero = (values != 0).any(axis=2)
    rows, cols = np.nonzero(nonzero)
    entry_offsets = np.zeros(len(keep) + 1, dtype=np.int32)
    np.cumsum(nonzero.sum(axis=1), out=entry_offsets[1:])
    code = pol[rows].astype(np.int64) * c.acc_width + cols
    layer, cap = c.names.acc_layer_codes[code], c.names.acc_cap_codes[code]
    entries = pa.StructArray.from_arrays(
        [c.names.acc_layer_names.take(pa.array(layer)), c.names.acc_cap_names.take(pa.array(cap, mask=cap < 0)),
         *(pa.array(values[rows, cols, f]) for f in range(3))], fields=list(LAYER_ENTRY))
    pol_arr = pa.array(pol)
    return pa.table([person.cast(pa.string()), c.names.regions.take(pol_arr), c.names.schemes.take(pol_arr),
                     pa.array(c.names.years[pol]), pa.array(state[keep, 0]), pa.array(state[keep, 1]),
                     pa.ListArray.from_arrays(pa.array(entry_offsets), entries, type=pa.list_(LAYER_ENTRY))],
                    schema=ACCUMULATORS_SCHEMA)


@big
@pytest.mark.parametrize("impl", ["kernel", "numpy"])
def test_accumulators(benchmark, settled, n, impl):
    """The closing accumulators of n settled claims (what `--accumulators-out` writes and a
    year-end clearing carries into the next call): `Settler.accumulators()`, two Cython
    passes over the state rows, next to the simplest numpy version of the same table."""
    settler = settled(n)
    fn = settler.accumulators if impl == "kernel" else (lambda: _numpy_accumulators(settler))
    table = benchmark.pedantic(fn, rounds=BIG_ROUNDS, iterations=1)
    if impl == "numpy":
        assert table.equals(settler.accumulators())
    _record(benchmark, n, keys=table.num_rows, implementation=impl)


# --------------------------------------------------------------------------- reference and baseline


@pytest.fixture(scope="session")
def small(ps):
    from engine.generate import generate_claims

    return generate_claims(ps, REF_SIZE, SEED, INVALID_RATE, year=YEAR)


def test_reference(benchmark, reference, ps, small):
    rows = small.to_pylist()
    results, _ = benchmark.pedantic(reference.settle, args=(ps, rows), rounds=1, iterations=1)
    assert len(results) == REF_SIZE
    _record(benchmark, REF_SIZE, implementation="tests/reference.py (plain Python)")


def test_kernel_reference_size(benchmark, ps, small):
    benchmark.pedantic(engine.settle, args=(small, ps), rounds=5, iterations=1)
    _record(benchmark, REF_SIZE)


def _first_layer_tables(policy):
    """Deductible (fen) and ratio (bp) per (visit_type, facility_level) of the first claim-axis
    one-ratio rule of the first layer whose match is about visit type / facility level only."""
    from engine.model import FACILITY_LEVELS, KIND_CLASS_RATIO, KIND_SEGMENTS, VISIT_TYPES

    ded = np.zeros((len(VISIT_TYPES) + 1, len(FACILITY_LEVELS) + 1), dtype=np.int64)
    ratio = np.zeros_like(ded)
    for i, v in enumerate(VISIT_TYPES):
        for j, f in enumerate(FACILITY_LEVELS):
            for r in policy.layers[0].rules:
                m = r.match
                if (m.visit_type is None or v in m.visit_type) and (m.facility_level is None or f in m.facility_level):
                    if r.kind == KIND_SEGMENTS:
                        ded[i, j], ratio[i, j] = r.deductible, r.segments[0].ratio
                    elif r.kind == KIND_CLASS_RATIO:
                        ratio[i, j] = r.class_ratio[0]
                    break
    return ded, ratio


def baseline_first_layer(table: pa.Table, policy) -> int:
    """Vectorized floor: first layer, claim axis, first segment ratio, no accumulators or caps."""
    from engine.model import FACILITY_LEVELS, VISIT_TYPES

    ded, ratio = _first_layer_tables(policy)

    def codes(col, names):
        enc = pc.index_in(col, value_set=pa.array(names))
        return enc.fill_null(len(names)).to_numpy()

    v = codes(table.column("visit_type"), list(VISIT_TYPES))
    f = codes(table.column("facility_level"), list(FACILITY_LEVELS))
    base = table.column("in_scope_amount").fill_null(0).to_numpy()
    d = ded[v, f]
    elig = np.maximum(base - d, 0)
    pay = (elig * ratio[v, f] + 5000) // 10000  # round half up, integers only
    return int(pay.sum())


def test_baseline_numpy(benchmark, policy, small):
    total = benchmark.pedantic(baseline_first_layer, args=(small, policy), rounds=5, iterations=1)
    assert total > 0
    _record(benchmark, REF_SIZE, implementation="vectorized numpy, first layer only (a floor, not a settlement)")


@big
def test_baseline_numpy_big(benchmark, policy, data, n):
    table = data.table(n)
    benchmark.pedantic(baseline_first_layer, args=(table, policy), rounds=BIG_ROUNDS, iterations=1)
    _record(benchmark, n, implementation="vectorized numpy, first layer only (a floor, not a settlement)")
