"""What the subcommands share: argument types, loading policies and accumulators, stderr."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa

from ..files import CliError, file_format, read_table
from ..model import PolicySet
from ..policy import load_policies

PROG = "medsettle"
POLICIES_HELP = "folder of policy YAML files (default: the bundled seed policies)"


def positive_int(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return v


def count(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return v


def policies(path) -> PolicySet:
    return load_policies(path)


def accumulators(path) -> Optional[pa.Table]:
    return None if path is None else read_table(path)


def not_csv(path, what: str) -> Path:
    """An output that has nested columns: Parquet or Arrow IPC only."""
    if file_format(path) == "csv":
        raise CliError(f"{path}: {what} need a Parquet or Arrow IPC file, not CSV")
    return Path(path)


def eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
