"""DuckDB helpers shared by the phases: query results streamed into Parquet of a declared schema.

DuckDB sums int64 into int128 (HUGEINT); every table is cast to its declared int64
schema before writing, so a total that no longer fits fails loudly, never as a float.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

from .files import write_parquet

BATCH = 1_000_000


def quote(path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def source(path) -> str:
    """DuckDB's reader of a Parquet table: a file, or a folder of part files (as Spark writes them)."""
    path = Path(path)
    return f"read_parquet({quote(path / '*.parquet' if path.is_dir() else path)})"


def file_list(files) -> str:
    return "[" + ", ".join(quote(f) for f in files) + "]"


def batches(con: duckdb.DuckDBPyConnection, sql: str) -> Iterator[pa.RecordBatch]:
    reader = con.sql(sql).to_arrow_reader(BATCH)
    yield from reader


def write_query(con: duckdb.DuckDBPyConnection, sql: str, path: Path, schema: pa.Schema) -> int:
    """Stream a query's rows into `path` (written whole) cast to `schema`; returns the row count."""
    return write_parquet(path, batches(con, sql), schema)


def rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict]:
    """A small query's rows as dicts (int128 sums come back as Python ints: exact)."""
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]
