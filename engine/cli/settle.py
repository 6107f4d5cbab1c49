"""`medsettle settle`: a claims file settled as one call, results streamed to a file.

A claims file is one settlement call. It is streamed in batches of
`--batch-size` rows (the last ones smaller), results written as they come,
while its batches are in (settle_time, claim_id) order across their
boundaries (checked as they come); the first batch that is not stops the
stream and the file is settled again whole, as one chunk, which is said on
stderr.

Results are spec section 3's columns, then `status_detail` (null when ok, else
the failed check with its values) and the claim columns of `--keep-columns`.
Every output (results, accumulators, summary JSON) is checked before the first
claim is read and appears whole when the run succeeds, or not at all.
"""
from __future__ import annotations

import argparse
import collections
import time
from typing import Iterable, Iterator

import pyarrow as pa

from ..arrow_io import results_schema
from ..detail import STATUS_DETAIL, with_detail
from ..files import (PARQUET_COMPRESSION, PARQUET_COMPRESSIONS, CliError, ClaimsFile, Outputs, file_format,
                     open_table_writer, write_table, write_text)
from ..pipeline import OutOfOrder, Progress, in_order, prefetch, progress_enabled, with_bounds, write_stream
from ..schema import DICTIONARY_COLUMNS, RESULTS_SCHEMA
from ..settle import Settler, settle
from ..summary import Summary
from . import common

# Streamed settlement: small enough that reading, settling and writing overlap even
# for a 1M-row file (filling and draining the pipeline is one batch's work on one core:
# 1M claims in 0.51 s with 125k-row batches, 0.66 s with 250k) and peak memory stays
# lower (1.3 vs 1.5 GB at 10M), large enough that per-batch costs stay small (10M
# claims: 4.7-4.9 s with 125k, 4.6-6.5 s with 250k).
SETTLE_BATCH = 125_000


def register(sub) -> None:
    s = sub.add_parser("settle", help="settle a claims file",
                       description="Settle a claims file (Parquet, Arrow IPC or CSV) as one call.")
    s.add_argument("claims", metavar="CLAIMS")
    s.add_argument("-o", "--output", required=True, metavar="RESULTS", help="results file")
    s.add_argument("--policies", metavar="DIR", help=common.POLICIES_HELP)
    s.add_argument("--accumulators-in", metavar="A", help="carried-in accumulators (Parquet/Arrow)")
    s.add_argument("--accumulators-out", metavar="B", help="write the closing accumulators (Parquet/Arrow)")
    s.add_argument("--keep-columns", metavar="COLS", type=_column_list, default=(),
                   help="claim columns to carry into the results, comma-separated (e.g. person_id,region,settle_time)")
    s.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON (amounts in integer fen)")
    s.add_argument("--batch-size", type=common.positive_int, default=SETTLE_BATCH, metavar="N",
                   help=f"rows per streamed batch and results row group, the last ones smaller "
                        f"(default {SETTLE_BATCH:,})")
    s.add_argument("--progress", action="store_true", help="progress bar on stderr even when it is not a tty")
    s.add_argument("--compression", choices=PARQUET_COMPRESSIONS, default=PARQUET_COMPRESSION,
                   help="of the Parquet files written (default: %(default)s)")
    s.set_defaults(func=run)


def _column_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give one or more column names, comma-separated")
    return names


def keep_fields(claims: ClaimsFile, keep: Iterable[str], dictionary: bool = False) -> list[pa.Field]:
    """The fields `--keep-columns` adds to the results: claim columns of the file, by name. The
    name columns a Parquet file gives dictionary-encoded stay so in Parquet results (`dictionary`:
    written as dictionary pages as they are, read back as strings), else plain strings."""
    fields, seen = [], set()
    for name in keep:
        if name in seen:
            raise CliError(f"--keep-columns: {name!r} is given twice")
        seen.add(name)
        if name in RESULTS_SCHEMA.names or name == STATUS_DETAIL.name:
            raise CliError(f"--keep-columns: {name!r} is already a results column")
        if name not in claims.file_schema.names:
            raise CliError(f"--keep-columns: {claims.path} has no column {name!r} "
                           f"(it has: {', '.join(claims.file_schema.names)})")
        f = claims.field(name)
        if dictionary and claims.fmt == "parquet" and name in DICTIONARY_COLUMNS:
            f = pa.field(name, pa.dictionary(pa.int32(), pa.string()))
        elif pa.types.is_dictionary(f.type):
            f = pa.field(name, f.type.value_type)
        fields.append(f)
    return fields


