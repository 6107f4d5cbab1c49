"""The `medsettle` command line.

    medsettle settle CLAIMS [--policies DIR] -o RESULTS [--accumulators-in A] [--accumulators-out B]
                     [--batch-size N] [--progress] [--compression lz4|snappy|zstd|none]
    medsettle generate -o CLAIMS --claims N --seed S [--invalid-rate R] [--policies DIR]
                       [--persons PERSONS.parquet] [--year Y] [--block N] [--label] [--progress]
                       [--compression lz4|snappy|zstd|none]
    medsettle policies check [DIR]
    medsettle explain CLAIMS [--policies DIR] --claim-id ID [--accumulators-in A]
    medsettle serve ...            (the gRPC server: `server.app`)

Files are Parquet (`.parquet`, `.pq`), Arrow IPC (`.arrow`, `.feather`, `.ipc`) or CSV
(`.csv`), by extension. CSV claims are read with the column types of
`engine.CLAIMS_SCHEMA`, `identities` being a `;`-separated list (empty = none);
claims columns that differ from the schema only in representation (large
strings or lists, a time-zone-free timestamp in ns/ms/s) are cast; any other
type difference is the engine's schema error;
CSV results write `layer_pays` as `layer:pay;layer:pay`. Accumulators are
Parquet or Arrow IPC only (nested columns).

A claims file is one settlement call. It is streamed in batches of
`--batch-size` rows (the last ones smaller), results written as they come,
while its batches are in (settle_time, claim_id) order across their
boundaries (checked as they come); the first batch that is not stops the
stream and the file is settled again whole, as one chunk, which is said on
stderr. Errors are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.schema import format_yuan

PROG = "medsettle"
DEFAULT_BATCH = 1_000_000
# Streamed settlement: small enough that reading, settling and writing overlap even
# for a 1M-row file (filling and draining the pipeline is one batch's work on one core:
# 1M claims in 0.51 s with 125k-row batches, 0.66 s with 250k) and peak memory stays
# lower (1.3 vs 1.5 GB at 10M), large enough that per-batch costs stay small (10M
# claims: 4.7-4.9 s with 125k, 4.6-6.5 s with 250k).
SETTLE_BATCH = 125_000
FUND_FIELDS = ("basic_pay", "supplementary_pay", "critical_illness_pay", "medical_aid_pay", "guarantee_pay")
SUMMARY_AMOUNTS = (*FUND_FIELDS, "fund_pay_total", "personal_pay", "compliant_personal_pay",
                   "deductible_applied")

PARQUET_EXT = (".parquet", ".pq", ".parq")
IPC_EXT = (".arrow", ".feather", ".ipc", ".arrows")
CSV_EXT = (".csv",)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# =========================================================================== file formats


def file_format(path) -> str:
    """'parquet', 'ipc' or 'csv' from the file name."""
    ext = Path(path).suffix.lower()
    if ext in PARQUET_EXT:
        return "parquet"
    if ext in IPC_EXT:
        return "ipc"
    if ext in CSV_EXT:
        return "csv"
    raise CliError(f"{path}: unknown file type {ext or '(none)'!r}; use .parquet, .arrow/.feather/.ipc or .csv")


def _concat_batches(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    if hasattr(pa, "concat_batches"):
        return pa.concat_batches(batches)
    t = pa.Table.from_batches(batches).combine_chunks()
    return t.to_batches()[0]


def rebatch(batches: Iterable[pa.RecordBatch], size: Union[int, Iterable[int]]) -> Iterator[pa.RecordBatch]:
    """The same rows in batches of exactly `size` rows (the last one shorter), or of the
    successive sizes an iterable gives (the last size repeated if it runs out)."""
    sizes = iter([size] if isinstance(size, int) else size)
    want = next(sizes, 1)
    buf: list[pa.RecordBatch] = []
    rows = 0
    for b in batches:
        while b.num_rows:
            take = min(want - rows, b.num_rows)
            buf.append(b.slice(0, take))
            rows += take
            b = b.slice(take)
            if rows == want:
                yield _concat_batches(buf)
                buf, rows = [], 0
                want = next(sizes, want)
    if rows:
        yield _concat_batches(buf)


TAIL_MIN = 8192


def tail_sizes(size: int, total: Optional[int]) -> Iterator[int]:
    """Batch sizes for a stream of `total` rows (None: not known): `size`, the last
    2 x size rows in halves down to size/8 (at least TAIL_MIN rows).

    The writer is the last stage of the pipeline and the heaviest: whatever it
    still has to write when the rest is done, it writes on one core. Small last
    batches leave it little (1M claims: the last 0.1 s had only the writer busy).
    """
    floor = min(size, max(TAIL_MIN, size // 8))
    done = 0
    while total is None or done < total:
        remaining = None if total is None else total - done
        if remaining is not None and remaining <= 2 * size:
            b = remaining if remaining <= floor else min(size, max(floor, (remaining + 1) // 2))
        else:
            b = size
        yield b
        done += b


# --------------------------------------------------------------------------- CSV conversions


def _join_list(arr: pa.Array, sep: str = ";") -> pa.Array:
    return pc.binary_join(arr, sep)


def _split_list(arr: pa.Array, sep: str = ";") -> pa.Array:
    """`a;b` -> [a, b]; empty -> []; null -> null."""
    arr = pc.utf8_trim_whitespace(arr)
    parts = pc.split_pattern(arr, sep)
    empty = pa.scalar([], pa.list_(pa.string()))
    return pc.if_else(pc.equal(arr, ""), empty, parts)


def _layer_pays_to_text(arr: pa.Array) -> pa.Array:
    """list<struct<layer, pay>> -> 'layer:pay;layer:pay' (null -> null)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    flat = arr.flatten()
    items = pc.binary_join_element_wise(flat.field("layer"), pc.cast(flat.field("pay"), pa.string()), ":")
    offsets = arr.offsets
    if arr.offset or len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    lists = pa.ListArray.from_arrays(offsets, items, mask=arr.is_null())
    return pc.binary_join(lists, ";")


