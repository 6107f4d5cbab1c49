"""Regenerates server/_proto/ from proto/ with grpc_tools.

    python -m server.protogen           # write server/_proto/settlement_pb2{,_grpc}.py
    python -m server.protogen --check   # exit 1 if the committed files are not current

The generated modules are committed (the package build does not run protoc).
The gRPC module's absolute import of the message module is rewritten to a
relative one so that the pair lives in `server._proto`. tests/server checks
that the committed descriptor equals the .proto's (whatever grpc_tools version
is installed) and, with the grpc_tools version that generated them, that the
files are byte for byte what this script writes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "medsettle/v1/settlement.proto"
OUT_DIR = ROOT / "server" / "_proto"
MODULES = ("settlement_pb2.py", "settlement_pb2_grpc.py")
ABS_IMPORT = "from medsettle.v1 import settlement_pb2 as"
REL_IMPORT = "from . import settlement_pb2 as"


def generate() -> dict[str, bytes]:
    """The generated modules' contents, as this script would write them."""
    import grpc_tools  # lazy: grpcio-tools is a test/development dependency, not needed to serve
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE} (exit {rc})")
        gen = Path(tmp) / "medsettle" / "v1"
        out = {}
        for name in MODULES:
            text = (gen / name).read_text()
            if name.endswith("_grpc.py"):
                if ABS_IMPORT not in text:
                    raise RuntimeError(f"{name}: expected import line not found")
                text = text.replace(ABS_IMPORT, REL_IMPORT)
            out[name] = text.encode()
        return out


def stale_files() -> list[str]:
    """Names of the committed modules that differ from a fresh generation."""
    fresh = generate()
    stale = []
    for name, data in fresh.items():
        path = OUT_DIR / name
        if not path.exists() or path.read_bytes() != data:
            stale.append(name)
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.protogen", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that server/_proto is current")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"server/_proto is not current ({', '.join(stale)}): run python -m server.protogen",
                  file=sys.stderr)
            return 1
        print("server/_proto is current")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in generate().items():
        (OUT_DIR / name).write_bytes(data)
    init = OUT_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC modules of proto/medsettle/v1 (python -m server.protogen)."""\n')
    print(f"wrote {', '.join(MODULES)} to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
