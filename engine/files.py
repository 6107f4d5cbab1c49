"""File formats of the command line, and outputs that are written whole or not at all.

Claims are read from Parquet (`.parquet`, `.pq`, `.parq`), Arrow IPC (`.arrow`,
`.feather`, `.ipc`, `.arrows`) or CSV (`.csv`), by extension, as the columns of
`CLAIMS_SCHEMA`; differences of representation only (large strings or lists, a
time-zone-free timestamp in another unit) are cast, anything else is the
engine's schema error. CSV identities are one text column joined by `;`.

Every file written goes to a hidden temporary file in its target folder, is
fsynced, renamed into place, and the folder fsynced (`Outputs`): a reader never
sees half a file, and a failed or interrupted run leaves nothing behind. An
output that is the same file as an input is refused before any work.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .schema import AMOUNT_COLUMNS, CLAIMS_SCHEMA, DICTIONARY_COLUMNS, STATUS_DETAIL

DEFAULT_BATCH = 1_000_000

PARQUET_EXT = (".parquet", ".pq", ".parq")
IPC_EXT = (".arrow", ".feather", ".ipc", ".arrows")
CSV_EXT = (".csv",)

# LZ4 by default (Arrow writes it as Parquet's LZ4_RAW codec): as small as Snappy on claims
# and results, and faster to read back (3M generated claims: 0.14 s of CPU per million rows
# instead of 0.19); readers from Arrow 9, Spark 3.4, DuckDB and polars on take it. `snappy`
# is there for older readers.
PARQUET_COMPRESSIONS = ("lz4", "snappy", "zstd", "none")
PARQUET_COMPRESSION = "lz4"


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def one_line(e: BaseException) -> str:
    text = str(e) or e.__class__.__name__
    return " ".join(text.split())


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


# =========================================================================== outputs, all or nothing


class Outputs:
    """The files one command writes, committed together.

    `add(path)` checks an output before any work (its folder exists and is writable, it is
    not a folder, not the same file as an input, after links, hard ones included, nor as
    another output); `temp(path)` names the hidden temporary file it is written to, in the
    same folder (so the rename is atomic); `commit()` fsyncs each temporary, renames it into
    place and fsyncs its folder; `abort()` (or leaving the `with` block by an exception)
    removes every temporary. Safe to abort from a signal handler's exception."""

    def __init__(self, inputs: Iterable = ()):
        self._inputs = [Path(p) for p in inputs if p is not None]
        self._finals: list[Path] = []
        self._temps: dict[Path, Path] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def add(self, path) -> Path:
        path = Path(path)
        folder = path.parent
        if not folder.exists():
            raise CliError(f"{path}: folder {str(folder)!r} does not exist")
        if not folder.is_dir():
            raise CliError(f"{path}: {str(folder)!r} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CliError(f"{path}: folder {str(folder)!r} is not writable")
        if path.is_dir():
            raise CliError(f"{path}: is a folder, not a file")
        for other in self._inputs:
            if same_file(path, other):
                raise CliError(f"{path}: is the input {other}; write the output to another file")
        for other in self._finals:
            if same_file(path, other) or path.resolve() == other.resolve():
                raise CliError(f"{path}: is also the output {other}; give each output its own file")
        self._finals.append(path)
        return path

    def temp(self, path) -> Path:
        """The temporary file `path` is written to until `commit()`."""
        path = Path(path)
        with self._lock:
            if path not in self._temps:
                self._temps[path] = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            return self._temps[path]

    def commit(self) -> None:
        with self._lock:
            temps, self._temps = self._temps, {}
        try:
            folders = set()
            for tmp in temps.values():
                _fsync_path(tmp)
            for final, tmp in temps.items():
                os.replace(tmp, final)
                folders.add(final.parent)
            for folder in folders:
                # Some file systems refuse fsync on a folder (EINVAL); the files are whole and
                # in place by now, so that is not a failure of the run.
                with contextlib.suppress(OSError):
                    _fsync_path(folder)
        except BaseException:
            for tmp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise

    def abort(self) -> None:
        with self._lock:
            temps, self._temps = self._temps, {}
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same (device, inode) when both exist (symbolic
    and hard links), else the same resolved path."""
    a, b = Path(a), Path(b)
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return a.resolve() == b.resolve() and a.exists()
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, outputs: Optional[Outputs] = None) -> Iterator[Path]:
    """The temporary path to write `path` through: renamed into place when the block ends
    well (or by `outputs.commit()` when given), removed when it fails."""
    if outputs is not None:
        yield outputs.temp(path)
        return
    own = Outputs()
    own.add(path)
    with own:
        yield own.temp(path)


def write_text(path, text: str, outputs: Optional[Outputs] = None) -> None:
    """A small text file (a report, the summary JSON), all or nothing."""
    with atomic_path(path, outputs) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_bytes(path, data: bytes, outputs: Optional[Outputs] = None) -> None:
    """A small binary file (a chart's PNG, a UTF-8 page), all or nothing."""
    with atomic_path(path, outputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


# =========================================================================== batches


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


# =========================================================================== CSV conversions


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
    layer = flat.field("layer")
    if pa.types.is_dictionary(layer.type):
        layer = layer.cast(pa.string())
    items = pc.binary_join_element_wise(layer, pc.cast(flat.field("pay"), pa.string()), ":")
    offsets = arr.offsets
    if arr.offset or len(offsets) and offsets[0].as_py() != 0:
        offsets = pc.subtract(offsets, offsets[0])
    lists = pa.ListArray.from_arrays(offsets, items, mask=arr.is_null())
    return pc.binary_join(lists, ";")


def to_csv_table(table: pa.Table) -> pa.Table:
    """Nested columns as text: list<string> -> 'a;b', layer_pays -> 'layer:pay;...'."""
    cols, fields = [], []
    for f, col in zip(table.schema, table.columns):
        t = f.type
        if pa.types.is_list(t) and pa.types.is_string(t.value_type):
            col = pa.chunked_array([pc.binary_join(c, ";") for c in col.chunks], pa.string())
        elif f.name == "layer_pays" and pa.types.is_list(t) and pa.types.is_struct(t.value_type):
            col = pa.chunked_array([_layer_pays_to_text(c) for c in col.chunks], pa.string())
        elif pa.types.is_nested(t):
            raise CliError(f"column {f.name!r} ({t}) cannot be written as CSV; use .parquet or .arrow")
        cols.append(col)
        fields.append(pa.field(f.name, col.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    return to_csv_table(schema.empty_table()).schema


_CSV_COLUMN = re.compile(r"In CSV column #(\d+): (.*)", re.S)
_CSV_VALUE = re.compile(r"invalid value '([^']*)'")


def csv_error(path: Path, header: list[str], e: BaseException) -> CliError:
    """An Arrow CSV error with the column named (Arrow numbers them from 0) and, for an amount
    written like yuan ('191.35'), the reminder that amounts are integer fen."""
    text = one_line(e)
    m = _CSV_COLUMN.search(text)
    if not m:
        return CliError(f"{path}: {text}")
    i, rest = int(m.group(1)), m.group(2)
    name = header[i] if i < len(header) else f"#{i + 1}"
    msg = f"{path}: column {name!r}: {rest}"
    value = _CSV_VALUE.search(rest)
    if name in AMOUNT_COLUMNS and value and re.fullmatch(r"\s*-?\d*\.\d+\s*", value.group(1)):
        fen = value.group(1).strip()
        msg += (f" (amounts are integer fen, 1 yuan = 100 fen: {fen!r} looks like yuan; "
                f"write it as {_yuan_text_to_fen(fen)})")
    return CliError(msg)


def _yuan_text_to_fen(text: str) -> str:
    whole, _, frac = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    whole = whole.lstrip("-") or "0"
    frac = (frac + "00")[:2] if len(frac) <= 2 else frac
    if len(frac) > 2:
        return f"{text} x 100 (more than two decimals: not a whole number of fen)"
    return f"{sign}{int(whole) * 100 + int(frac)}"


# =========================================================================== writers


# Unique ids, amounts and sentences gain nothing from dictionary encoding: the writer tries it per page,
# then abandons it, which was a fifth of the time of writing results.
_PLAIN_STRINGS = {"claim_id", "person_id", STATUS_DETAIL.name}
# Sentences, one per error row: their min/max prune nothing.
_NO_STATISTICS = {STATUS_DETAIL.name}


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
    and computing them cost an eighth of the writer's time (0.03 s per million results), and
    status_detail's sentences."""
    return [path for path, t, name in _leaves(schema) if not pa.types.is_dictionary(t) and name not in _NO_STATISTICS]


class TableWriter:
    """Writes tables or batches of one schema to `path` in `fmt` (Parquet with the settings
    above, Arrow IPC file, or CSV with nested columns as text)."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int, compression: str = PARQUET_COMPRESSION,
                 fmt: Optional[str] = None):
        self.path = Path(path)
        self.schema = schema
        self.fmt = fmt or file_format(self.path)
        self.row_group_size = row_group_size
        if self.fmt == "parquet":
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
                      compression: str = PARQUET_COMPRESSION, outputs: Optional[Outputs] = None):
    """A writer with `.write(table_or_batch)` for Parquet / Arrow IPC / CSV by the extension
    of `path` (`compression`: of Parquet files). The file appears whole when the block ends
    well (or at `outputs.commit()`); if the block fails, nothing is left."""
    fmt = file_format(path)
    with atomic_path(path, outputs) as tmp:
        w = TableWriter(tmp, schema, row_group_size, compression, fmt)
        try:
            yield w
        except BaseException:
            with contextlib.suppress(Exception):
                w.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        w.close()


def write_table(table: pa.Table, path, row_group_size: int = DEFAULT_BATCH,
                compression: str = PARQUET_COMPRESSION, outputs: Optional[Outputs] = None) -> None:
    with open_table_writer(path, table.schema, row_group_size, compression, outputs) as w:
        w.write(table)


# =========================================================================== readers


def must_exist(path: Path) -> None:
    if not path.exists():
        raise CliError(f"{path}: no such file")
    if path.is_dir():
        raise CliError(f"{path}: is a folder, not a file")


class ClaimsFile:
    """A claims file of any supported format, read in batches as `CLAIMS_SCHEMA` columns."""

    def __init__(self, path, batch_size: int = DEFAULT_BATCH):
        self.path = Path(path)
        must_exist(self.path)
        try:
            self._open(batch_size)
        except CliError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise self._error(e) from None

    def _open(self, batch_size: int) -> None:
        self.fmt = file_format(self.path)
        self.batch_size = max(1, int(batch_size))
        self.target = CLAIMS_SCHEMA
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

    def _error(self, e: BaseException) -> CliError:
        if getattr(self, "fmt", None) == "csv":
            return csv_error(self.path, self._csv_header(), e)
        return CliError(f"{self.path}: {one_line(e)}")

    def _csv_header(self) -> list[str]:
        """The CSV's column names as written (Arrow's CSV errors number them from 0)."""
        with contextlib.suppress(Exception):
            with open(self.path, newline="", encoding="utf-8") as f:
                return next(csv.reader(f))
        return []

    def field(self, name: str) -> pa.Field:
        f = self.file_schema.field(name)
        return pa.field(name, self.casts[name]) if name in self.casts else f

    @property
    def schema(self) -> pa.Schema:
        """The schema as the engine will see it."""
        return pa.schema([self.field(n) for n in self.columns])

    def _normalize(self, b: pa.RecordBatch) -> pa.RecordBatch:
        for name, to in self.casts.items():
            i = b.schema.get_field_index(name)
            if i >= 0:
                b = b.set_column(i, name, b.column(i).cast(to))
        return b

    def _parquet(self) -> pq.ParquetFile:
        """The Parquet file, its low-cardinality string columns read dictionary-encoded.

        Materializing those strings per row was three quarters of the read time;
        the engine takes them dictionary-encoded as they are. No pre-buffering:
        its cache keeps every row group's compressed bytes until the file is
        closed (10M claims: 400 MB more memory and more system time faulting
        it in), and a file read front to back gains nothing from it.
        """
        names = pq.ParquetFile(str(self.path)).schema_arrow.names
        return pq.ParquetFile(str(self.path), pre_buffer=False,
                              read_dictionary=[c for c in DICTIONARY_COLUMNS if c in names])

    def _open_ipc(self):
        source = pa.memory_map(str(self.path), "r")
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.memory_map(str(self.path), "r"))

    def _open_csv(self, columns: Optional[list[str]]):
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
            raise self._error(e) from None

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
    must_exist(path)
    fmt = file_format(path)
    if fmt == "parquet":
        return pq.read_table(str(path))
    if fmt == "ipc":
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    raise CliError(f"{path}: accumulators need a Parquet or Arrow IPC file (nested columns), not CSV")