def _text_to_layer_pays(arr: pa.Array, type_: pa.DataType) -> pa.Array:
    rows = arr.to_pylist()
    out = []
    for r in rows:
        if r is None:
            out.append(None)
            continue
        items = []
        for part in filter(None, r.split(";")):
            layer, _, pay = part.rpartition(":")
            items.append({"layer": layer, "pay": int(pay)})
        out.append(items)
    return pa.array(out, type_)


def to_csv_table(table: pa.Table) -> pa.Table:
    """Nested columns as text: list<string> -> 'a;b', layer_pays -> 'layer:pay;...'."""
    cols, fields = [], []
    for f, col in zip(table.schema, table.columns):
        t = f.type
        if pa.types.is_list(t) and pa.types.is_string(t.value_type):
            col = pa.chunked_array([_join_list(c) for c in col.chunks], pa.string())
        elif f.name == "layer_pays" and pa.types.is_list(t) and pa.types.is_struct(t.value_type):
            col = pa.chunked_array([_layer_pays_to_text(c) for c in col.chunks], pa.string())
        elif pa.types.is_nested(t):
            raise CliError(f"column {f.name!r} ({t}) cannot be written as CSV; use .parquet or .arrow")
        cols.append(col)
        fields.append(pa.field(f.name, col.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    return to_csv_table(schema.empty_table()).schema


# --------------------------------------------------------------------------- writers


# Unique ids and amounts gain nothing from dictionary encoding: the writer tries it per page,
# then abandons it, which was a fifth of the time of writing results.
_PLAIN_STRINGS = {"claim_id", "person_id"}


def _leaves(schema: pa.Schema) -> Iterator[tuple[str, pa.DataType, str]]:
    """(Parquet column path, type, field name) of each leaf column, nested ones too."""
    def walk(prefix: str, t: pa.DataType, name: str):
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            yield from walk(f"{prefix}.list.element", t.value_type, name)
        elif pa.types.is_struct(t):
            for f in t:
                yield from walk(f"{prefix}.{f.name}", f.type, f.name)
        else:
            yield prefix, t, name

    for f in schema:
        yield from walk(f.name, f.type, f.name)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet column paths worth dictionary-encoding: the low-cardinality strings, nested ones too."""
    return [path for path, t, name in _leaves(schema)
            if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t))
            and name not in _PLAIN_STRINGS]


def _delta_columns(schema: pa.Schema) -> dict[str, str]:
    """Integer and timestamp leaves, stored with DELTA_BINARY_PACKED: on a million results
    0.03 s less to write than PLAIN, a claims file 19 % smaller and no slower to read."""
    return {path: "DELTA_BINARY_PACKED" for path, t, _ in _leaves(schema)
            if pa.types.is_integer(t) or pa.types.is_timestamp(t)}


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """Leaves given min/max statistics: all but the dictionary-typed names (status, policy,
    identity, layer), where every row group holds nearly every value, so they prune nothing,
    and computing them cost an eighth of the writer's time (0.03 s per million results)."""
    return [path for path, t, _ in _leaves(schema) if not pa.types.is_dictionary(t)]


# LZ4 by default (Arrow writes it as Parquet's LZ4_RAW codec): as small as Snappy on claims
# and results, and faster to read back (3M generated claims: 0.14 s of CPU per million rows
# instead of 0.19); readers from Arrow 9, Spark 3.4, DuckDB and polars on take it. `snappy`
# is there for older readers.
PARQUET_COMPRESSIONS = ("lz4", "snappy", "zstd", "none")
PARQUET_COMPRESSION = "lz4"


class _Writer:
    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int, compression: str = PARQUET_COMPRESSION):
        self.path = Path(path)
        self.schema = schema
        self.fmt = file_format(self.path)
        self.row_group_size = row_group_size
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            # Dictionary-typed columns are written as Parquet strings (their dictionary pages
            # taken as they are); without the stored Arrow schema, readers get plain strings back.
            has_dictionary = any(pa.types.is_dictionary(t) for _, t, _ in _leaves(schema))
            self._w = pq.ParquetWriter(str(self.path), schema, use_dictionary=_dictionary_columns(schema),
                                       column_encoding=_delta_columns(schema),
                                       write_statistics=_statistics_columns(schema),
                                       store_schema=not has_dictionary, compression=compression)
        elif self.fmt == "ipc":
            self._sink = pa.OSFile(str(self.path), "wb")
            self._w = pa.ipc.new_file(self._sink, schema)
        else:
            import pyarrow.csv as pcsv

            self._w = pcsv.CSVWriter(str(self.path), _csv_schema(schema))

    def write(self, data) -> None:
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        if table.schema != self.schema:
            table = table.cast(self.schema)
        if self.fmt == "parquet":
            self._w.write_table(table, row_group_size=self.row_group_size)
        elif self.fmt == "ipc":
            self._w.write_table(table, max_chunksize=self.row_group_size)
        else:
            self._w.write_table(to_csv_table(table))

    def close(self) -> None:
        self._w.close()
        if self.fmt == "ipc":
            self._sink.close()


@contextlib.contextmanager
def open_table_writer(path, schema: pa.Schema, row_group_size: int = DEFAULT_BATCH,
                      compression: str = PARQUET_COMPRESSION):
    """A writer with `.write(table_or_batch)` for Parquet / Arrow IPC / CSV by extension
    (`compression`: of Parquet files); the file is removed if the block fails."""
    w = _Writer(Path(path), schema, row_group_size, compression)
    try:
        yield w
    except BaseException:
        with contextlib.suppress(Exception):
            w.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    w.close()


def write_table(table: pa.Table, path, row_group_size: int = DEFAULT_BATCH,
                compression: str = PARQUET_COMPRESSION) -> None:
    with open_table_writer(path, table.schema, row_group_size, compression) as w:
        w.write(table)


# --------------------------------------------------------------------------- readers


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise CliError(f"{path}: no such file")
    if path.is_dir():
        raise CliError(f"{path}: is a folder, not a file")


class ClaimsFile:
    """A claims file of any supported format, read in batches as `CLAIMS_SCHEMA` columns."""

    def __init__(self, path, batch_size: int = DEFAULT_BATCH):
        self.path = Path(path)
        _must_exist(self.path)
        try:
            self._open(batch_size)
        except (pa.ArrowException, OSError) as e:
            raise CliError(f"{self.path}: {_one_line(e)}") from None

    def _open(self, batch_size: int) -> None:
        import engine

        self.fmt = file_format(self.path)
        self.batch_size = max(1, int(batch_size))
        self.target = engine.CLAIMS_SCHEMA
        self.num_rows: Optional[int] = None
        if self.fmt == "parquet":
            pf = self._parquet()
            self.file_schema = pf.schema_arrow
            self.num_rows = pf.metadata.num_rows
        elif self.fmt == "ipc":
            reader = self._open_ipc()
            self.file_schema = reader.schema
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                self.num_rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        else:
            with contextlib.closing(self._open_csv(None)) as reader:
                self.file_schema = self._csv_to_claims_schema(reader.schema)
        self.columns = [n for n in self.target.names if n in self.file_schema.names]
        self.casts = {}
        for name in self.columns:
            to = _representation_cast(self.file_schema.field(name).type, self.target.field(name).type)
            if to is not None:
                self.casts[name] = to

    def field(self, name: str) -> pa.Field:
        f = self.file_schema.field(name)
        return pa.field(name, self.casts[name]) if name in self.casts else f

    # schema as the engine will see it
    @property
    def schema(self) -> pa.Schema:
        return pa.schema([self.field(n) for n in self.columns])

    def _normalize(self, b: pa.RecordBatch) -> pa.RecordBatch:
        for name, to in self.casts.items():
            i = b.schema.get_field_index(name)
            if i >= 0:
                b = b.set_column(i, name, b.column(i).cast(to))
        return b

    def _parquet(self):
        """The Parquet file, its low-cardinality string columns read dictionary-encoded.

        Materializing those strings per row was three quarters of the read time;
        the engine takes them dictionary-encoded as they are. No pre-buffering:
        its cache keeps every row group's compressed bytes until the file is
        closed (10M claims: 400 MB more memory and more system time faulting
        it in), and a file read front to back gains nothing from it.
        """
        import pyarrow.parquet as pq

        names = pq.ParquetFile(str(self.path)).schema_arrow.names
        return pq.ParquetFile(str(self.path), pre_buffer=False,
                              read_dictionary=[c for c in engine_dictionary_columns() if c in names])

    def _open_ipc(self):
        source = pa.memory_map(str(self.path), "r")
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.memory_map(str(self.path), "r"))

    def _open_csv(self, columns: Optional[list[str]]):
        import pyarrow.csv as pcsv

        types = {f.name: f.type for f in self.target}
        types["identities"] = pa.string()
        convert = pcsv.ConvertOptions(column_types=types, strings_can_be_null=True,
                                      quoted_strings_can_be_null=False, include_columns=columns,
                                      timestamp_parsers=[pcsv.ISO8601])
        read = pcsv.ReadOptions(block_size=16 << 20)
        return pcsv.open_csv(str(self.path), read_options=read, convert_options=convert)

    def _csv_to_claims_schema(self, schema: pa.Schema) -> pa.Schema:
        fields = []
        for f in schema:
            if f.name == "identities" and pa.types.is_string(f.type):
                f = pa.field("identities", self.target.field("identities").type)
            fields.append(f)
        return pa.schema(fields)

    def _csv_batch(self, b: pa.RecordBatch) -> pa.RecordBatch:
        i = b.schema.get_field_index("identities")
        if i < 0 or not pa.types.is_string(b.schema.field(i).type):
            return b
        col = _split_list(b.column(i)).cast(self.target.field("identities").type)
        return b.set_column(i, "identities", col)

    def _raw_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from self._read(columns)
        except (pa.ArrowException, OSError) as e:
            raise CliError(f"{self.path}: {_one_line(e)}") from None

    def _read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        if self.fmt == "parquet":
            yield from self._parquet().iter_batches(batch_size=self.batch_size, columns=columns)
        elif self.fmt == "ipc":
            reader = self._open_ipc()
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i).select(columns)
            else:
                for b in reader:
                    yield b.select(columns)
        else:
            with contextlib.closing(self._open_csv(columns)) as reader:
                for b in reader:
                    yield self._csv_batch(b).select(columns)

    def batches(self, columns: Optional[list[str]] = None) -> Iterator[pa.RecordBatch]:
        """Batches of `batch_size` rows of the given columns, the last ones smaller (`tail_sizes`)."""
        cols = [c for c in (columns or self.columns) if c in self.file_schema.names]
        raw = self._raw_batches(cols)
        if self.casts:
            raw = map(self._normalize, raw)
        return rebatch(raw, tail_sizes(self.batch_size, self.num_rows))

    def read_all(self, columns: Optional[list[str]] = None) -> pa.Table:
        cols = [c for c in (columns or self.columns) if c in self.file_schema.names]
        batches = [self._normalize(b) for b in self._raw_batches(cols)]
        schema = pa.schema([self.field(c) for c in cols])
        return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def engine_dictionary_columns() -> tuple[str, ...]:
    from engine.arrow_io import DICTIONARY_COLUMNS

    return DICTIONARY_COLUMNS


