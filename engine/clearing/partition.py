"""Phase 1: the year's claims, the registry and the ledger split by person into buckets on disk.

One streaming pass over each input (pyarrow's Parquet reader, a file or a folder of
files in path order), bounded memory whatever the size: each batch's rows get a
64-bit hash of the person (its bucket) and of the claim id (engine.clearing._buckets,
in C), are put in bucket order (a stable sort of 16-bit bucket numbers) and appended
to one LZ4 Arrow IPC file per bucket. A bucket keeps its rows in input order, so the
one settlement call per bucket rejects a repeated claim id's later rows as
DUPLICATE_CLAIM exactly as one call over the year would, when they are the same
person's (spec 7: first occurrences are found over the whole call, before any split).

A claim id repeated across persons (so across buckets) is found over the whole year
before any bucket is settled: the claim-id hashes of every row (8 bytes per claim)
are sorted once, the few repeated hashes become a set, the rows carrying one are
gathered, and where a hash's rows are in several buckets their claim ids are read
back and compared exactly (a hash collision is not a duplicate). The later rows of
such an id in another bucket than its first row are listed in `forced.arrow`
(bucket, ord); the bucket's settlement rejects them as DUPLICATE_CLAIM without
settling them (their status depends on no accumulator, and they change none).

Each row keeps its input position `ord` (file index << 40 | row in file). The phase
writes into a temporary folder renamed when complete, then `manifest.json`: a killed
partition is redone, a finished one reused.

Why not DuckDB (the first version): its claim-id group-by and its partitioned writes
spilled to disk at 100 M claims (partition 243 s); this pass is linear in the input.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..arrow_io import ClaimsSchemaError, check_schema
from ..registry import check_persons_schema
from ..schema import CLAIMS_SCHEMA, LEDGER_SCHEMA, PERSONS_SCHEMA
from . import _buckets
from .files import write_json
from .progress import PhaseProgress

#: Default rows per bucket: a bucket is settled as one call in memory (about 0.6 KB per claim
#: while settled and reconciled, two buckets in flight), and its keys' accumulator rows stay small.
BUCKET_ROWS = 1_000_000
#: At most this many buckets (bucket numbers are 16-bit).
MAX_BUCKETS = 65_535
FILE_SHIFT = 40  # ord = file index << 40 | row number in the file
#: Rows read per batch of an input.
READ_ROWS = 1 << 20

#: A bucket of claims: the claims' columns, where each came from, nothing else.
BUCKET_CLAIMS_SCHEMA = CLAIMS_SCHEMA.append(pa.field("facility_id", pa.string())).append(
    pa.field("ord", pa.int64(), nullable=False))
#: The ledger columns reconciliation reads (facility_id may be absent from a file: null then).
LEDGER_COLUMNS = ("seq", "kind", "claim_id", "person_id", "region", "scheme", "settle_time", "facility_id",
                  "basic_pay", "supplementary_pay", "critical_illness_pay", "medical_aid_pay", "guarantee_pay",
                  "personal_pay")
BUCKET_LEDGER_SCHEMA = pa.schema([LEDGER_SCHEMA.field(n) for n in LEDGER_COLUMNS])
FORCED_SCHEMA = pa.schema([("bucket", pa.int32()), ("ord", pa.int64())])


class ClearingError(ValueError):
    """An input clearing cannot use; the message names the file or argument and the reason."""


class Partition(NamedTuple):
    folder: Path
    buckets: int
    rows: int  # claims of the year
    other_years: int  # claims of the dataset dated in another year (not cleared)
    forced: int  # later rows of a claim id repeated across buckets (rejected as DUPLICATE_CLAIM)
    has_facility: bool
    has_ledger: bool


def dataset_files(path) -> list[Path]:
    """The Parquet files of a dataset: the file, or every *.parquet under the folder in path order."""
    path = Path(path)
    if not path.exists():
        raise ClearingError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ClearingError(f"{path}: no .parquet files in this folder")
        return files
    return [path]


def _schema(f: Path) -> pa.Schema:
    try:
        return pq.read_schema(f)
    except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
        raise ClearingError(f"{f}: not a readable Parquet file ({e})") from None


def check_claims_files(files: list[Path]) -> bool:
    """Every file has the claims columns (spec 2); returns whether all have `facility_id`."""
    facility = True
    for f in files:
        schema = _schema(f)
        try:
            check_schema(schema)
        except ClaimsSchemaError as e:
            raise ClearingError(f"{f}: {e}") from None
        i = schema.get_field_index("facility_id")
        if i < 0:
            facility = False
        elif str(schema.field(i).type) not in ("string", "large_string"):
            raise ClearingError(f"{f}: column 'facility_id' has type {schema.field(i).type}; expected string")
    return facility


def _string_like(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))


def check_ledger(files: list[Path]) -> None:
    """Every file has the columns reconciliation reads with LEDGER_SCHEMA's types (facility_id optional)."""
    for f in files:
        schema = _schema(f)
        for field in BUCKET_LEDGER_SCHEMA:
            i = schema.get_field_index(field.name)
            if i < 0:
                if field.name == "facility_id":
                    continue
                raise ClearingError(f"{f}: ledger column '{field.name}' is missing (expected {field.type}); "
                                    f"the ledger is `medsettle ledger export`'s schema (docs/CLEARING.md)")
            got = schema.field(i).type
            if not (got.equals(field.type) or (_string_like(field.type) and _string_like(got))):
                raise ClearingError(f"{f}: ledger column '{field.name}' has type {got}; expected {field.type}")


