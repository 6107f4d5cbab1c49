"""One home for the contract's schemas, enums and limits (spec sections 1-4, 7).

Everything that the engine, the generator, the server and the tools must agree
on is defined here once and imported from here: the claims, results,
accumulators and persons schemas, the enum vocabularies, the status codes, the
fund names and the bounds on amounts. Nothing here computes anything, so every
module may import it.
"""
from __future__ import annotations

import pyarrow as pa

# Units (spec section 1): money in integer fen, ratios in integer basis points.
BP = 10_000
FEN_PER_YUAN = 100

#: A claim amount is in [0, MAX_AMOUNT] fen (else AMOUNT_OUT_OF_RANGE).
MAX_AMOUNT = 10**12
#: A carried accumulator value, and a key's compliant_total, is at most this (spec 1 and 4).
MAX_CARRIED = 10**14

# Enums of spec section 2 and 6.2, in the order their codes take.
VISIT_TYPES = ("inpatient", "outpatient", "chronic", "maternity")
FACILITY_LEVELS = ("primary", "secondary", "tertiary")
LOCALITIES = ("county", "region", "province", "national")
SCHEMES = ("employee", "resident")
FUNDS = ("basic", "supplementary", "critical_illness", "medical_aid", "guarantee")
#: The result column of each fund, in FUNDS order.
FUND_COLUMNS = tuple(f"{f}_pay" for f in FUNDS)
#: What a settler's per-policy totals add up (Settler.keep_totals), in this order: the result
#: columns of what was paid, as engine/_columns.pyx's result_columns writes them.
PAID_TOTALS = (*FUND_COLUMNS, "fund_pay_total", "personal_pay", "compliant_personal_pay", "deductible_applied")

#: Result statuses (spec section 7), in precedence order; the index is the kernel's code.
STATUSES = ("ok", "MISSING_FIELD", "INVALID_VALUE", "INVALID_AMOUNT", "AMOUNT_OUT_OF_RANGE",
            "AMOUNT_MISMATCH", "UNKNOWN_POLICY", "UNKNOWN_IDENTITY", "DUPLICATE_CLAIM",
            "NO_BENEFIT_RULE")

AMOUNT_COLUMNS = ("total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
                  "in_scope_amount", "in_scope_class_b_amount")

CLAIMS_SCHEMA = pa.schema([
    ("claim_id", pa.string()),
    ("person_id", pa.string()),
    ("region", pa.string()),
    ("scheme", pa.string()),
    ("settle_time", pa.timestamp("us")),
    ("visit_type", pa.string()),
    ("facility_level", pa.string()),
    ("locality", pa.string()),
    ("referred", pa.bool_()),
    ("disease_code", pa.string()),
    ("age", pa.int16()),
    ("identities", pa.list_(pa.string())),
    *[(c, pa.int64()) for c in AMOUNT_COLUMNS],
])

#: Null in these is MISSING_FIELD; the others have a meaning when null (spec section 2).
REQUIRED_COLUMNS = ("claim_id", "person_id", "region", "scheme", "settle_time", "visit_type",
                    "facility_level", "locality", *AMOUNT_COLUMNS[:5])

#: Low-cardinality string columns that may also come dictionary-encoded, as Parquet readers
#: give them with `read_dictionary`: the same strings, without materializing them per row.
DICTIONARY_COLUMNS = ("region", "scheme", "visit_type", "facility_level", "locality", "disease_code")

#: The command line's sentence per error row (engine/detail.py), after spec section 3's columns.
STATUS_DETAIL = pa.field("status_detail", pa.string())

LAYER_ENTRY = pa.struct([("layer", pa.string()), ("cap_group", pa.string()), ("position", pa.int64()),
                         ("paid", pa.int64()), ("deductible_charged", pa.int64())])


def layer_pays_type(layer_type: pa.DataType) -> pa.DataType:
    """`layer_pays` with its layer names of `layer_type` (string, or a dictionary of strings)."""
    entry = pa.struct([pa.field("layer", layer_type, nullable=False), pa.field("pay", pa.int64(), nullable=False)])
    return pa.list_(pa.field("item", entry, nullable=False))


#: Result amount columns, in schema order.
RESULT_AMOUNT_COLUMNS = ("deductible_applied", *FUND_COLUMNS, "fund_pay_total", "personal_pay",
                         "compliant_personal_pay")

