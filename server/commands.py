"""The server's `medsettle` subcommands, registered through the entry-point group
`medsettle.commands` (pyproject.toml): each `register_*(subparsers)` adds one
subcommand whose `func(args)` returns the exit code (0 ok, 1 failure, 2 usage).

    medsettle serve ...                                         the gRPC server (server/app.py)
    medsettle store migrate --store PATH|URL                    create or upgrade a store's schema
    medsettle ledger export --store PATH|URL [--year Y] -o F    the ledger as Parquet (LEDGER_SCHEMA)
    medsettle accumulators import --store PATH|URL F            carried-in accumulators (spec section 4)
"""
from __future__ import annotations

import os
import sys

from .app import add_arguments, serve_main
from .ledger_io import export_ledger, import_accumulators
from .store import SCHEMA_VERSION, StoreError, StoreUnavailable, open_store

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC settlement server (docs/SERVER.md)",
                              description="Run the real-time settlement server (gRPC).")
    add_arguments(p)
    p.set_defaults(func=serve_main)


def _store_command(subparsers, group: str, group_help: str, group_description: str,
                   command: str, help: str, description: str):
    """`medsettle GROUP COMMAND --store PATH|URL ...`: the shape of every store subcommand, so
    they name and describe `--store` alike; returns COMMAND's parser for its own arguments."""
    p = subparsers.add_parser(group, help=group_help, description=group_description)
    sub = p.add_subparsers(dest=f"{group}_command", metavar="COMMAND", required=True)
    c = sub.add_parser(command, help=help, description=description)
    c.add_argument("--store", metavar="PATH|URL", required=True, help="SQLite store file or postgresql:// URL")
    return c


def register_store(subparsers) -> None:
    m = _store_command(subparsers, "store", "the server's store: schema migrations",
                       "Administer a server store (SQLite file or PostgreSQL URL).",
                       "migrate", "create the store or apply its pending schema migrations",
                       "Create the store, or upgrade its schema to this medsettle's version "
                       f"({SCHEMA_VERSION}), one versioned migration at a time, each in its own "
                       "transaction. Stop the servers of an SQLite store first.")
    m.add_argument("--to", type=int, default=SCHEMA_VERSION, metavar="VERSION",
                   help=f"stop at this version (default {SCHEMA_VERSION}, the latest)")
    m.set_defaults(func=run_migrate)


def run_migrate(args) -> int:
    if not 1 <= args.to <= SCHEMA_VERSION:
        print(f"medsettle store migrate: --to must be between 1 and {SCHEMA_VERSION}", file=sys.stderr)
        return EXIT_USAGE
    store, code = _open("medsettle store migrate", args.store, exclusive=True, create=True, migrate_to=args.to)
    if store is None:
        return code
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


def register_ledger(subparsers) -> None:
    e = _store_command(subparsers, "ledger", "the server's ledger: export",
                       "The real-time ledger of a server store.",
                       "export", "write every settlement and reversal as Parquet",
                       "Write every settlement and reversal of the store, in sequence order, as "
                       "Parquet with engine.schema.LEDGER_SCHEMA (docs/SERVER.md). Streamed page by "
                       "page; the file appears only when complete.")
    e.add_argument("--year", type=int, help="only the entries of this accumulator year")
    e.add_argument("-o", "--output", metavar="LEDGER_PARQUET", required=True, help="output file")
    e.set_defaults(func=run_export)


def register_accumulators(subparsers) -> None:
    i = _store_command(subparsers, "accumulators", "the server's accumulators: import a carry table",
                       "Accumulators of a server store.",
                       "import", "load the carry table of `medsettle settle --accumulators-out`",
                       "Load a carry table (the accumulators Parquet of `medsettle settle "
                       "--accumulators-out`, spec section 4) so that real-time settlement continues "
                       "from a batch run. All or nothing; refused when any of its keys already has "
                       "settlements or carried accumulators.")
    i.add_argument("accumulators", metavar="ACCUMULATORS_PARQUET", help="the carry table")
    i.set_defaults(func=run_import)


def _open(prog: str, target: str, exclusive: bool, create: bool = False, migrate_to=None):
    """(store, None) or (None, exit code) with the reason printed. `exclusive`: refuse an SQLite
    store that a running server holds (a write beside its writer would race it)."""
    try:
        return open_store(target, exclusive=exclusive, create=create, migrate_to=migrate_to, pool_size=1), None
    except StoreUnavailable as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None, EXIT_FAILURE
    except StoreError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None, EXIT_USAGE


def run_export(args) -> int:
    prog = "medsettle ledger export"
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        print(f"{prog}: {args.output}: folder {folder} does not exist", file=sys.stderr)
        return EXIT_USAGE
    if os.path.isdir(args.output):
        print(f"{prog}: {args.output} is a folder; give a file name", file=sys.stderr)
        return EXIT_USAGE
    store, code = _open(prog, args.store, exclusive=False)  # reads only: also beside a running server
    if store is None:
        return code
    try:
        n = export_ledger(store, args.output, args.year)
    except (StoreError, OSError) as e:
        print(f"{prog}: {e} (nothing was written)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    print(f"{prog}: {n} ledger entries -> {args.output}")
    return EXIT_OK


def run_import(args) -> int:
    prog = "medsettle accumulators import"
    if not os.path.isfile(args.accumulators):
        print(f"{prog}: {args.accumulators}: no such file", file=sys.stderr)
        return EXIT_USAGE
    store, code = _open(prog, args.store, exclusive=True)
    if store is None:
        return code
    try:
        n = import_accumulators(store, args.accumulators)
    except ValueError as e:  # a malformed carry table (names file, row, column)
        print(f"{prog}: {e}; nothing was imported", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    print(f"{prog}: {n} keys carried in")
    return EXIT_OK
