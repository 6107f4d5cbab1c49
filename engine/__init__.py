"""medsettle engine: one-stop settlement (一站式结算) of China's medical insurance layers.

Load a folder of policy files once, then settle Arrow batches of claims
against it; see docs/API.md and ../shared/spec/SETTLEMENT.md.
"""
from . import _blas  # noqa: F401 - first: before anything imports NumPy
from .arrow_io import (
    ACCUMULATORS_SCHEMA,
    CLAIMS_SCHEMA,
    RESULTS_SCHEMA,
    STATUSES,
    ClaimsSchemaError,
    accumulators_schema,
    results_schema,
)
from .explain import explain, format_explanation
from .model import PolicySet
from .policy import PolicyError, default_policies_path, load_policies, parse_policy
from .settle import AccumulatorError, Settlement, Settler, settle

__all__ = [
    "ACCUMULATORS_SCHEMA", "CLAIMS_SCHEMA", "RESULTS_SCHEMA", "STATUSES",
    "AccumulatorError", "ClaimsSchemaError", "PolicyError", "PolicySet", "Settlement", "Settler",
    "accumulators_schema", "default_policies_path", "explain", "format_explanation", "load_policies", "parse_policy", "results_schema", "settle",
]