def _representation_cast(got: pa.DataType, want: pa.DataType) -> Optional[pa.DataType]:
    """The target type when `got` differs from `want` only in representation: large strings and
    lists, or a timestamp without time zone in another unit (cast safely: no precision is lost
    silently). Anything else is left for the engine to reject."""
    if got.equals(want):
        return None
    if pa.types.is_large_string(got) and pa.types.is_string(want):
        return want
    if (pa.types.is_list(want) and (pa.types.is_list(got) or pa.types.is_large_list(got))
            and _representation_cast(got.value_type, want.value_type) is not None):
        return want
    if (pa.types.is_list(want) and pa.types.is_large_list(got) and got.value_type.equals(want.value_type)):
        return want
    if (pa.types.is_timestamp(got) and pa.types.is_timestamp(want) and got.tz is None and want.tz is None
            and got.unit != want.unit):
        return want
    return None


def read_table(path) -> pa.Table:
    """A whole Parquet / Arrow IPC file (accumulators, registries)."""
    path = Path(path)
    _must_exist(path)
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path))
    if fmt == "ipc":
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    raise CliError(f"{path}: accumulators need a Parquet or Arrow IPC file (nested columns), not CSV")


# =========================================================================== helpers


_DONE = object()


def prefetch(items: Iterable, depth: int = 1) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead (Arrow's readers release the
    GIL, so reading the next batch overlaps the work on this one). Errors are re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((True, x)):
                    return
            put((True, _DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))

    thread = threading.Thread(target=produce, name="medsettle-read", daemon=True)
    thread.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                raise x
            if x is _DONE:
                return
            yield x
    finally:
        stop.set()
        thread.join()


