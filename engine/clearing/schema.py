"""The schemas of year-end clearing's tables, defined once (documented in docs/CLEARING.md).

Every table clearing writes is cast to its schema here before it is written, so a
query that changes a column's type fails the run instead of changing the file.
Money columns are int64 fen; shares are int64 basis points, rounded half up.
"""
from __future__ import annotations

import pyarrow as pa

from ..schema import CLAIMS_SCHEMA, FUND_COLUMNS, FUNDS, RESULTS_SCHEMA

#: Clearing's own row statuses, besides the engine's (engine.schema.STATUSES): a claim whose
#: person is not in the registry, and one dated before the person's birth (the server's
#: INVALID_VALUE). Such a row is settled as an error: every amount 0, no accumulator touched.
UNKNOWN_PERSON = "UNKNOWN_PERSON"
BEFORE_BIRTH = "INVALID_VALUE"

_money = pa.int64()


def _fund_fields(prefix: str = "", suffix: str = "_pay") -> list[pa.Field]:
    return [pa.field(f"{prefix}{f}{suffix}", _money, nullable=False) for f in FUNDS]


#: One row per claim of the year as re-settled (results/bucket-*.parquet): the claim as
#: settled (the registry's basis applied), its result, where it came from.
CLEARED_SCHEMA = pa.schema([
    pa.field("ord", pa.int64(), nullable=False),  # input position: file index << 40 | row in file
    *[CLAIMS_SCHEMA.field(n) for n in ("claim_id", "person_id", "region", "scheme", "settle_time",
                                       "visit_type", "facility_level", "locality")],
    pa.field("facility_id", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    RESULTS_SCHEMA.field("policy_id"),
    RESULTS_SCHEMA.field("identity"),
    *[pa.field(n, _money) for n in ("total_amount", "in_scope_amount")],
    pa.field("compliant_amount", _money, nullable=False),  # K of spec 5.1 (0 on error rows)
    *[RESULTS_SCHEMA.field(n) for n in ("deductible_applied", *FUND_COLUMNS, "fund_pay_total", "personal_pay",
                                        "compliant_personal_pay", "layer_pays", "cap_hit")],
])

_group_sums = [pa.field("claims", pa.int64(), nullable=False),
               pa.field("total_amount", _money, nullable=False), pa.field("compliant_amount", _money, nullable=False),
               *_fund_fields(), pa.field("fund_pay_total", _money, nullable=False),
               pa.field("personal_pay", _money, nullable=False),
               pa.field("compliant_personal_pay", _money, nullable=False)]

#: accounts/fund_totals.parquet: settled (status ok) claims per cell of every dimension.
FUND_TOTALS_SCHEMA = pa.schema([
    pa.field("region", pa.string()), pa.field("scheme", pa.string()), pa.field("policy_id", pa.string()),
    pa.field("month", pa.int32()), pa.field("visit_type", pa.string()), pa.field("facility_level", pa.string()),
    pa.field("identity", pa.string()),  # null: none held
    *_group_sums,
])

#: accounts/critical_illness.parquet: the critical-illness insurer's account by region and month.
CRITICAL_ILLNESS_SCHEMA = pa.schema([
    pa.field("region", pa.string()), pa.field("scheme", pa.string()), pa.field("month", pa.int32()),
    pa.field("layer", pa.string()),
    pa.field("claims", pa.int64(), nullable=False), pa.field("persons", pa.int64(), nullable=False),
    pa.field("paid", _money, nullable=False),
])

#: accounts/facilities.parquet: per facility (null facility_id: not known), for the hospitals' accounts.
FACILITIES_SCHEMA = pa.schema([
    pa.field("facility_id", pa.string()), pa.field("region", pa.string()), pa.field("facility_level", pa.string()),
    *_group_sums,
])

#: accounts/persons.parquet: per person and accumulator key, the annual summary.
PERSONS_SUMMARY_SCHEMA = pa.schema([
    pa.field("person_id", pa.string()), pa.field("region", pa.string()), pa.field("scheme", pa.string()),
    pa.field("identity", pa.string()),  # the most favourable effective identity of the year's claims
    pa.field("claims", pa.int64(), nullable=False),
    pa.field("total_amount", _money, nullable=False), pa.field("in_scope_amount", _money, nullable=False),
    pa.field("compliant_amount", _money, nullable=False),
    *_fund_fields(), pa.field("fund_pay_total", _money, nullable=False),
    pa.field("personal_pay", _money, nullable=False), pa.field("compliant_personal_pay", _money, nullable=False),
    pa.field("compliant_paid_bp", pa.int64()),  # fund_pay_total / compliant_amount in bp (null if 0)
    pa.field("in_scope_paid_bp", pa.int64()),  # fund_pay_total / in_scope_amount in bp (null if 0)
])

#: reconciliation/claims.parquet: per claim needing action (a difference, or on one side only).
RECONCILIATION_SCHEMA = pa.schema([
    pa.field("claim_id", pa.string(), nullable=False), pa.field("person_id", pa.string()),
    pa.field("region", pa.string()), pa.field("scheme", pa.string()), pa.field("settle_time", pa.timestamp("us")),
    pa.field("facility_id", pa.string()),
    pa.field("match", pa.string(), nullable=False),  # both | year_only | ledger_only
    pa.field("year_status", pa.string()),  # the re-settlement's status (null: not in the year's data)
    pa.field("reversed_at_counter", pa.bool_(), nullable=False),
    *_fund_fields("year_"), *_fund_fields("paid_"), *_fund_fields("diff_"),
    pa.field("diff_total", _money, nullable=False),  # > 0: owed to the patient's side; < 0: to recover
    pa.field("diff_personal_pay", _money, nullable=False),
])

#: reconciliation/persons.parquet: per person, the sum of their claims' differences.
RECONCILIATION_PERSONS_SCHEMA = pa.schema([
    pa.field("person_id", pa.string()), pa.field("region", pa.string()), pa.field("scheme", pa.string()),
    pa.field("claims", pa.int64(), nullable=False),
    *_fund_fields("diff_"), pa.field("diff_total", _money, nullable=False),
    pa.field("diff_personal_pay", _money, nullable=False),
])

#: what-if: per cell, the baseline's and the reform's figures side by side.
WHATIF_FUNDS_SCHEMA = pa.schema([
    pa.field("region", pa.string()), pa.field("scheme", pa.string()), pa.field("fund", pa.string()),
    pa.field("baseline", _money, nullable=False), pa.field("reform", _money, nullable=False),
    pa.field("change", _money, nullable=False),
])

WHATIF_IDENTITY_SCHEMA = pa.schema([
    pa.field("identity", pa.string()), pa.field("persons", pa.int64(), nullable=False),
    pa.field("baseline_personal_pay", _money, nullable=False), pa.field("reform_personal_pay", _money, nullable=False),
    pa.field("change", _money, nullable=False),
    pa.field("pay_more", pa.int64(), nullable=False), pa.field("pay_less", pa.int64(), nullable=False),
    pa.field("pay_same", pa.int64(), nullable=False),
    pa.field("more_by", _money, nullable=False), pa.field("less_by", _money, nullable=False),
])

WHATIF_PERSONS_SCHEMA = pa.schema([
    pa.field("person_id", pa.string()), pa.field("region", pa.string()), pa.field("scheme", pa.string()),
    pa.field("identity", pa.string()),
    pa.field("baseline_personal_pay", _money, nullable=False), pa.field("reform_personal_pay", _money, nullable=False),
    pa.field("change", _money, nullable=False),
    *_fund_fields("baseline_"), *_fund_fields("reform_"),
])

#: The Parquet tables of a clearing run, by path under --out.
TABLES = {
    "accounts/fund_totals.parquet": FUND_TOTALS_SCHEMA,
    "accounts/critical_illness.parquet": CRITICAL_ILLNESS_SCHEMA,
    "accounts/facilities.parquet": FACILITIES_SCHEMA,
    "accounts/persons.parquet": PERSONS_SUMMARY_SCHEMA,
    "reconciliation/claims.parquet": RECONCILIATION_SCHEMA,
    "reconciliation/persons.parquet": RECONCILIATION_PERSONS_SCHEMA,
}
