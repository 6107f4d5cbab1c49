"""Clearing's tables and JSON, written through the command line's all-or-nothing writer.

The writing itself (hidden temporary file in the target folder, fsync, rename, folder
fsync; nothing left behind on failure) is `engine.files`; what is clearing's own is
that every table is first conformed to its declared schema (DuckDB sums into int128:
a total that does not fit int64 fails loudly, never as a float). LZ4, the command line's
codec: on a bucket of a million results 0.48 s and 44 MB against zstd's 0.55 s and 38 MB
(reconciliation rows 0.26 s / 27 MB against 0.33 s / 22 MB); at 100 M claims the time
counts more than the 1 GB.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from ..files import open_table_writer, write_text

COMPRESSION = "lz4"


def write_parquet(path, batches: Iterable[pa.RecordBatch] | pa.Table, schema: pa.Schema) -> int:
    """Write batches conformed to `schema` to `path`, whole or not at all; returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(batches, pa.Table):
        batches = batches.to_batches()
    rows = 0
    with open_table_writer(path, schema, compression=COMPRESSION) as w:
        for b in batches:
            if b.num_rows == 0:
                continue
            t = pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
            w.write(cast(t, schema))
            rows += t.num_rows
    return rows


def cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, types and nullability; a column that does
    not fit (a missing one, a null in a required column) raises naming the column."""
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"internal: column '{f.name}' missing from {table.column_names}")
        col = table.column(f.name).cast(f.type)
        if not f.nullable and col.null_count:
            raise ValueError(f"internal: column '{f.name}' has {col.null_count} nulls")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def write_json(path, value) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
