"""`medsettle clear` and `medsettle whatif`: the command lines of year-end clearing.

Registered through the `medsettle.commands` entry points (`register`,
`register_whatif`); `main(argv)` runs either without the discovery, for tests and
for `python -m engine.clearing.command clear ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from ..cli.common import positive_int
from ..policy import PolicyError
from ..registry import RegistryError
from ..schema import format_yuan
from .partition import BUCKET_ROWS, ClearingError


def _parser(subparsers, name: str, help: str, description: str, run) -> argparse.ArgumentParser:
    """The subcommand with the options `clear` and `whatif` share."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.set_defaults(func=run)
    p.add_argument("--claims", required=True, type=Path, help="claims: a Parquet file or a folder of them")
    p.add_argument("--registry", type=Path, help="persons.parquet (PERSONS_SCHEMA): the registry's basis "
                                                 "as of each claim's date")
    p.add_argument("--use-claim-identities", action="store_true",
                   help="settle on the claims' own region, scheme, age and identities (no registry)")
    p.add_argument("--year", type=int, help="the year to clear (default: the year of the policies)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--bucket-rows", type=positive_int, default=BUCKET_ROWS,
                   help=f"claims per bucket settled in one call (default {BUCKET_ROWS:,})")
    p.add_argument("--memory-limit", default="2GB", help="DuckDB's memory limit before it spills (default 2GB)")
    p.add_argument("--keep-work", action="store_true", help="keep the partitioned claims under OUT/work")
    p.add_argument("--no-charts", action="store_true", help="write the report without charts")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def register(subparsers) -> argparse.ArgumentParser:
    p = _parser(subparsers, "clear", "year-end clearing: re-settle a year, reconcile, accounts, report",
                "Re-settle a year with the final rules and registry, reconcile with the ledger, write the "
                "accounts and the report (docs/CLEARING.md).", run)
    p.add_argument("--policies", required=True, type=Path, help="policy folder (the year's final rules)")
    p.add_argument("--ledger", type=Path, help="the ledger export (LEDGER_SCHEMA) to reconcile with")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same --out")
    return p


def register_whatif(subparsers) -> argparse.ArgumentParser:
    p = _parser(subparsers, "whatif", "the same year under two policy sets, side by side",
                "Settle the year under a baseline and a reform policy set and compare cost per fund and "
                "region and burden per person.", run_whatif)
    p.add_argument("--baseline", required=True, type=Path, help="policy folder in force")
    p.add_argument("--reform", required=True, type=Path, help="policy folder proposed")
    return p


def _year(args, policies) -> int:
    if args.year is not None:
        return args.year
    years = sorted({p.year for p in policies.policies})
    if len(years) != 1:
        raise UsageError(f"--year is required: the policies cover the years {years}")
    return years[0]


class UsageError(ValueError):
    """Arguments that do not fit together (exit status 2, as argparse's own)."""


def _check(args) -> None:
    if args.registry is None and not args.use_claim_identities:
        raise UsageError("--registry is required (or --use-claim-identities)")


def _guarded(command: str, args, work: Callable[[], dict]) -> tuple[int, Optional[dict]]:
    """(0, `work()`'s summary), or, for an error the user can fix, printed as one line:
    (2, None) for arguments that do not fit together, (1, None) for an input."""
    try:
        _check(args)
        return 0, work()
    except UsageError as e:
        status, message = 2, str(e)
    except (ClearingError, PolicyError, RegistryError, OSError) as e:
        status, message = 1, str(e)
    print(f"medsettle {command}: {message}", file=sys.stderr)
    return status, None


def run(args) -> int:
    from ..policy import load_policies
    from .clear import clear

    def work() -> dict:
        policies = load_policies(args.policies)
        return clear(_year(args, policies), args.claims, policies, args.out, args.registry, args.ledger,
                     use_claim_identities=args.use_claim_identities, resume=args.resume,
                     bucket_rows=args.bucket_rows, memory_limit=args.memory_limit, keep_work=args.keep_work,
                     charts=not args.no_charts, stream=None if args.quiet else sys.stderr)

    status, summary = _guarded("clear", args, work)
    if summary is None:
        return status
    c, s = summary["counts"], summary["seconds"]
    t = summary["figures"]["totals"]
    print(f"cleared {c['claims']:,} claims ({c['buckets']} buckets, {c['settled']} settled now, "
          f"{c['skipped']} resumed) in {sum(s.values()):.1f} s; funds paid {format_yuan(t['fund_pay_total'])} yuan")
    r = summary["reconciliation"]
    if r:
        print(f"reconciliation: {r['matched_exactly']:,} matched exactly, {r['matched_with_difference']:,} with a "
              f"difference, {r['year_only']:,} year only, {r['ledger_only']:,} ledger only; owed "
              f"{format_yuan(r['owed'])}, to recover {format_yuan(r['to_recover'])} yuan")
    print(f"report: {args.out / 'report.html'}")
    return 0


def run_whatif(args) -> int:
    from ..policy import load_policies
    from .whatif import whatif

    def work() -> dict:
        baseline, reform = load_policies(args.baseline), load_policies(args.reform)
        return whatif(_year(args, baseline), args.claims, baseline, reform, args.out, args.registry,
                      use_claim_identities=args.use_claim_identities, bucket_rows=args.bucket_rows,
                      memory_limit=args.memory_limit, charts=not args.no_charts,
                      stream=None if args.quiet else sys.stderr)

    status, summary = _guarded("whatif", args, work)
    if summary is None:
        return status
    ch = summary["change"]
    print(f"funds {format_yuan(ch['baseline_funds'])} -> {format_yuan(ch['reform_funds'])} yuan; "
          f"{ch['pay_more']:,} persons pay more, {ch['pay_less']:,} less; report: {args.out / 'report.html'}")
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="medsettle")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_whatif(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