def _settled(settler: Settler, batches: Iterable[pa.RecordBatch],
             dictionary: bool) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """(results, their claims) in claims order: settle_batches yields one results batch per
    claims batch, in order, a batch behind."""
    pending: collections.deque = collections.deque()  # claims batches whose results are not out yet

    def tap() -> Iterator[pa.RecordBatch]:
        for b in batches:
            pending.append(b)
            yield b

    for res in settler.settle_batches(tap(), dictionary=dictionary):
        yield res, pending.popleft()


def _finisher(settler: Settler, keep: list[pa.Field], summary: Summary, progress: Progress):
    """The results as written, with status_detail and the kept columns, feeding the summary
    (run on the pipeline's writer thread, one batch at a time, in order)."""
    names = [f.name for f in keep]
    policies = settler.compiled.policy_set

    def finish(item: tuple[pa.RecordBatch, pa.RecordBatch]) -> pa.RecordBatch:
        res, claims = item
        summary.add(res, claims)
        out = with_detail(res, claims, policies, names)
        for f in keep:
            i = out.schema.get_field_index(f.name)
            if not out.schema.field(i).type.equals(f.type):
                out = out.set_column(i, f, out.column(i).cast(f.type))
        progress.update(summary.claims)
        return out

    return finish


def settle_file(args, ps, acc_in, claims: ClaimsFile, outputs: Outputs, keep: list[pa.Field], streamed: bool):
    """Settle `claims` into the results temporary as one call: (settler, summary), or None when
    `streamed` and a batch boundary is found out of order (that attempt's file is removed)."""
    settler = Settler(ps, accumulators=acc_in, expected_claims=claims.num_rows or 0)
    total = claims.num_rows  # None for CSV: a count without a bar
    progress = Progress(total, "settle", progress_enabled(args.progress, total))
    summary = Summary(settler)
    settler.each = summary.counted_while_settling()  # counts on the settling thread when it can
    columns = claims.columns + [f.name for f in keep if f.name not in claims.columns]
    if streamed:
        batches: Iterable = prefetch(with_bounds(claims.batches(columns)))  # read ahead while the kernel works
    else:
        whole = claims.read_all(columns)
        batches = [(whole.combine_chunks().to_batches()[0], None)] if whole.num_rows else []
    # Parquet stores the name columns as dictionary pages, which it then takes as they come.
    dictionary = file_format(args.output) == "parquet"
    schema = pa.schema([*results_schema(dictionary=dictionary), STATUS_DETAIL, *keep])
    try:
        with open_table_writer(args.output, schema, claims.batch_size, args.compression, outputs) as writer:
            try:
                write_stream(_settled(settler, in_order(batches), dictionary), writer.write,
                             at_most=claims.batch_size, transform=_finisher(settler, keep, summary, progress))
            finally:
                if hasattr(batches, "close"):
                    batches.close()
    except OutOfOrder:
        return None
    finally:
        progress.close()
    return settler, summary


def run(args) -> int:
    t0 = time.perf_counter()
    ps = common.policies(args.policies)
    acc_in = common.accumulators(args.accumulators_in)
    file_format(args.output)
    if args.accumulators_out:
        common.not_csv(args.accumulators_out, "accumulators")
    claims = ClaimsFile(args.claims, args.batch_size)
    keep = keep_fields(claims, args.keep_columns, dictionary=file_format(args.output) == "parquet")
    outputs = Outputs(inputs=[claims.path, args.accumulators_in])
    for path in (args.output, args.accumulators_out, args.summary_json):
        if path:
            outputs.add(path)
    # Fails on a missing column or a wrong type before anything is written.
    settle(claims.schema.empty_table(), ps)

    with outputs:
        # A file is one call, settled in the spec's order. Batches are streamed on the
        # assumption that each one starts at or after the largest (settle_time, claim_id)
        # of those before it (rows inside a batch are ordered by the kernel); the first
        # batch that breaks it stops the stream and the whole file is settled again as
        # one chunk, so an unordered file costs a restart, and an ordered one no pre-pass.
        result = settle_file(args, ps, acc_in, claims, outputs, keep, streamed=True)
        if result is None:
            common.eprint(f"{common.PROG}: {claims.path}: batches of {claims.batch_size} rows are not in "
                          f"(settle_time, claim_id) order across their boundaries; settling the whole file as one "
                          f"chunk")
            result = settle_file(args, ps, acc_in, claims, outputs, keep, streamed=False)
        settler, summary = result
        summary.figures()  # the persons from the settler's key table: 0.014-0.024 s at 1M claims
        if args.accumulators_out:
            write_table(settler.accumulators(dictionary=file_format(args.accumulators_out) == "parquet"),
                        args.accumulators_out, compression=args.compression, outputs=outputs)
        elapsed = time.perf_counter() - t0
        if args.summary_json:
            write_text(args.summary_json, summary.to_json(), outputs)
    print("\n".join(summary.lines(elapsed)), flush=True)
    return 0

