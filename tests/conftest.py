"""Shared fixtures and helpers for the medsettle tests.

* `shared_dir()`: the shared folder (spec, seeds): env MEDSETTLE_SHARED, else
  `<repo>/../shared`.
* `claims_table(rows)`: a claims table (schema `engine.CLAIMS_SCHEMA`) from
  partial row dicts, with the defaults below filled in.
* model builders (`policy`, `layer`, `rule`, `adj`, `match`) that build
  `engine.model` objects in fen / basis points, for hand-written policies.
* accumulator conversions between the engine's table (spec section 4) and the
  reference's dicts, and `run_both` / `settle_checked` that settle with the
  engine and the reference (tests/reference.py) and compare every field.

Markers `slow` and `service` are registered here.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # `import reference` / `from conftest import ...`
    sys.path.append(str(TESTS_DIR))

import reference as ref  # noqa: E402
from engine import model as M  # noqa: E402

Y = 100  # fen per yuan: write 1000 * Y for 1,000 yuan
BP = 10_000


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "service: needs the gRPC settlement service running")


def shared_dir() -> Path:
    env = os.environ.get("MEDSETTLE_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


# --------------------------------------------------------------------------- claims

AMOUNT_COMPONENTS = ("self_funded_amount", "over_limit_amount", "class_b_copay_amount", "in_scope_amount")

#: Defaults for a claim row. Nullable columns of section 2 default to their
#: "null" meaning spelled out (referred false, no identities, class B 0, no code).
CLAIM_DEFAULTS = dict(
    person_id="p1",
    region="000001",
    scheme="resident",
    settle_time=dt.datetime(2024, 3, 1, 9, 0),
    visit_type="inpatient",
    facility_level="secondary",
    locality="county",
    referred=False,
    disease_code=None,
    age=40,
    identities=None,
    self_funded_amount=0,
    over_limit_amount=0,
    class_b_copay_amount=0,
    in_scope_amount=0,
    in_scope_class_b_amount=0,
)


def to_datetime(v):
    if v is None or isinstance(v, dt.datetime):
        return v
    if isinstance(v, dt.date):
        return dt.datetime(v.year, v.month, v.day)
    if isinstance(v, str):
        return dt.datetime.fromisoformat(v)
    raise TypeError(f"settle_time: {v!r}")


def fill_claim(row: dict, i: int = 0) -> dict:
    """One complete claim dict: given keys kept (None included), the rest defaulted.

    claim_id defaults to f"c{i}"; total_amount to the sum of the four
    components (so an unspecified total is consistent)."""
    out = dict(CLAIM_DEFAULTS)
    out["claim_id"] = f"c{i}"
    out.update(row)
    out["settle_time"] = to_datetime(out["settle_time"])
    if "total_amount" not in row:
        out["total_amount"] = sum(out[k] or 0 for k in AMOUNT_COMPONENTS)
    return out


def claims_schema() -> pa.Schema:
    import engine

    return engine.CLAIMS_SCHEMA


def claims_table(rows: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """A claims table from partial row dicts (see `fill_claim`)."""
    schema = schema or claims_schema()
    full = [fill_claim(r, i) for i, r in enumerate(rows)]
    cols = [pa.array([r.get(f.name) for r in full], type=f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def claim_dicts(table: pa.Table) -> list[dict]:
    """What the reference takes: the table's rows as Python values."""
    return table.to_pylist()


# --------------------------------------------------------------------------- model builders


def match(**kw) -> M.Match:
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    return M.Match(**kw)


def rule(m: M.Match | dict | None = None, *, ratio=None, segments=None, class_ratio=None,
         fixed_amount=None, max_personal_share=None, **kw) -> M.Rule:
    """A rule in fen / bp. `ratio=r` is one open segment; `segments=[(upto, r), ..., (None, r)]`."""
    m = m if isinstance(m, M.Match) else match(**(m or {}))
    if ratio is not None:
        return M.Rule(m, M.KIND_SEGMENTS, segments=(M.Segment(None, ratio),), **kw)
    if segments is not None:
        return M.Rule(m, M.KIND_SEGMENTS, segments=tuple(M.Segment(u, r) for u, r in segments), **kw)
    if class_ratio is not None:
        return M.Rule(m, M.KIND_CLASS_RATIO, class_ratio=tuple(class_ratio), **kw)
    if fixed_amount is not None:
        return M.Rule(m, M.KIND_FIXED_AMOUNT, fixed_amount=fixed_amount, **kw)
    if max_personal_share is not None:
        return M.Rule(m, M.KIND_MAX_PERSONAL_SHARE, max_personal_share=max_personal_share, **kw)
    raise ValueError("rule needs a kind")


def adj(m: M.Match | dict | None = None, **kw) -> M.Adjustment:
    m = m if isinstance(m, M.Match) else match(**(m or {}))
    return M.Adjustment(m, **kw)