class BackgroundWriter:
    """Calls `write(x)` for each `submit(x)` on a background thread, at most `depth` queued;
    `close()` waits and re-raises the first error."""

    def __init__(self, write: Callable, depth: int = 1):
        import queue
        import threading

        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="medsettle-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            x = self._q.get()
            if x is _DONE:
                return
            if self._error is None:
                try:
                    self._write(x)
                except BaseException as e:  # noqa: BLE001 - re-raised by submit / close
                    self._error = e

    def submit(self, x) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(x)

    def close(self) -> None:
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error


def yuan(fen: int) -> str:
    """Integer fen as yuan with two decimals, no float (the summary's machine-friendly form)."""
    return format_yuan(fen, thousands=False)


class Progress:
    """A small stderr progress bar (only drawn when enabled)."""

    def __init__(self, total: Optional[int], label: str, enabled: bool, stream=None):
        self.total = total
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0
        self.done = 0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        if self.total:
            frac = min(1.0, done / self.total)
            width = 30
            fill = int(frac * width)
            eta = (self.total - done) / rate if rate > 0 else 0.0
            line = (f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
                    f"{done:,}/{self.total:,}  {rate:,.0f}/s  ETA {eta:4.0f}s ")
        else:
            line = f"\r{self.label} {done:,}  {rate:,.0f}/s "
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()


