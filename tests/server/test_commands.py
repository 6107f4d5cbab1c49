"""The server's subcommands: registered through the entry points, `store migrate`, and
`serve`'s usage errors (exit 2, one line, nothing created)."""
from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from srv_helpers import REPO
from server import commands
from server.app import add_arguments, serve_main
from server.store import SCHEMA_VERSION, SQLiteStore, StoreError
from server.store.sqlite import MIGRATIONS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medsettle")
    sub = p.add_subparsers(dest="command", required=True)
    commands.register_serve(sub)
    commands.register_store(sub)
    return p


def test_entry_points_name_the_register_functions():
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["medsettle.commands"]
    for name, target in eps.items():
        if not target.startswith("server."):
            continue
        mod, fn = target.split(":")
        assert callable(getattr(__import__(mod, fromlist=[fn]), fn)), name
    assert {"serve", "store"} <= set(eps)
    args = parser().parse_args(["serve", "--store", "x.db", "--port", "0"])
    assert args.func is serve_main and args.store == "x.db"


def test_store_migrate_creates_and_upgrades(tmp_path, capsys):
    path = str(tmp_path / "s.db")
    args = parser().parse_args(["store", "migrate", "--store", path, "--to", "1"])
    assert args.func(args) == 0
    assert "applied 1; schema version 1" in capsys.readouterr().out
    with pytest.raises(StoreError, match="older .* `medsettle store migrate"):
        SQLiteStore(path)
    args = parser().parse_args(["store", "migrate", "--store", path])
    assert args.func(args) == 0
    assert f"applied {SCHEMA_VERSION}; schema version {SCHEMA_VERSION}" in capsys.readouterr().out
    assert args.func(args) == 0 and "nothing to do" in capsys.readouterr().out
    s = SQLiteStore(path)
    assert s.schema_version() == SCHEMA_VERSION
    got = [r[0] for r in s.conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert got == [m.version for m in MIGRATIONS]
    s.close()
    bad = parser().parse_args(["store", "migrate", "--store", path, "--to", str(SCHEMA_VERSION + 1)])
    assert bad.func(bad) == 2
    missing = parser().parse_args(["store", "migrate", "--store", str(tmp_path / "no" / "s.db")])
    assert missing.func(missing) == 2 and "does not exist" in capsys.readouterr().err


def test_a_store_of_before_the_migrations_table_is_upgraded(tmp_path):
    """Stores written before versioned migrations carry only PRAGMA user_version = 1."""
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    for stmt in MIGRATIONS[0].statements:
        conn.execute(stmt)
    conn.execute("INSERT INTO persons VALUES ('p', '000001', 'resident', 0, '[]')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="older"):
        SQLiteStore(path)
    s = SQLiteStore(path, migrate_to=SCHEMA_VERSION)
    assert s.migrated == [2] and s.schema_version() == SCHEMA_VERSION and s.persons(["p"])
    assert [r[0] for r in s.conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == [1, 2]
    s.close()


def _serve(tmp_path, *extra) -> int:
    args = argparse.ArgumentParser()
    add_arguments(args)
    return serve_main(args.parse_args(["--store", str(tmp_path / "s.db"), "--port", "0", *extra]))


def test_serve_usage_errors_exit_2_and_create_nothing(tmp_path, capsys):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert _serve(tmp_path, "--tls-cert", str(cert)) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert _serve(tmp_path, "--tls-client-ca", str(cert)) == 2
    assert _serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(tmp_path / "none.pem")) == 2
    assert "none.pem" in capsys.readouterr().err
    assert _serve(tmp_path, "--policies", str(tmp_path / "no-such-folder")) == 2
    # a registry that cannot be read: the store this start created is removed again
    assert _serve(tmp_path, "--registry", str(tmp_path / "none.parquet")) == 2
    assert "none.parquet" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.pem"]
    # a store in a missing folder
    args = argparse.ArgumentParser()
    add_arguments(args)
    assert serve_main(args.parse_args(["--store", str(tmp_path / "no" / "s.db"), "--port", "0"])) == 2


def test_a_failed_start_keeps_an_existing_store(tmp_path):
    s = SQLiteStore(str(tmp_path / "s.db"))
    s.upsert_persons([])
    s.close()
    before = sorted(os.listdir(tmp_path))
    assert _serve(tmp_path, "--registry", str(tmp_path / "none.parquet")) == 2
    assert sorted(os.listdir(tmp_path)) == before
    assert SQLiteStore(str(tmp_path / "s.db")).schema_version() == SCHEMA_VERSION


@pytest.mark.service
def test_busy_port_is_one_line_exit_2_and_leaves_no_files(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.run([sys.executable, "-m", "server", "--store", str(tmp_path / "other.db"), "--port",
                            str(port)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [f"medsettle serve: port {port} on 127.0.0.1 is in use (another "
                                             f"server?); choose another --port"]
    assert os.listdir(tmp_path) == []


@pytest.mark.service
@pytest.mark.postgres
def test_store_migrate_on_postgresql(pg_url, capsys):
    from server.store import open_store

    args = parser().parse_args(["store", "migrate", "--store", pg_url, "--to", "1"])
    assert args.func(args) == 0 and "applied 1; schema version 1" in capsys.readouterr().out
    with pytest.raises(StoreError, match="older"):
        open_store(pg_url)
    args = parser().parse_args(["store", "migrate", "--store", pg_url])
    assert args.func(args) == 0 and f"applied {SCHEMA_VERSION}" in capsys.readouterr().out
    s = open_store(pg_url)
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    gone = parser().parse_args(["store", "migrate", "--store", pg_url.rsplit("/", 1)[0] + "/no_such_db"])
    assert gone.func(gone) == 1 and "cannot connect" in capsys.readouterr().err