def check_registry(files: list[Path]) -> None:
    for f in files:
        try:
            check_persons_schema(_schema(f), str(f))
        except ClearingError:
            raise
        except ValueError as e:
            raise ClearingError(str(e)) from None


def fingerprint(files: list[Path], registry: Optional[list[Path]], ledger: Optional[list[Path]], year: int,
                use_claim_identities: bool, bucket_rows: int) -> str:
    """What a finished partition was made from: a resumed run must have the same."""
    h = hashlib.sha256()
    for kind, group in (("claims", files), ("registry", registry or []), ("ledger", ledger or [])):
        for f in group:
            st = f.stat()
            h.update(f"{kind}|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{year}|{use_claim_identities}|{bucket_rows}|v2".encode())
    return h.hexdigest()


def load_manifest(work: Path) -> Optional[dict]:
    path = work / "partition" / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def from_manifest(work: Path, manifest: dict) -> Partition:
    return Partition(work / "partition", manifest["buckets"], manifest["rows"], manifest["other_years"],
                     manifest["forced"], manifest["has_facility"], manifest["has_ledger"])


# -- hashing -----------------------------------------------------------------------------

def string_hashes(column, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, valid) of a string column (any chunking, string or large_string)."""
    if isinstance(column, pa.ChunkedArray):
        arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    else:
        arr = column
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    out = np.empty(n, dtype=np.uint64)
    if n:
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=arr.offset + n + 1)[arr.offset:]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None and data_buf.size else \
            np.zeros(1, dtype=np.uint8)
        _buckets.hash_utf8(np.ascontiguousarray(offsets), data, seed, out)
    valid = np.ones(n, dtype=bool) if arr.null_count == 0 else \
        np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return out, valid


def bucket_numbers(column, buckets: int) -> np.ndarray:
    """Each row's bucket: its person's hash mod `buckets` (null persons: the empty string's)."""
    h, valid = string_hashes(column, _buckets.PERSON_SEED)
    if not valid.all():
        h[~valid] = string_hashes(pa.array([""]), _buckets.PERSON_SEED)[0][0]
    out = np.empty(len(h), dtype=np.uint16)
    _buckets.buckets_of(h, buckets, out)
    return out


# -- the split ---------------------------------------------------------------------------

class BucketFiles:
    """One LZ4 Arrow IPC file per bucket, appended batch by batch (rows kept in order)."""

    def __init__(self, folder: Path, schema: pa.Schema):
        self.folder = folder
        self.schema = schema
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        self.options = pa.ipc.IpcWriteOptions(compression="lz4")
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def arrange(batch: pa.RecordBatch, bucket: np.ndarray) -> tuple:
        """The batch in bucket order and where each bucket's rows start (the first stage)."""
        order = np.argsort(bucket, kind="stable")  # 16-bit keys: numpy's radix sort, keeps input order
        sorted_buckets = bucket[order]
        cuts = np.flatnonzero(np.diff(sorted_buckets)) + 1
        return batch.take(pa.array(order)), sorted_buckets, cuts

    def append(self, arranged: tuple) -> None:
        """Each bucket's rows of an arranged batch appended to its file (the second stage)."""
        batch, sorted_buckets, cuts = arranged
        if batch.num_rows == 0:
            return
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [batch.num_rows]])):
            b = int(sorted_buckets[lo])
            w = self.writers.get(b)
            if w is None:
                w = self.writers[b] = pa.ipc.new_file(str(self.folder / f"bucket-{b:05d}.arrow"), self.schema,
                                                      options=self.options)
            w.write_batch(batch.slice(int(lo), int(hi - lo)))

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with `schema`'s columns by name, cast; a column the file lacks is null."""
    cols = []
    for f in schema:
        i = batch.schema.get_field_index(f.name)
        cols.append(batch.column(i).cast(f.type) if i >= 0 else pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def read_batches(files: list[Path], columns: list[str]) -> Iterator[tuple[int, int, pa.RecordBatch]]:
    """(file index, first row in the file, batch) of every file in order, only `columns` present."""
    for fi, f in enumerate(files):
        # no pre-buffering: its cache keeps every row group's bytes read until the file is
        # closed (5.7 GB of RSS at 100 M claims; engine.files reads claims the same way)
        pf = pq.ParquetFile(f, pre_buffer=False)
        present = [c for c in columns if c in pf.schema_arrow.names]
        row = 0
        for batch in pf.iter_batches(READ_ROWS, columns=present, use_threads=True):
            yield fi, row, batch
            row += batch.num_rows


def _year_bounds_us(year: int) -> tuple[int, int]:
    epoch = dt.datetime(1970, 1, 1)
    return ((dt.datetime(year, 1, 1) - epoch) // dt.timedelta(microseconds=1),
            (dt.datetime(year + 1, 1, 1) - epoch) // dt.timedelta(microseconds=1))


def _pipelined(items, arrange, append) -> None:
    """`arrange(*item)` on one helper thread while the next item is read, its result
    `append`ed on another: three stages overlapped, in order (Arrow's reads, takes and IPC
    writes and the hashing release the GIL). Measured on 10 M claims, alternated, the
    machine shared (load 3.5): the partition 6.9 / 6.9 s against 7.7 / 7.1 s with the two
    stages on one thread."""
    with ThreadPoolExecutor(1, thread_name_prefix="medsettle-arrange") as first, \
            ThreadPoolExecutor(1, thread_name_prefix="medsettle-append") as second:
        arranging: Optional[Future] = None
        appending: Optional[Future] = None

        def hand_over() -> Future:
            done = arranging.result()
            if appending is not None:
                appending.result()  # one batch in each stage at most: bounded memory, order kept
            return second.submit(append, done)

        for item in items:
            if arranging is not None:
                appending = hand_over()
            arranging = first.submit(arrange, *item)
        if arranging is not None:
            appending = hand_over()
        if appending is not None:
            appending.result()


def split_claims(files: list[Path], folder: Path, year: int, buckets: int, total: int, bar) -> dict:
    """Write the year's claims into bucket files; returns counts and the claim-id hashes."""
    lo_us, hi_us = _year_bounds_us(year)
    claim_hash = np.zeros(total, dtype=np.uint64)  # 0: not a claim id of the year (null or another year)
    bucket_of_row = np.zeros(total, dtype=np.uint16)
    out = BucketFiles(folder, BUCKET_CLAIMS_SCHEMA)
    counts = {"rows": 0, "other": 0}
    starts = np.zeros(len(files) + 1, dtype=np.int64)  # global row index of each file's first row
    for i, f in enumerate(files):
        starts[i + 1] = starts[i] + pq.ParquetFile(f).metadata.num_rows
    source_schema = BUCKET_CLAIMS_SCHEMA.remove(BUCKET_CLAIMS_SCHEMA.get_field_index("ord"))

    def work(fi: int, row: int, batch: pa.RecordBatch) -> tuple:
        n = batch.num_rows
        batch = conform(batch, source_schema)
        t = batch.column(source_schema.get_field_index("settle_time")).cast(pa.int64())
        us = np.asarray(t.fill_null(lo_us).to_numpy(), dtype=np.int64)
        keep = (us >= lo_us) & (us < hi_us)  # a null time stays: the engine rejects it (MISSING_FIELD)
        g0 = int(starts[fi]) + row
        ords = (np.int64(fi) << FILE_SHIFT) | np.arange(row, row + n, dtype=np.int64)
        batch = pa.RecordBatch.from_arrays([*batch.columns, pa.array(ords)], schema=BUCKET_CLAIMS_SCHEMA)
        counts["other"] += int(n - keep.sum())
        bucket = bucket_numbers(batch.column(1), buckets)
        h, valid = string_hashes(batch.column(0), _buckets.CLAIM_SEED)
        h |= np.uint64(1)  # 0 is kept for "not a claim id of the year"
        h[~(valid & keep)] = 0
        claim_hash[g0:g0 + n] = h
        bucket_of_row[g0:g0 + n] = bucket
        if not keep.all():
            idx = np.flatnonzero(keep)
            batch, bucket = batch.take(pa.array(idx)), bucket[idx]
        counts["rows"] += batch.num_rows
        bar.advance(n)
        return out.arrange(batch, bucket)

    try:
        _pipelined(read_batches(files, list(source_schema.names)), work, out.append)
    finally:
        out.close()
    return {**counts, "claim_hash": claim_hash, "bucket": bucket_of_row, "starts": starts}


def split_table(files: list[Path], folder: Path, schema: pa.Schema, buckets: int, bar=None) -> None:
    """Registry or ledger rows into bucket files by person (rows kept in input order)."""
    out = BucketFiles(folder, schema)
    pid = schema.get_field_index("person_id")

    def work(fi: int, row: int, batch: pa.RecordBatch) -> tuple:
        batch = conform(batch, schema)
        if bar is not None:
            bar.advance(batch.num_rows)
        return out.arrange(batch, bucket_numbers(batch.column(pid), buckets))

    try:
        _pipelined(read_batches(files, list(schema.names)), work, out.append)
    finally:
        out.close()


#: The claim-id hashes are sorted in this many slices (by their top bits): a sorted copy of
#: an eighth of them at a time, not of all (200 M claims: 0.2 GB instead of 1.6 GB).
HASH_SLICES = 8  # a power of two


def repeated_hashes(claim_hash: np.ndarray) -> np.ndarray:
    """The non-zero hashes that occur more than once, sorted."""
    out = []
    top = np.uint64(64 - HASH_SLICES.bit_length() + 1)
    for k in range(HASH_SLICES):
        part = claim_hash[(claim_hash >> top) == np.uint64(k)]
        part = part[part != 0]
        part.sort()
        out.append(np.unique(part[1:][part[1:] == part[:-1]]))
    return np.concatenate(out)


def cross_bucket_duplicates(files: list[Path], claim_hash: np.ndarray, bucket: np.ndarray,
                            starts: np.ndarray) -> pa.Table:
    """The later rows of claim ids repeated in more than one bucket, as FORCED_SCHEMA rows.

    Repeats within one bucket are left to the bucket's settlement call (same rule, same
    order). Hashes only nominate candidates; ids are compared exactly."""
    repeated = repeated_hashes(claim_hash)
    if not len(repeated):
        return FORCED_SCHEMA.empty_table()
    rows = np.flatnonzero(_buckets.in_set(claim_hash, repeated))
    h, b = claim_hash[rows], bucket[rows]
    order = np.lexsort((rows, h))
    rows, h, b = rows[order], h[order], b[order]
    group_start = np.concatenate([[True], h[1:] != h[:-1]])
    gid = np.cumsum(group_start) - 1
    first_b = b[group_start][gid]
    spans = np.zeros(gid[-1] + 1, dtype=bool)
    np.logical_or.at(spans, gid, b != first_b)
    rows = np.sort(rows[spans[gid]])  # rows of hashes seen in several buckets: compare their ids exactly
    if not len(rows):
        return FORCED_SCHEMA.empty_table()
    ids = _claim_ids(files, starts, rows)
    t = pa.table({"g": rows, "claim_id": ids}).sort_by([("claim_id", "ascending"), ("g", "ascending")])
    g = t["g"].to_numpy()
    b = bucket[g]
    ids = t["claim_id"].combine_chunks()
    start = np.ones(len(g), dtype=bool)
    if len(g) > 1:
        start[1:] = ~np.asarray(pc.equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False), dtype=bool)
    gid = np.cumsum(start) - 1
    later = (g != g[start][gid]) & (b != b[start][gid])
    g, b = g[later], b[later]
    fi = np.searchsorted(starts, g, side="right") - 1
    ords = (fi.astype(np.int64) << FILE_SHIFT) | (g - starts[fi])
    return pa.table({"bucket": pa.array(b.astype(np.int32)), "ord": pa.array(ords, pa.int64())},
                    schema=FORCED_SCHEMA).sort_by([("bucket", "ascending"), ("ord", "ascending")])


def _claim_ids(files: list[Path], starts: np.ndarray, rows: np.ndarray) -> pa.Array:
    """The claim ids at global row numbers `rows` (sorted), read back from the files."""
    out = []
    fi_of = np.searchsorted(starts, rows, side="right") - 1
    for fi in np.unique(fi_of):
        local = rows[fi_of == fi] - starts[fi]
        col = pq.ParquetFile(files[fi]).read(columns=["claim_id"]).column(0)
        out.append(col.take(pa.array(local)).cast(pa.string()))
    return pa.concat_arrays([c.combine_chunks() for c in out])


def partition(files: list[Path], registry_files: Optional[list[Path]], ledger_files: Optional[list[Path]],
              work: Path, year: int, bucket_rows: int = BUCKET_ROWS, key: str = "", stream=None) -> Partition:
    """Split the year's claims, the registry and the ledger into buckets under work/partition."""
    has_facility = check_claims_files(files)
    if registry_files:
        check_registry(registry_files)
    if ledger_files:
        check_ledger(ledger_files)
    final = work / "partition"
    tmp = work / "partition.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    buckets = max(1, min(MAX_BUCKETS, math.ceil(total / max(1, bucket_rows))))
    extra = sum(pq.ParquetFile(f).metadata.num_rows for f in [*(registry_files or []), *(ledger_files or [])])
    steps: dict[str, float] = {}
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        steps[step] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()

    with PhaseProgress("partition", total + extra, stream) as bar:
        split = split_claims(files, tmp / "claims", year, buckets, total, bar)
        lap("claims")
        forced = cross_bucket_duplicates(files, split["claim_hash"], split["bucket"], split["starts"])
        del split["claim_hash"], split["bucket"]
        with pa.ipc.new_file(str(tmp / "forced.arrow"), FORCED_SCHEMA) as w:
            w.write_table(forced)
        lap("duplicates")
        if registry_files:
            split_table(registry_files, tmp / "registry", PERSONS_SCHEMA, buckets, bar)
            lap("registry")
        if ledger_files:
            split_table(ledger_files, tmp / "ledger", BUCKET_LEDGER_SCHEMA, buckets, bar)
            lap("ledger")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    result = Partition(final, buckets, int(split["rows"]), int(split["other"]), forced.num_rows, has_facility,
                       bool(ledger_files))
    write_json(final / "manifest.json", {"key": key, "buckets": buckets, "rows": result.rows,
                                         "other_years": result.other_years, "forced": result.forced,
                                         "has_facility": has_facility, "has_ledger": result.has_ledger,
                                         "seconds": steps})
    return result


def read_bucket(folder: Path, kind: str, bucket: int) -> Optional[pa.Table]:
    """A bucket's rows (None if it has none)."""
    path = folder / kind / f"bucket-{bucket:05d}.arrow"
    if not path.exists():
        return None
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def read_forced(part: Partition) -> dict[int, np.ndarray]:
    """Per bucket, the ords of its rows to reject as later duplicates of another bucket's row."""
    path = part.folder / "forced.arrow"
    if not path.exists():
        return {}
    with pa.memory_map(str(path)) as source:
        t = pa.ipc.open_file(source).read_all()
    if not t.num_rows:
        return {}
    b = t["bucket"].to_numpy()
    o = t["ord"].to_numpy()
    return {int(k): o[b == k] for k in np.unique(b)}