LONG_INPUT = 200_000  # rows from which a terminal gets a progress bar unasked


def _progress_enabled(flag: bool, rows: Optional[int] = None) -> bool:
    if flag:
        return True
    if rows is not None and rows < LONG_INPUT:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _load_policies(path):
    import engine

    return engine.load_policies(path)


def _load_accumulators(path):
    if path is None:
        return None
    return read_table(path)


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =========================================================================== settle


def batch_bounds(batch: pa.RecordBatch) -> Optional[tuple[tuple, tuple]]:
    """The smallest and largest (settle_time, claim_id bytes) of a batch; None if it has none.

    Rows with a null in either are error rows, which take no part in the order.
    """
    from engine import _kernel
    from engine.arrow_io import string_buffers, valid_mask

    t = batch.column("settle_time").cast(pa.int64())
    if len(t) == 0:
        return None
    times = np.frombuffer(t.buffers()[1], dtype=np.int64, count=t.offset + len(t))[t.offset:]
    offsets, data, valid = string_buffers(batch.column("claim_id"))
    lo, hi = _kernel.time_bounds(times, valid_mask(t), offsets, data, valid)
    if lo < 0:
        return None
    return tuple((int(times[i]), bytes(data[offsets[i]:offsets[i + 1]])) for i in (lo, hi))


def with_bounds(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[pa.RecordBatch, Optional[tuple]]]:
    for b in batches:
        yield b, batch_bounds(b)


class Summary:
    def __init__(self):
        self.claims = 0
        self.statuses: dict[str, int] = {}
        self.amounts = {k: 0 for k in SUMMARY_AMOUNTS}

    def add(self, results) -> None:
        self.claims += results.num_rows
        for item in pc.value_counts(results.column("status")).to_pylist():
            self.statuses[item["values"]] = self.statuses.get(item["values"], 0) + item["counts"]
        for k in SUMMARY_AMOUNTS:
            if k in results.schema.names:
                s = pc.sum(results.column(k)).as_py()
                self.amounts[k] += int(s or 0)

    def lines(self, elapsed: float) -> list[str]:
        import engine

        ok = self.statuses.get("ok", 0)
        out = [f"claims: {self.claims}", f"ok: {ok}", f"errors: {self.claims - ok}"]
        order = list(engine.STATUSES) + sorted(set(self.statuses) - set(engine.STATUSES))
        for code in order:
            if code != "ok" and self.statuses.get(code):
                out.append(f"  {code}: {self.statuses[code]}")
        out.append("paid (yuan):")
        for k in SUMMARY_AMOUNTS:
            out.append(f"  {k}: {yuan(self.amounts[k])}")
        rate = self.claims / elapsed if elapsed > 0 else 0.0
        out.append(f"elapsed: {elapsed:.3f} s")
        out.append(f"claims/s: {rate:.0f}")
        return out