# Status, amounts, layer_pays and cap_hit are never null (spec section 3: an error row has
# every amount 0), and the schema says so: Parquet stores them as required columns, with
# no definition levels to write or read (a tenth of the results writer's time).
RESULTS_SCHEMA = pa.schema([
    ("claim_id", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    ("policy_id", pa.string()),
    ("identity", pa.string()),
    *[pa.field(name, pa.int64(), nullable=False) for name in RESULT_AMOUNT_COLUMNS],
    pa.field("layer_pays", layer_pays_type(pa.string()), nullable=False),
    pa.field("cap_hit", pa.bool_(), nullable=False),
])

#: What each claim added to its key's accumulators (`settle(..., deltas=True)`).
DELTA_FIELDS = [("delta_admissions", pa.int64()), ("delta_compliant_total", pa.int64()),
                ("delta_layers", pa.list_(LAYER_ENTRY))]

ACCUMULATORS_SCHEMA = pa.schema([
    ("person_id", pa.string()),
    ("region", pa.string()),
    ("scheme", pa.string()),
    ("year", pa.int32()),
    ("admissions", pa.int64()),
    ("compliant_total", pa.int64()),
    ("layers", pa.list_(LAYER_ENTRY)),
])

#: One identity spell of a person; `valid_from` and `valid_to` are both inclusive, null = open.
SPELL_TYPE = pa.struct([("identity", pa.string()), ("valid_from", pa.date32()), ("valid_to", pa.date32())])

#: The person registry (one row per person): the facts the server and year-end clearing take
#: from the registry rather than from the caller.
PERSONS_SCHEMA = pa.schema([
    ("person_id", pa.string()),
    ("region", pa.string()),
    ("scheme", pa.string()),
    ("birth_date", pa.date32()),
    ("identities", pa.list_(SPELL_TYPE)),
])


def format_yuan(fen: int, thousands: bool = True) -> str:
    """Integer fen as yuan with two decimals (and thousands separators), no float."""
    fen = int(fen)
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    whole = f"{fen // FEN_PER_YUAN:,}" if thousands else str(fen // FEN_PER_YUAN)
    return f"{sign}{whole}.{fen % FEN_PER_YUAN:02d}"


#: The real-time ledger as exported for year-end clearing and audit (`medsettle ledger export`),
#: one row per ledger entry in commit order. A `settle` row holds the claim as it was settled
#: (the registry basis the server used in region, scheme, age and identities), its result and
#: the accumulator deltas it made; a `reverse` row holds the reversed claim's id, its person key,
#: the negated deltas and the reason, and null claim and result columns. Clearing matches the
#: year's re-settlement to the `settle` rows of claims without a `reverse` row.
LEDGER_SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # "settle" | "reverse"
    pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ("facility_id", pa.string()),
    *CLAIMS_SCHEMA,
    ("status", pa.string()),
    ("policy_id", pa.string()),
    ("identity", pa.string()),
    *[(name, pa.int64()) for name in RESULT_AMOUNT_COLUMNS],
    ("layer_pays", layer_pays_type(pa.string())),
    ("cap_hit", pa.bool_()),
    *DELTA_FIELDS,
    ("reason", pa.string()),
])


#: Policy format revision 2 (SETTLEMENT.md 5.2 step 2, 6.2): an adjustment's `cap_factor` is in
#: [0, 10] (basis points: [0, MAX_CAP_FACTOR]); a rule's combined cap factor, multiplied in file
#: order and rounded after each factor, stops at MAX_COMBINED_CAP_FACTOR (10^6 bp = x100), so a
#: scaled cap (at most 10^12 fen x 10^6) stays far inside int64.
MAX_CAP_FACTOR = 10 * BP
MAX_COMBINED_CAP_FACTOR = 100 * BP

#: The facility registry (one row per settling hospital or pharmacy, 定点医药机构), read by
#: `medsettle serve --facilities`: the level decides a claim's facility level, region and
#: admin_code (6-digit GB/T 2260 codes: the pooling region, 统筹区, and the county, 行政区划)
#: decide its locality where they can. `level` is one of FACILITY_LEVELS.
FACILITIES_SCHEMA = pa.schema([
    ("facility_id", pa.string()),
    ("name", pa.string()),
    ("region", pa.string()),
    ("admin_code", pa.string()),
    ("level", pa.string()),
])
