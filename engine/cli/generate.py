"""`medsettle generate`: synthetic claims (and their person registry) for a policy set."""
from __future__ import annotations

import time

from ..files import DEFAULT_BATCH, PARQUET_COMPRESSION, PARQUET_COMPRESSIONS, CliError, Outputs, file_format
from ..pipeline import Progress, progress_enabled
from . import common


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate synthetic claims",
                       description="Generate synthetic claims for a policy set.")
    g.add_argument("-o", "--output", required=True, metavar="CLAIMS")
    g.add_argument("--claims", type=common.count, required=True, metavar="N")
    g.add_argument("--seed", type=common.count, required=True, metavar="S")
    g.add_argument("--invalid-rate", type=common.rate, default=0.0, metavar="R",
                   help="share of rows with one defect of spec section 7 (default 0)")
    g.add_argument("--policies", metavar="DIR", help=common.POLICIES_HELP)
    g.add_argument("--persons", metavar="PERSONS.parquet", help="also write the person registry")
    g.add_argument("--year", type=int, metavar="Y", help="only the policies of this year")
    g.add_argument("--block", type=common.positive_int, default=DEFAULT_BATCH, metavar="N",
                   help=f"rows per row group / batch (default {DEFAULT_BATCH:,})")
    g.add_argument("--label", action="store_true",
                   help="add a column expected_status (the status each row should get; ignored by settle)")
    g.add_argument("--progress", action="store_true")
    g.add_argument("--compression", choices=PARQUET_COMPRESSIONS, default=PARQUET_COMPRESSION,
                   help="of the Parquet files written (default: %(default)s)")
    g.set_defaults(func=run)


def run(args) -> int:
    # Imported here: the generator is 13 ms of CPU at the start of every other command, measured.
    from .. import generate

    ps = common.policies(args.policies)
    file_format(args.output)
    if args.persons:
        common.not_csv(args.persons, "the person registry")
    outputs = Outputs()
    outputs.add(args.output)
    if args.persons:
        outputs.add(args.persons)
    t0 = time.perf_counter()
    progress = Progress(args.claims, "generate", progress_enabled(args.progress, args.claims))
    with outputs:
        try:
            n = generate.write_claims(args.output, ps, args.claims, args.seed, args.invalid_rate, block=args.block,
                                      year=args.year, label=args.label, progress=progress.update,
                                      compression=args.compression, outputs=outputs)
        except ValueError as e:
            raise CliError(str(e)) from None
        finally:
            progress.close()
        msg = f"claims: {n} -> {args.output}"
        if args.persons:
            persons = generate.write_persons(args.persons, ps, args.claims, args.seed, args.year,
                                             compression=args.compression, outputs=outputs)
            msg += f"\npersons: {persons} -> {args.persons}"
    print(msg + f"\nelapsed: {time.perf_counter() - t0:.3f} s", flush=True)
    return 0
