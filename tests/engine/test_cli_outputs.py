"""Outputs are all or nothing (issue 13 item 1): an output that is an input is refused before
any work, every output's folder is checked before settling, a failed or interrupted run
(SIGINT, SIGTERM) leaves no output and no temporary file, and an input is never touched."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import engine
from engine.cli import main, to_csv_table
from engine.files import Outputs, same_file, write_table
from engine.generate import generate_claims

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ps():
    return engine.load_policies(None)


@pytest.fixture(scope="module")
def claims(ps):
    return generate_claims(ps, 3000, seed=5, invalid_rate=0.05)


@pytest.fixture
def folder(tmp_path, claims):
    pq.write_table(claims, tmp_path / "c.parquet", row_group_size=500)
    pcsv.write_csv(to_csv_table(claims), tmp_path / "c.csv")
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict:
    """Every file of the folder with its bytes and inode: what a run must leave as it was."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(folder.iterdir()) if p.is_file()}


def one_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsettle: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("name", ["c.parquet", "c.csv"])
def test_output_that_is_the_input_is_refused(capsys, folder, name):
    before = snapshot(folder)
    code, out, err = run(capsys, "settle", folder / name, "-o", folder / name)
    one_error(code, err, name, "is the input")
    assert out == ""
    assert snapshot(folder) == before


def test_links_to_the_input_are_refused(capsys, folder):
    os.symlink(folder / "c.parquet", folder / "sym.parquet")
    os.link(folder / "c.parquet", folder / "hard.parquet")
    os.mkdir(folder / "sub")
    before = snapshot(folder)
    for out in ("sym.parquet", "hard.parquet", "sub/../c.parquet"):
        code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / out)
        one_error(code, err, "is the input")
    # the accumulators read are an input too, and two outputs may not be one file
    acc = folder / "acc.parquet"
    assert run(capsys, "settle", folder / "c.parquet", "-o", folder / "r.parquet", "--accumulators-out", acc)[0] == 0
    before = snapshot(folder)
    code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / "r2.parquet",
                       "--accumulators-in", acc, "--accumulators-out", acc)
    one_error(code, err, "acc.parquet", "is the input")
    code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / "r.parquet",
                       "--accumulators-out", folder / "r.parquet")
    one_error(code, err, "is also the output")
    assert snapshot(folder) == before


def test_missing_output_folder_fails_before_settling(capsys, folder, monkeypatch):
    settled = []
    monkeypatch.setattr("engine.cli.settle.settle_file", lambda *a, **k: settled.append(1))
    before = snapshot(folder)
    for extra in (["--accumulators-out", folder / "nodir" / "a.parquet"],
                  ["--summary-json", folder / "nodir" / "s.json"]):
        code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / "r.parquet", *extra)
        one_error(code, err, "nodir", "does not exist")
    code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / "nodir" / "r.parquet")
    one_error(code, err, "nodir", "does not exist")
    code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder)
    one_error(code, err)
    assert settled == [] and snapshot(folder) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_read_only_output_folder_fails_before_settling(capsys, folder):
    ro = folder / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", ro / "r.parquet")
    one_error(code, err, "not writable")


def test_generate_missing_persons_folder_writes_nothing(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "-o", tmp_path / "g.parquet", "--claims", 100, "--seed", 1,
                       "--persons", tmp_path / "nodir" / "p.parquet")
    one_error(code, err, "nodir")
    assert list(tmp_path.iterdir()) == []


def test_failure_after_results_leaves_nothing(capsys, folder, monkeypatch):
    """The accumulators fail after every result was written: no results file either, no
    temporary, and an earlier results file of the same name is kept as it was."""
    (folder / "r.parquet").write_bytes(b"an earlier run's results")
    before = snapshot(folder)

    def broken(self, dictionary=False):
        raise OSError("disk full")

    monkeypatch.setattr(engine.Settler, "accumulators", broken)
    code, _, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / "r.parquet",
                       "--accumulators-out", folder / "a.parquet", "--summary-json", folder / "s.json")
    one_error(code, err, "disk full")
    assert snapshot(folder) == before


def test_interrupt_leaves_nothing(capsys, folder, monkeypatch):
    before = snapshot(folder)
    real = engine.Settler.settle_batches

    def interrupted(self, batches, dictionary=False):
        for i, r in enumerate(real(self, batches, dictionary)):
            if i == 2:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(engine.Settler, "settle_batches", interrupted)
    code, out, err = run(capsys, "settle", folder / "c.parquet", "-o", folder / "r.parquet", "--batch-size", 200)
    assert code == 130 and "interrupted" in err
    assert snapshot(folder) == before


def test_generate_failure_leaves_nothing(capsys, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("no space left")

    monkeypatch.setattr("engine.generate.write_persons", broken)
    code, _, err = run(capsys, "generate", "-o", tmp_path / "g.parquet", "--claims", 300, "--seed", 1,
                       "--persons", tmp_path / "p.parquet")
    one_error(code, err, "no space left")
    assert list(tmp_path.iterdir()) == []


def test_outputs_commit_and_abort(tmp_path):
    table = pa.table({"x": [1, 2, 3]})
    with Outputs() as outs:
        outs.add(tmp_path / "a.parquet")
        write_table(table, tmp_path / "a.parquet", outputs=outs)
        assert not (tmp_path / "a.parquet").exists()  # only the temporary until the commit
        assert len(list(tmp_path.iterdir())) == 1
    assert pq.read_table(tmp_path / "a.parquet").equals(table)
    with pytest.raises(RuntimeError):
        with Outputs() as outs:
            outs.add(tmp_path / "b.parquet")
            write_table(table, tmp_path / "b.parquet", outputs=outs)
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]
    write_table(table, tmp_path / "c.arrow")  # on its own: renamed into place at once
    assert pa.ipc.open_file(tmp_path / "c.arrow").read_all().equals(table)
    assert same_file(tmp_path / "a.parquet", tmp_path / "." / "a.parquet")
    assert not same_file(tmp_path / "a.parquet", tmp_path / "c.arrow")


def _run_and_signal(tmp_path: Path, sig: int, ps) -> tuple[subprocess.CompletedProcess, set]:
    claims = generate_claims(ps, 60_000, seed=2)
    pq.write_table(claims, tmp_path / "c.parquet")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "settle", str(tmp_path / "c.parquet"),
                             "-o", str(out / "r.parquet"), "--accumulators-out", str(out / "a.parquet"),
                             "--batch-size", "50"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(out.iterdir()):  # the results' temporary file: settling has begun
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert snapshot(tmp_path) == before
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), set(out.iterdir())


@pytest.mark.parametrize("sig, code, word", [
    (signal.SIGTERM, 143, "terminated"),
    pytest.param(signal.SIGINT, 130, "interrupted", marks=pytest.mark.slow),
])
def test_signal_during_settle_leaves_nothing(tmp_path, ps, sig, code, word):
    done, left = _run_and_signal(tmp_path, sig, ps)
    assert done.returncode == code, done.stderr
    assert left == set()
    assert word in done.stderr and "Traceback" not in done.stderr
