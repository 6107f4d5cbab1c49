"""Year-end clearing at province scale (issue 17; docs/CLEARING.md).

Re-settle a year with the final rules and the final registry, reconcile it with what
the counter paid (the ledger export), settle the accounts between the funds, the
critical-illness insurer and the hospitals, and report on the year; or settle the
year under two policy sets side by side (what-if). One module per phase:
partition, resettle, reconcile, accounts, report; whatif; command for the CLI.
"""
from .clear import clear
from .partition import ClearingError
from .whatif import whatif

__all__ = ["ClearingError", "clear", "whatif"]
