"""The server's `medsettle` subcommands, registered through the entry-point group
`medsettle.commands` (pyproject.toml): each `register_*(subparsers)` adds one
subcommand whose `func(args)` returns the exit code (0 ok, 1 failure, 2 usage).

    medsettle serve ...                          the gRPC server (server/app.py)
    medsettle store migrate --store PATH|URL     create or upgrade a store's schema
"""
from __future__ import annotations

import sys

from .app import add_arguments, serve_main
from .store import SCHEMA_VERSION, StoreError, StoreUnavailable, open_store

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC settlement server (docs/SERVER.md)",
                              description="Run the real-time settlement server (gRPC).")
    add_arguments(p)
    p.set_defaults(func=serve_main)


def register_store(subparsers) -> None:
    p = subparsers.add_parser("store", help="the server's store: schema migrations",
                              description="Administer a server store (SQLite file or PostgreSQL URL).")
    sub = p.add_subparsers(dest="store_command", metavar="COMMAND", required=True)
    m = sub.add_parser("migrate", help="create the store or apply its pending schema migrations",
                       description="Create the store, or upgrade its schema to this medsettle's version "
                                   f"({SCHEMA_VERSION}), one versioned migration at a time, each in its own "
                                   "transaction. Stop the servers of an SQLite store first.")
    m.add_argument("--store", metavar="PATH|URL", required=True, help="SQLite store file or postgresql:// URL")
    m.add_argument("--to", type=int, default=SCHEMA_VERSION, metavar="VERSION",
                   help=f"stop at this version (default {SCHEMA_VERSION}, the latest)")
    m.set_defaults(func=run_migrate)


def run_migrate(args) -> int:
    if not 1 <= args.to <= SCHEMA_VERSION:
        print(f"medsettle store migrate: --to must be between 1 and {SCHEMA_VERSION}", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = open_store(args.store, exclusive=True, migrate_to=args.to, pool_size=1)
    except StoreUnavailable as e:
        print(f"medsettle store migrate: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except StoreError as e:
        print(f"medsettle store migrate: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        done, version = store.migrated, store.schema_version()
    finally:
        store.close()
    if done:
        print(f"medsettle store migrate: {store.location}: applied {', '.join(map(str, done))}; "
              f"schema version {version}")
    else:
        print(f"medsettle store migrate: {store.location}: schema version {version}, nothing to do")
    return EXIT_OK
