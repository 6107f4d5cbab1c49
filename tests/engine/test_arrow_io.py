"""Arrow I/O of the engine: representations of the same claims give the same results."""
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
