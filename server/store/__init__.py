"""The server's durable state behind one interface (`base.Store`): an SQLite file
(`sqlite.SQLiteStore`, the default) or a PostgreSQL database
(`postgres.PostgresStore`), chosen by `open_store(target)`: a
`postgresql://` (or `postgres://`) URL selects PostgreSQL, anything else is a
file path."""
from __future__ import annotations

from .base import (SCHEMA_VERSION, AccumulatorRow, LedgerConflict, LedgerEntry, Migration, PersonRow, Store,
                   StoreError, StoreUnavailable, fold_ledger, now_us, stored_accumulators)
from .sqlite import SQLiteStore

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: str) -> bool:
    return str(target).startswith(URL_SCHEMES)


def open_store(target: str, *, exclusive: bool = False, create: bool = True, migrate_to=None,
               pool_size: int = 4) -> Store:
    """The store at `target`: a PostgreSQL URL or an SQLite file path. `exclusive`: this
    process is the file's only writer (SQLite; PostgreSQL allows several instances).
    `pool_size`: PostgreSQL connections for the readers."""
    if is_url(target):
        # lazy: importing psycopg, psycopg_pool and libpq took 91-328 ms here (docs/DECISIONS.md)
        from .postgres import PostgresStore

        return PostgresStore(target, create=create, migrate_to=migrate_to, pool_size=pool_size)
    return SQLiteStore(target, exclusive=exclusive, create=create, migrate_to=migrate_to)


__all__ = ["SCHEMA_VERSION", "AccumulatorRow", "LedgerConflict", "LedgerEntry", "Migration", "PersonRow",
           "SQLiteStore", "Store", "StoreError", "StoreUnavailable", "fold_ledger", "is_url", "now_us",
           "open_store", "stored_accumulators"]
