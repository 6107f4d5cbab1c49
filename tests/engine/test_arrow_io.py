"""Arrow I/O of the engine: representations of the same claims give the same results."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import engine
from engine.arrow_io import DICTIONARY_COLUMNS
from engine.generate import generate_claims


@pytest.fixture(scope="module")
def claims():
    ps = engine.load_policies()
    return ps, generate_claims(ps, 5000, seed=7, invalid_rate=0.05)


def _dictionary_encoded(table: pa.Table) -> pa.Table:
    for name in DICTIONARY_COLUMNS:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.dictionary_encode(table.column(name)))
    return table


def test_dictionary_encoded_strings_settle_the_same(claims):
    ps, table = claims
    plain = engine.settle(table, ps)
    encoded = engine.settle(_dictionary_encoded(table), ps)
    assert encoded.results.equals(plain.results)
    assert encoded.accumulators.equals(plain.accumulators)


def test_dictionary_encoding_of_an_id_column_is_still_a_schema_error(claims):
    ps, table = claims
    i = table.schema.get_field_index("claim_id")
    bad = table.set_column(i, "claim_id", pc.dictionary_encode(table.column("claim_id")))
    with pytest.raises(engine.ClaimsSchemaError, match="claim_id"):
        engine.settle(bad, ps)


def test_results_schema_and_input_order(claims):
    ps, table = claims
    res = engine.settle(table, ps).results
    assert res.schema.equals(engine.RESULTS_SCHEMA)
    assert res.column("claim_id").equals(table.column("claim_id"))


# --------------------------------------------------------------------------- Python-value rows


PREPARED_ARRAYS = ("claim_offsets", "claim_data", "claim_valid", "person_offsets", "person_data", "missing", "visit",
                   "level", "locality", "invalid_enum", "referred", "age", "total", "self_funded", "over_limit",
                   "class_b_copay", "in_scope", "in_scope_class_b", "identity_mask", "disease", "settle_time",
                   "policy")


def _rows(table: pa.Table) -> list:
    """The table as `Settler.settle_rows` takes it: tuples, settle_time as int microseconds."""
    cols = [table.column(name).to_pylist() for name in engine.CLAIMS_SCHEMA.names]
    cols[engine.CLAIMS_SCHEMA.names.index("settle_time")] = table.column("settle_time").cast(pa.int64()).to_pylist()
    return list(zip(*cols))


@pytest.fixture(scope="module")
def edge_claims(claims):
    """The generated claims plus rows at the edges of each column's preparation."""
    ps, table = claims
    base = table.slice(0, 1).to_pylist()[0]
    edits = [
        {"disease_code": " c50.9 "}, {"disease_code": "c5"}, {"disease_code": ""}, {"disease_code": None},
        {"identities": None}, {"identities": []}, {"identities": ["no_such_identity"]},
        {"identities": [None, "low_income", "low_income"]}, {"region": "nowhere"}, {"region": None},
        {"scheme": "other"}, {"scheme": None}, {"visit_type": "spa"}, {"facility_level": None},
        {"locality": "moon"}, {"age": None}, {"age": -3}, {"referred": None}, {"claim_id": None},
        {"person_id": ""}, {"settle_time": None}, {"total_amount": None}, {"in_scope_class_b_amount": None},
        {"claim_id": "病历-0001", "person_id": "人员-1"},
    ]
    extra = pa.Table.from_pylist([{**base, **e, "claim_id": e.get("claim_id", f"edge-{i}")}
                                  for i, e in enumerate(edits)], schema=engine.CLAIMS_SCHEMA)
    return ps, pa.concat_tables([table, extra])


def test_rows_prepare_as_arrow_does(edge_claims):
    from engine.arrow_io import PreparedClaims
    from engine.settle import compiled

    ps, table = edge_claims
    c = compiled(ps)
    arrow = PreparedClaims(table.combine_chunks().to_batches()[0], c)
    rows = PreparedClaims.from_rows(_rows(table), c)
    assert rows.n == arrow.n
    for name in PREPARED_ARRAYS:
        if name.endswith(("_offsets", "_data")):
            continue
        a, b = getattr(arrow, name), getattr(rows, name)
        assert a.dtype == b.dtype, name
        assert (a == b).all(), name
    # the strings: what the offsets point at, for the rows that have one (Arrow may keep
    # bytes under a null)
    for prefix, valid in (("claim", arrow.claim_valid), ("person", 1 - arrow.missing)):
        for p in (arrow, rows):
            assert getattr(p, prefix + "_offsets").dtype == np.int32 and getattr(p, prefix + "_data").dtype == np.uint8

        def strings(p):
            off, data = getattr(p, prefix + "_offsets"), getattr(p, prefix + "_data")
            return [bytes(data[off[i]:off[i + 1]]) for i in range(p.n) if valid[i]]

        assert strings(rows) == strings(arrow), prefix
    assert rows.claim_ids() == arrow.claim_ids()


