"""Files written whole or not at all: a temporary name in the same folder, then a rename."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

COMPRESSION = "zstd"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_parquet(path, batches: Iterable[pa.RecordBatch] | pa.Table, schema: pa.Schema) -> int:
    """Write batches cast to `schema` to `path` atomically; returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    rows = 0
    if isinstance(batches, pa.Table):
        batches = batches.to_batches()
    try:
        with pq.ParquetWriter(tmp, schema, compression=COMPRESSION, use_dictionary=dictionary_columns(schema)) as w:
            for b in batches:
                if b.num_rows == 0:
                    continue
                t = pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
                w.write_table(cast(t, schema))
                rows += t.num_rows
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


#: Ids are nearly all distinct: a dictionary for them is built, then given up, per page.
HIGH_CARDINALITY = ("claim_id", "person_id")


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The name columns worth a dictionary (about a fifth less writing time for the results)."""
    out = [f.name for f in schema if pa.types.is_string(f.type) and f.name not in HIGH_CARDINALITY]
    if "layer_pays" in schema.names:
        out.append("layer_pays.list.element.layer")
    return out


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
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