def layer(name, fund, rules, cap_groups=None, adjustments=()) -> M.Layer:
    return M.Layer(name=name, fund=fund, rules=tuple(rules), cap_groups=dict(cap_groups or {}),
                   adjustments=tuple(adjustments))


def policy(layers, *, id="t", region="000001", scheme="resident", year=2024, **kw) -> M.Policy:
    kw.setdefault("identities", ())
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    return M.Policy(id=id, region=region, scheme=scheme, year=year, layers=tuple(layers), **kw)


def policy_set(*policies) -> M.PolicySet:
    import engine

    return engine.PolicySet(policies=tuple(policies))


# --------------------------------------------------------------------------- accumulators


def acc_from_table(table: pa.Table | None) -> dict:
    """The engine's accumulator table (spec section 4) as the reference's dict."""
    out = {}
    if table is None:
        return out
    for r in table.to_pylist():
        key = (r["person_id"], r["region"], r["scheme"], int(r["year"]))
        assert key not in out, f"accumulator key {key} twice"
        layers = {}
        for e in r["layers"] or []:
            lk = (e["layer"], e["cap_group"])
            assert lk not in layers, f"layer entry {lk} twice under {key}"
            layers[lk] = [e["position"], e["paid"], e["deductible_charged"]]
        out[key] = {"admissions": r["admissions"], "compliant_total": r["compliant_total"], "layers": layers}
    return out


def acc_to_table(acc: dict) -> pa.Table:
    """Reference accumulators as a table of schema `engine.ACCUMULATORS_SCHEMA`."""
    import engine

    schema = engine.ACCUMULATORS_SCHEMA
    rows = []
    for (person, region, scheme, year), a in acc.items():
        rows.append(dict(
            person_id=person, region=region, scheme=scheme, year=year,
            admissions=a["admissions"], compliant_total=a["compliant_total"],
            layers=[dict(layer=l, cap_group=g, position=v[0], paid=v[1], deductible_charged=v[2])
                    for (l, g), v in a["layers"].items()],
        ))
    return pa.Table.from_pylist(rows, schema=schema)


# --------------------------------------------------------------------------- engine vs reference

RESULT_FIELDS = ref.RESULT_FIELDS


def norm_result(r: dict) -> dict:
    out = {k: r[k] for k in RESULT_FIELDS}
    out["layer_pays"] = [(e["layer"], e["pay"]) for e in (r["layer_pays"] or [])]
    return out


def engine_settle(ps, claims, accumulators=None):
    """engine.settle with accumulators given as a reference dict or a table."""
    import engine

    if isinstance(accumulators, dict):
        accumulators = acc_to_table(accumulators)
    return engine.settle(claims, ps, accumulators)


def compare(eng_results: list[dict], ref_results: list[dict], eng_acc: dict, ref_acc: dict, rows=None,
            carry: dict | None = None):
    """Assert engine == reference on every result field and the closing accumulators.

    A carried-in key that this call did not change may be left out of the
    engine's closing accumulators (section 4: keys with nothing settled)."""
    assert len(eng_results) == len(ref_results)
    for i, (e, r) in enumerate(zip(eng_results, ref_results)):
        e, r = norm_result(e), norm_result(r)
        if e != r:
            diff = {k: (e[k], r[k]) for k in RESULT_FIELDS if e[k] != r[k]}
            raise AssertionError(
                f"row {i} ({e['claim_id']}): engine != reference: {{field: (engine, reference)}} = {diff}"
                + (f"\nclaim: {rows[i]}" if rows is not None else "")
            )
    ne, nr = ref.normalize_accumulators(eng_acc), ref.normalize_accumulators(ref_acc)
    nc = ref.normalize_accumulators(carry or {})
    nr = {k: v for k, v in nr.items() if k in ne or nc.get(k) != v}
    assert ne == nr, f"closing accumulators: engine {ne} != reference {nr}"


def run_both(ps, rows_or_table, accumulators=None):
    """Settle with the engine and the reference, assert they agree; return the
    engine's result rows (list of dicts) and closing accumulators (reference dict)."""
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else claims_table(rows_or_table)
    carry = accumulators if isinstance(accumulators, (dict, type(None))) else acc_from_table(accumulators)
    res = engine_settle(ps, table, accumulators)
    eng_rows = res.results.to_pylist()
    eng_acc = acc_from_table(res.accumulators)
    ref_rows, ref_acc = ref.settle(ps, claim_dicts(table), carry)
    compare(eng_rows, ref_rows, eng_acc, ref_acc, claim_dicts(table), carry)
    return eng_rows, eng_acc


def by_id(results: list[dict]) -> dict:
    return {r["claim_id"]: r for r in results}