@pytest.mark.parametrize("start", [1, 3, 2501, 4997])
def test_a_sliced_batch_prepares_as_its_copy(edge_claims, start):
    """Slices start mid-byte of the validity and boolean bitmaps, which preparation reads directly."""
    from engine.arrow_io import PreparedClaims
    from engine.settle import compiled

    ps, table = edge_claims
    c = compiled(ps)
    batch = table.combine_chunks().to_batches()[0]
    sliced = batch.slice(start)
    copied = pa.RecordBatch.from_pylist(sliced.to_pylist(), schema=batch.schema)
    assert sliced.column("age").offset == start
    a, b = PreparedClaims(sliced, c), PreparedClaims(copied, c)
    assert a.missing.any() and (a.age == -1).any()
    for name in PREPARED_ARRAYS:
        if name.endswith(("_offsets", "_data")):
            continue
        assert (getattr(a, name) == getattr(b, name)).all(), name
    assert engine.Settler(ps).settle_batch(sliced).equals(engine.Settler(ps).settle_batch(copied))


@pytest.mark.parametrize("deltas", [False, True])
def test_settle_rows_equals_settle_batch(edge_claims, deltas):
    ps, table = edge_claims
    first, second = table.slice(0, 3000), table.slice(3000)
    a = engine.Settler(ps, deltas=deltas)
    b = engine.Settler(ps, deltas=deltas)
    for part in (first, second):  # the second part sees the first's accumulators and claim ids
        expected = a.settle_batch(part.combine_chunks().to_batches()[0]).to_pylist()
        assert b.settle_rows(_rows(part)) == expected
    assert b.accumulators().equals(a.accumulators())


def test_carry_in_rows_equals_the_table_form(claims):
    ps, table = claims
    acc = engine.settle(table, ps).accumulators
    rows = [(r["person_id"], r["region"], r["scheme"], r["year"], r["admissions"], r["compliant_total"],
             [((e["layer"], e["cap_group"]), (e["position"], e["paid"], e["deductible_charged"])) for e in r["layers"]])
            for r in acc.to_pylist()]
    s = engine.Settler(ps)
    s.carry_in_rows(rows)
    assert s.accumulators().equals(engine.Settler(ps, acc).accumulators())
    more = table.slice(0, 500)
    assert s.settle_batch(more.combine_chunks().to_batches()[0]).equals(
        engine.Settler(ps, acc).settle_batch(more.combine_chunks().to_batches()[0]))


@pytest.mark.parametrize("dictionary", [False, True])
def test_carried_entries_no_version_names_are_returned_unchanged(claims, dictionary):
    """Spec section 4 (revision 2): entries are matched by (layer, cap group) names; one that
    no version of the key's year names is kept and returned as it came, by both carry forms,
    even on a key that holds nothing else."""
    ps, table = claims
    acc = engine.settle(table.slice(0, 2000), ps).accumulators
    r = next(r for r in acc.to_pylist() if r["layers"])
    entries = [((e["layer"], e["cap_group"]), (e["position"], e["paid"], e["deductible_charged"]))
               for e in r["layers"]]
    foreign = [(("no_layer", None), (1, 2, 0)), (("basic", "renamed"), (0, 7, 3))]
    rows = [(r["person_id"], r["region"], r["scheme"], r["year"], r["admissions"], r["compliant_total"],
             entries + foreign),
            ("only-foreign", r["region"], r["scheme"], r["year"], 0, 0, [(("gone", "g"), (0, 0, 9))])]
    s = engine.Settler(ps)
    s.carry_in_rows(rows)
    out = {x["person_id"]: x for x in s.accumulators(dictionary=dictionary).to_pylist()}
    got = [((e["layer"], e["cap_group"]), (e["position"], e["paid"], e["deductible_charged"]))
           for e in out[r["person_id"]]["layers"]]
    assert got == entries + foreign
    assert [(e["layer"], e["cap_group"], e["deductible_charged"]) for e in out["only-foreign"]["layers"]] == [
        ("gone", "g", 9)]
    as_table = pa.Table.from_pylist([{
        "person_id": p, "region": reg, "scheme": sch, "year": y, "admissions": a, "compliant_total": ct,
        "layers": [{"layer": l, "cap_group": c, "position": v[0], "paid": v[1], "deductible_charged": v[2]}
                   for (l, c), v in ls]} for p, reg, sch, y, a, ct, ls in rows], schema=engine.ACCUMULATORS_SCHEMA)
    assert engine.Settler(ps, as_table).accumulators(dictionary=dictionary).equals(
        s.accumulators(dictionary=dictionary))


