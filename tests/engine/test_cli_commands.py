"""The command root (engine/cli/__init__.py): subcommands of other packages come in through
the entry-point group `medsettle.commands`, a package that fails to load is named when its
command runs, a built-in is never replaced, and engine imports no server module."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import engine.cli as cli
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def fake_entry_points(monkeypatch, module: types.ModuleType, *eps: tuple[str, str]):
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "plugins", lambda: [EntryPoint(name, value, cli.ENTRY_POINT_GROUP)
                                                 for name, value in eps])


def test_registered_command_runs(capsys, monkeypatch):
    calls = {}
    mod = types.ModuleType("fake_commands")

    def register(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--port", type=int, required=True)
        p.set_defaults(func=lambda args: calls.setdefault("port", args.port) and 0)

    def register_settle(sub):  # may not replace a built-in
        raise AssertionError("called")

    mod.register, mod.register_settle = register, register_settle
    fake_entry_points(monkeypatch, mod, ("hello", "fake_commands:register"), ("settle", "fake_commands:register_settle"))
    assert main(["hello", "--port", "5051"]) == 0
    assert calls == {"port": 5051}
    assert main(["hello"]) == 2  # its own usage error
    assert "--port" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "hello" in capsys.readouterr().out


def test_command_whose_package_fails(capsys, monkeypatch):
    mod = types.ModuleType("fake_broken")
    fake_entry_points(monkeypatch, mod, ("serve", "fake_broken:register_serve"))  # no such attribute
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serve: not available (fake_broken:register_serve" in err


def test_unknown_command_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(cli, "plugins", lambda: [])
    assert main(["serve"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_builtin_command_loads_no_plugin(monkeypatch):
    """`settle` and the other built-ins run without importing other packages' commands (the
    server's import gRPC: 0.05 s of CPU a run); --help and other commands still list them."""
    loaded = []
    monkeypatch.setattr(cli, "plugins", lambda: loaded.append(1) or [])
    assert main(["policies", "check"]) == 0
    assert loaded == []
    assert main(["--help"]) == 0 and loaded == [1]


def test_installed_entry_points_are_read(monkeypatch):
    seen = {}

    def fake(group):
        seen["group"] = group
        return []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    assert cli.plugins() == [] and seen == {"group": "medsettle.commands"}


def test_engine_imports_no_server():
    """Every engine module, the command line included, imports with `server` made unimportable."""
    code = ("import sys, pkgutil, importlib; sys.modules['server'] = None\n"
            "import engine\n"
            "for m in pkgutil.walk_packages(engine.__path__, 'engine.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "from engine.cli import main\n"
            "assert main(['policies', 'check']) == 0\n"
            "assert not any(k == 'server' or k.startswith('server.') for k in sys.modules if sys.modules[k])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
