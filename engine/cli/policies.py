"""`medsettle policies check`: validate a policy folder and list what it holds: every policy
with its `effective_from` (a year's versions one under another, in the order they come into
force), its layers, rules and identities."""
from __future__ import annotations

from ..model import PolicySet
from . import common


def register(sub) -> None:
    p = sub.add_parser("policies", help="policy folders", description="Policy folders.")
    actions = p.add_subparsers(dest="policies_command", metavar="ACTION")
    actions.required = True
    chk = actions.add_parser("check", help="validate a policy folder and list it")
    chk.add_argument("dir", nargs="?", metavar="DIR", help="policy folder (default: the bundled policies)")
    chk.set_defaults(func=run_check)


def policy_rows(ps: PolicySet) -> list[list[str]]:
    rows = []
    for p in sorted(ps.policies, key=lambda p: (p.region, p.scheme, p.year, p.effective_from, p.id)):
        rules = [len(layer.rules) for layer in p.layers]
        rows.append([
            p.id, p.region, p.scheme, str(p.year), p.effective_from.isoformat(),
            ", ".join(f"{layer.name} ({layer.fund})" for layer in p.layers),
            f"{sum(rules)} ({'+'.join(map(str, rules))})",
            ", ".join(p.identities) or "-",
        ])
    return rows


def run_check(args) -> int:
    ps = common.policies(args.dir)
    head = ["id", "region", "scheme", "year", "effective_from", "layers", "rules", "identities"]
    rows = policy_rows(ps)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    where = args.dir if args.dir is not None else "bundled policies"
    print(f"{len(rows)} polic{'y' if len(rows) == 1 else 'ies'} OK ({where})")
    return 0
