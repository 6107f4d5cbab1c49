"""The `medsettle` command line.

    medsettle settle CLAIMS [--policies DIR] -o RESULTS [--accumulators-in A] [--accumulators-out B]
                     [--keep-columns C,...] [--summary-json FILE] [--batch-size N] [--progress]
                     [--compression lz4|snappy|zstd|none]
    medsettle generate -o CLAIMS --claims N --seed S [--invalid-rate R] [--policies DIR]
                       [--persons PERSONS.parquet] [--year Y] [--block N] [--label] [--progress]
                       [--compression lz4|snappy|zstd|none]
    medsettle policies check [DIR]
    medsettle explain CLAIMS [--policies DIR] --claim-id ID [--accumulators-in A] [--format text|json]

and the commands other packages register through the entry-point group
`medsettle.commands` (the server's `serve`, `call`, ...): each entry point
names a callable `register(subparsers)` that adds one subparser with
`set_defaults(func=run)`, `run(args)` returning the exit code. `engine` never
imports them; a command whose package fails to load is listed and says why
when run.

Exit codes: 0 ok; 1 a failure a command reports itself; 2 a usage error or any
error of the input (one line on stderr, never a traceback; set
MEDSETTLE_TRACEBACK=1 for one on internal errors); 130 interrupted (SIGINT),
143 terminated (SIGTERM). An interrupted or failed run leaves no output file
and no temporary file (`engine.files.Outputs`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Iterator, Optional

import pyarrow as pa

from ..arrow_io import ClaimsSchemaError
from ..files import ClaimsFile, CliError, one_line, rebatch, tail_sizes, to_csv_table, write_table  # noqa: F401
from ..pipeline import batch_bounds  # noqa: F401  (re-exported for tests and benchmarks)
from ..policy import PolicyError
from ..settle import AccumulatorError
from . import explain, generate, policies, settle
from .common import PROG, eprint
from .settle import SETTLE_BATCH  # noqa: F401

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = ["ENTRY_POINT_GROUP", "main", "build_parser", "plugins",
           # re-exported: the file helpers tests and benchmarks import from the command line
           "ClaimsFile", "CliError", "SETTLE_BATCH", "batch_bounds", "rebatch", "tail_sizes", "to_csv_table",
           "write_table"]

ENTRY_POINT_GROUP = "medsettle.commands"
BUILTIN = (settle, generate, policies, explain)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with` block cleans up as for Ctrl-C."""


def plugins() -> list[EntryPoint]:
    """The entry points of `medsettle.commands` of the installed distributions."""
    # Imported here: importlib.metadata (and the email package it loads) is 6 ms of CPU at the
    # start of every run, measured, and only a command other than the built-ins needs it.
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def _unavailable(sub, ep: EntryPoint, error: BaseException) -> None:
    """A subcommand whose package failed to load: it takes any arguments and says why."""
    reason = f"{ep.name}: not available ({ep.value}: {error.__class__.__name__}: {one_line(error)})"
    p = sub.add_parser(ep.name, help=f"(not available: {error.__class__.__name__})", add_help=False,
                       prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args) -> int:
        raise CliError(reason)

    p.set_defaults(func=run)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command; for `command`, a built-in one, the built-in commands only.

    Loading the entry points imports their packages (the server's import gRPC): 0.05 s of CPU
    on every run, measured, that `settle` or `generate` never needs."""
    p = argparse.ArgumentParser(prog=PROG, description="Settlement engine for China's medical insurance "
                                                       "(basic, critical illness, assistance, top-ups).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in BUILTIN:
        module.register(sub)
    if command is not None and command in sub.choices:
        return p
    for ep in plugins():
        if ep.name in sub.choices:
            continue  # a built-in command is never replaced
        try:
            register = ep.load()
            register(sub)
        except Exception as e:  # noqa: BLE001 - an ImportError, or an error of the package's import
            sub.choices.pop(ep.name, None)
            _unavailable(sub, ep, e)
    return p


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread (a second one is ignored while cleaning up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `medsettle` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _terminate_as_interrupt():
            parser = build_parser(argv[0] if argv else None)
            try:
                args = parser.parse_args(argv)
            except SystemExit as e:  # --help (0) or a usage error (2)
                return int(e.code or 0) if not isinstance(e.code, str) else 2
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        eprint(f"{PROG}: interrupted; no output written")
        return 130
    except Terminated:
        eprint(f"{PROG}: terminated; no output written")
        return 143
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - every error is one line, never a traceback
        return _report(e)


def _report(e: Exception) -> int:
    if isinstance(e, (CliError, PolicyError, ClaimsSchemaError, AccumulatorError)):
        msg = one_line(e)
    elif isinstance(e, FileNotFoundError):
        msg = f"{e.filename or ''}: no such file".lstrip(": ") if e.filename else one_line(e)
    elif isinstance(e, (pa.ArrowException, OSError, ValueError, KeyError)):
        msg = f"{e.__class__.__name__}: {one_line(e)}"
    else:
        msg = f"internal error: {e.__class__.__name__}: {one_line(e)}"
        if os.environ.get("MEDSETTLE_TRACEBACK"):
            traceback.print_exc()
    eprint(f"{PROG}: error: {msg}")
    return 2