class _OutOfOrder(Exception):
    """A streamed batch starts before the largest (settle_time, claim_id) of those before it."""


def _in_order(batches: Iterable[tuple[pa.RecordBatch, Optional[tuple]]]) -> Iterator[pa.RecordBatch]:
    high = None
    for batch, bounds in batches:
        if bounds is not None:
            if high is not None and bounds[0] < high:
                raise _OutOfOrder()
            high = bounds[1] if high is None or bounds[1] > high else high
        yield batch


def _settle_file(args, ps, acc_in, claims: ClaimsFile, out_path: Path, streamed: bool):
    """Settle `claims` into `out_path` as one call: (settler, summary), or None when
    `streamed` and a batch boundary is found out of order (the output is then incomplete)."""
    import engine

    settler = engine.Settler(ps, accumulators=acc_in, expected_claims=claims.num_rows or 0)
    total = claims.num_rows  # None for CSV: a count without a bar
    progress = Progress(total, "settle", _progress_enabled(args.progress, total))
    summary = Summary()
    if streamed:
        batches: Iterable = prefetch(with_bounds(claims.batches()))  # read ahead while the kernel works
    else:
        whole = claims.read_all()
        batches = [(whole.combine_chunks().to_batches()[0], None)] if whole.num_rows else []
    # Parquet stores the name columns as dictionary pages, which it then takes as they come.
    dictionary = file_format(out_path) == "parquet"
    try:
        with open_table_writer(out_path, engine.results_schema(dictionary=dictionary), claims.batch_size,
                               args.compression) as writer:
            background = BackgroundWriter(writer.write)
            try:
                for res in settler.settle_batches(_in_order(batches), dictionary=dictionary):
                    for piece in (rebatch([res], claims.batch_size) if res.num_rows > claims.batch_size
                                  else [res]):
                        background.submit(piece)
                    summary.add(res)
                    progress.update(summary.claims)
            finally:
                background.close()
                if hasattr(batches, "close"):
                    batches.close()
    except _OutOfOrder:
        return None
    finally:
        progress.close()
    return settler, summary


def cmd_settle(args) -> int:
    import engine

    t0 = time.perf_counter()
    ps = _load_policies(args.policies)
    acc_in = _load_accumulators(args.accumulators_in)
    out_path = Path(args.output)
    file_format(out_path)
    if args.accumulators_out:
        fmt = file_format(args.accumulators_out)
        if fmt == "csv":
            raise CliError(f"{args.accumulators_out}: accumulators need a Parquet or Arrow IPC file, not CSV")
    claims = ClaimsFile(args.claims, args.batch_size)
    # Fails on a missing column or a wrong type before anything is written.
    engine.settle(claims.schema.empty_table(), ps)

    # A file is one call, settled in the spec's order. Batches are streamed on the
    # assumption that each one starts at or after the largest (settle_time, claim_id)
    # of those before it (rows inside a batch are ordered by the kernel); the first
    # batch that breaks it stops the stream and the whole file is settled again as
    # one chunk, so an unordered file costs a restart, and an ordered one no pre-pass.
    result = _settle_file(args, ps, acc_in, claims, out_path, streamed=True)
    if result is None:
        _eprint(f"{PROG}: {claims.path}: batches of {claims.batch_size} rows are not in (settle_time, claim_id) "
                f"order across their boundaries; settling the whole file as one chunk")
        result = _settle_file(args, ps, acc_in, claims, out_path, streamed=False)
    settler, summary = result
    if args.accumulators_out:
        write_table(settler.accumulators(dictionary=file_format(Path(args.accumulators_out)) == "parquet"),
                    args.accumulators_out, compression=args.compression)
    elapsed = time.perf_counter() - t0
    print("\n".join(summary.lines(elapsed)), flush=True)
    return 0


# =========================================================================== generate