@pytest.mark.parametrize("edit, message", [
    (lambda r: (r[0], "nowhere", *r[2:]), "no policy for this region, scheme and year"),
    (lambda r: (*r[:4], -1, *r[5:]), "admissions -1 is outside"),
    (lambda r: (*r[:6], [*r[6], (r[6][0][0], (0, -5, 0))]), "appears twice|outside"),
    (lambda r: (*r[:6], [(r[6][0][0], (0, -5, 0))]), "holds a value outside"),
])
def test_carry_in_rows_rejects_what_the_table_form_rejects(claims, edit, message):
    ps, table = claims
    acc = engine.settle(table.slice(0, 2000), ps).accumulators
    r = next(r for r in acc.to_pylist() if r["layers"])
    row = (r["person_id"], r["region"], r["scheme"], r["year"], r["admissions"], r["compliant_total"],
           [((e["layer"], e["cap_group"]), (e["position"], e["paid"], e["deductible_charged"])) for e in r["layers"]])
    with pytest.raises(engine.AccumulatorError, match=message) as rows_error:
        engine.Settler(ps).carry_in_rows([edit(row)])
    assert repr(r["person_id"]) in str(rows_error.value)
    bad = edit(row)
    as_table = pa.Table.from_pylist([{
        "person_id": bad[0], "region": bad[1], "scheme": bad[2], "year": bad[3], "admissions": bad[4],
        "compliant_total": bad[5], "layers": [{"layer": l, "cap_group": c, "position": v[0], "paid": v[1],
                                                "deductible_charged": v[2]} for (l, c), v in bad[6]]}],
        schema=engine.ACCUMULATORS_SCHEMA)
    with pytest.raises(engine.AccumulatorError) as table_error:
        engine.Settler(ps, as_table)
    assert str(table_error.value) == str(rows_error.value)


def test_carry_in_rows_rejects_a_key_twice(claims):
    ps, table = claims
    r = engine.settle(table.slice(0, 100), ps).accumulators.to_pylist()[0]
    row = (r["person_id"], r["region"], r["scheme"], r["year"], r["admissions"], r["compliant_total"], [])
    with pytest.raises(engine.AccumulatorError, match="appears twice"):
        engine.Settler(ps).carry_in_rows([row, row])


# --------------------------------------------------------------------------- dictionary results


def test_dictionary_results_hold_the_same_values(claims):
    ps, table = claims
    plain = engine.Settler(ps).settle_batch(table.combine_chunks().to_batches()[0])
    encoded = engine.Settler(ps).settle_batch(table.combine_chunks().to_batches()[0], dictionary=True)
    assert encoded.schema.equals(engine.results_schema(dictionary=True))
    for name in ("status", "policy_id", "identity"):
        assert pa.types.is_dictionary(encoded.schema.field(name).type)
    # error rows have a null policy and identity: nulls survive the encoding
    assert encoded.column("policy_id").null_count == plain.column("policy_id").null_count > 0
    assert encoded.column("identity").null_count == plain.column("identity").null_count > 0
    assert encoded.to_pylist() == plain.to_pylist()
    assert pa.Table.from_batches([encoded]).cast(engine.RESULTS_SCHEMA).equals(pa.Table.from_batches([plain]))


def test_results_schema_with_deltas():
    schema = engine.results_schema(deltas=True, dictionary=True)
    assert schema.names[:len(engine.RESULTS_SCHEMA)] == engine.RESULTS_SCHEMA.names
    assert schema.names[len(engine.RESULTS_SCHEMA):] == ["delta_admissions", "delta_compliant_total", "delta_layers"]
    assert engine.results_schema().equals(engine.RESULTS_SCHEMA)
