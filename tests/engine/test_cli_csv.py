"""CSV claims: errors name the column (not Arrow's 0-based number) and an amount written in
yuan gets the reminder that amounts are integer fen (issue 13 item 6)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

import engine
from engine.cli import main, to_csv_table
from engine.files import CliError, ClaimsFile, csv_error
from engine.generate import generate_claims


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    claims = generate_claims(engine.load_policies(None), 40, seed=1)
    # an extra first column, so that Arrow's column numbers and the schema's order differ
    table = to_csv_table(claims)
    table = table.add_column(0, "hospital", pa.array(["H1"] * table.num_rows))
    path = tmp_path_factory.mktemp("csv") / "ok.csv"
    pcsv.write_csv(table, path)
    return path.read_text().splitlines()


def with_value(tmp_path, lines, column: str, value: str):
    head = [h.strip('"') for h in lines[0].split(",")]
    row = lines[5].split(",")
    row[head.index(column)] = value
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([*lines[:5], ",".join(row), *lines[6:]]) + "\n")
    return path


def settle_error(capsys, path, tmp_path) -> str:
    code = main(["settle", str(path), "-o", str(tmp_path / "r.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.parquet").exists()
    return err


def test_yuan_amount_gets_a_hint(capsys, tmp_path, text):
    err = settle_error(capsys, with_value(tmp_path, text, "in_scope_amount", "1916.35"), tmp_path)
    assert "column 'in_scope_amount'" in err and "#" not in err
    assert "integer fen" in err and "looks like yuan" in err and "191635" in err
    err = settle_error(capsys, with_value(tmp_path, text, "total_amount", "12.5"), tmp_path)
    assert "column 'total_amount'" in err and "1250" in err


def test_other_bad_values_name_the_column(capsys, tmp_path, text):
    err = settle_error(capsys, with_value(tmp_path, text, "total_amount", "abc"), tmp_path)
    assert "column 'total_amount'" in err and "'abc'" in err and "yuan" not in err
    err = settle_error(capsys, with_value(tmp_path, text, "age", "7.5"), tmp_path)
    assert "column 'age'" in err and "yuan" not in err  # not an amount: no fen hint
    err = settle_error(capsys, with_value(tmp_path, text, "settle_time", "yesterday"), tmp_path)
    assert "column 'settle_time'" in err


def test_csv_error_mapping():
    e = pa.ArrowInvalid("In CSV column #2: Row #7: CSV conversion error to int64: invalid value '0.5'")
    msg = str(csv_error("f.csv", ["a", "b", "over_limit_amount"], e))
    assert "column 'over_limit_amount'" in msg and "write it as 50" in msg
    assert "column '#9'" in str(csv_error("f.csv", ["a"], pa.ArrowInvalid("In CSV column #8: bad")))
    assert isinstance(csv_error("f.csv", [], pa.ArrowInvalid("other")), CliError)


def test_good_file_reads(text, tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text("\n".join(text) + "\n")
    assert ClaimsFile(path).read_all().num_rows == 40