def cmd_generate(args) -> int:
    from engine.generate import write_claims, write_persons

    ps = _load_policies(args.policies)
    out = Path(args.output)
    file_format(out)
    if args.persons:
        if file_format(args.persons) == "csv":
            raise CliError(f"{args.persons}: the person registry needs a Parquet or Arrow IPC file, not CSV")
    t0 = time.perf_counter()
    progress = Progress(args.claims, "generate", _progress_enabled(args.progress, args.claims))
    try:
        n = write_claims(out, ps, args.claims, args.seed, args.invalid_rate, block=args.block, year=args.year,
                         label=args.label, progress=progress.update, compression=args.compression)
    except ValueError as e:
        raise CliError(str(e)) from None
    finally:
        progress.close()
    msg = f"claims: {n} -> {out}"
    if args.persons:
        persons = write_persons(args.persons, ps, args.claims, args.seed, args.year, compression=args.compression)
        msg += f"\npersons: {persons} -> {args.persons}"
    print(msg + f"\nelapsed: {time.perf_counter() - t0:.3f} s", flush=True)
    return 0


# =========================================================================== policies check


def policy_rows(ps) -> list[list[str]]:
    rows = []
    for p in sorted(ps.policies, key=lambda p: (p.region, p.scheme, p.year, p.id)):
        rules = [len(layer.rules) for layer in p.layers]
        rows.append([
            p.id, p.region, p.scheme, str(p.year),
            ", ".join(f"{layer.name} ({layer.fund})" for layer in p.layers),
            f"{sum(rules)} ({'+'.join(map(str, rules))})",
            ", ".join(p.identities) or "-",
        ])
    return rows


def cmd_policies_check(args) -> int:
    ps = _load_policies(args.dir)
    head = ["id", "region", "scheme", "year", "layers", "rules", "identities"]
    rows = policy_rows(ps)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    where = args.dir if args.dir is not None else "bundled policies"
    print(f"{len(rows)} polic{'y' if len(rows) == 1 else 'ies'} OK ({where})")
    return 0


# =========================================================================== explain


def _rows_for_claim(claims: ClaimsFile, claim_id: str) -> pa.Table:
    """The rows that can affect `claim_id`'s settlement, in file order: every row of its
    person (its accumulator keys) and every row sharing a claim id with them (duplicates)."""
    person = None
    for b in claims.batches(["claim_id", "person_id"]):
        hit = pc.equal(b.column(0), claim_id).fill_null(False)
        if pc.any(hit).as_py():
            person = b.column(1).filter(hit)[0].as_py()
            break
    else:
        raise CliError(f"{claims.path}: claim_id {claim_id!r} not found")
    if person is None:  # its person_id is null: settle it among rows sharing its id only
        ids = pa.array([claim_id])
    else:
        id_parts = []
        for b in claims.batches(["claim_id", "person_id"]):
            mine = pc.equal(b.column(1), person).fill_null(False)
            id_parts.append(b.column(0).filter(mine).drop_null())
        ids = pc.unique(pa.chunked_array(id_parts, pa.string()).combine_chunks())
    keep = []
    for b in claims.batches():
        m = pc.is_in(b.column("claim_id"), value_set=ids).fill_null(False)
        if person is not None:
            m = pc.or_(m, pc.equal(b.column("person_id"), person).fill_null(False))
        if pc.any(m).as_py():
            keep.append(b.filter(m))
    return pa.Table.from_batches(keep, schema=claims.schema)


def cmd_explain(args) -> int:
    import engine

    ps = _load_policies(args.policies)
    acc_in = _load_accumulators(args.accumulators_in)
    claims = ClaimsFile(args.claims, args.batch_size)
    engine.settle(claims.schema.empty_table(), ps)
    table = _rows_for_claim(claims, args.claim_id)
    try:
        ex = engine.explain(table, ps, args.claim_id, acc_in)
    except KeyError as e:
        raise CliError(str(e.args[0] if e.args else e)) from None
    print(engine.format_explanation(ex), flush=True)
    return 0


# =========================================================================== serve


def cmd_serve(argv: list[str]) -> int:
    try:
        import importlib

        app = importlib.import_module("server.app")
    except Exception as e:  # ImportError, or an import-time error of the server
        raise CliError(f"serve: the gRPC server is not available (cannot import server.app: {e})") from None
    if hasattr(app, "add_arguments") and hasattr(app, "serve_main"):
        parser = argparse.ArgumentParser(prog=f"{PROG} serve", description="Run the gRPC settlement server.")
        app.add_arguments(parser)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2), already printed
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        return int(app.serve_main(args) or 0)
    if hasattr(app, "main"):
        return int(app.main(argv) or 0)
    raise CliError("serve: server.app has neither add_arguments/serve_main nor main")


# =========================================================================== parser


def _positive_int(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return v


def _count(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Settlement engine for China's medical insurance "
                                                       "(basic, critical illness, assistance, top-ups).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    pol_help = "folder of policy YAML files (default: the bundled seed policies)"

    s = sub.add_parser("settle", help="settle a claims file",
                       description="Settle a claims file (Parquet, Arrow IPC or CSV) as one call.")
    s.add_argument("claims", metavar="CLAIMS")
    s.add_argument("-o", "--output", required=True, metavar="RESULTS", help="results file")
    s.add_argument("--policies", metavar="DIR", help=pol_help)
    s.add_argument("--accumulators-in", metavar="A", help="carried-in accumulators (Parquet/Arrow)")
    s.add_argument("--accumulators-out", metavar="B", help="write the closing accumulators (Parquet/Arrow)")
    s.add_argument("--batch-size", type=_positive_int, default=SETTLE_BATCH, metavar="N",
                   help=f"rows per streamed batch and results row group, the last ones smaller "
                        f"(default {SETTLE_BATCH:,})")
    s.add_argument("--progress", action="store_true", help="progress bar on stderr even when it is not a tty")
    s.add_argument("--compression", choices=PARQUET_COMPRESSIONS, default=PARQUET_COMPRESSION,
                   help="of the Parquet files written (default: %(default)s)")
    s.set_defaults(func=cmd_settle)

    g = sub.add_parser("generate", help="generate synthetic claims",
                       description="Generate synthetic claims for a policy set.")
    g.add_argument("-o", "--output", required=True, metavar="CLAIMS")
    g.add_argument("--claims", type=_count, required=True, metavar="N")
    g.add_argument("--seed", type=_count, required=True, metavar="S")
    g.add_argument("--invalid-rate", type=_rate, default=0.0, metavar="R",
                   help="share of rows with one defect of spec section 7 (default 0)")
    g.add_argument("--policies", metavar="DIR", help=pol_help)
    g.add_argument("--persons", metavar="PERSONS.parquet", help="also write the person registry")
    g.add_argument("--year", type=int, metavar="Y", help="only the policies of this year")
    g.add_argument("--block", type=_positive_int, default=DEFAULT_BATCH, metavar="N",
                   help=f"rows per row group / batch (default {DEFAULT_BATCH:,})")
    g.add_argument("--label", action="store_true",
                   help="add a column expected_status (the status each row should get; ignored by settle)")
    g.add_argument("--progress", action="store_true")
    g.add_argument("--compression", choices=PARQUET_COMPRESSIONS, default=PARQUET_COMPRESSION,
                   help="of the Parquet files written (default: %(default)s)")
    g.set_defaults(func=cmd_generate)

    pc_ = sub.add_parser("policies", help="policy folders", description="Policy folders.")
    psub = pc_.add_subparsers(dest="policies_command", metavar="ACTION")
    psub.required = True
    chk = psub.add_parser("check", help="validate a policy folder and list it")
    chk.add_argument("dir", nargs="?", metavar="DIR", help="policy folder (default: the bundled policies)")
    chk.set_defaults(func=cmd_policies_check)

    e = sub.add_parser("explain", help="explain one claim's settlement",
                       description="Explain, layer by layer, how one claim of a file is settled.")
    e.add_argument("claims", metavar="CLAIMS")
    e.add_argument("--claim-id", required=True, metavar="ID")
    e.add_argument("--policies", metavar="DIR", help=pol_help)
    e.add_argument("--accumulators-in", metavar="A")
    e.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="N", help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_explain)

    sub.add_parser("serve", help="run the gRPC server (see `medsettle serve --help`)", add_help=False)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e) or e.__class__.__name__
    return " ".join(text.split())


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `medsettle` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "serve":
            return cmd_serve(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2)
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _eprint(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - every error is one line, never a traceback
        return _report(e)


def _report(e: Exception) -> int:
    import engine

    if isinstance(e, (CliError, engine.PolicyError, engine.ClaimsSchemaError, engine.AccumulatorError)):
        msg = _one_line(e)
    elif isinstance(e, FileNotFoundError):
        msg = f"{e.filename or ''}: no such file".lstrip(": ") if e.filename else _one_line(e)
    elif isinstance(e, (pa.ArrowException, OSError, ValueError, KeyError)):
        msg = f"{e.__class__.__name__}: {_one_line(e)}"
    else:
        msg = f"internal error: {e.__class__.__name__}: {_one_line(e)}"
        if os.environ.get("MEDSETTLE_TRACEBACK"):
            import traceback

            traceback.print_exc()
    _eprint(f"{PROG}: error: {msg}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
