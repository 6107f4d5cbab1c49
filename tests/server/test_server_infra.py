"""Generated code, store schema, health checking, reflection, listening address."""
from __future__ import annotations

import signal
import sqlite3

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from srv_helpers import start_subprocess_server, write_policies
from server import protogen
from server._proto import settlement_pb2 as pb
from server.store import SCHEMA_VERSION, SQLiteStore, StoreError

pytestmark = pytest.mark.service


def test_generated_code_is_current():
    """server/_proto was generated from proto/ as it is now. The descriptor is compared whatever
    grpc_tools is installed; the files byte for byte with the grpc_tools that generated them."""
    import importlib.metadata

    from google.protobuf import descriptor_pb2

    fresh = protogen.generate()
    # compare the FileDescriptorProto embedded in the fresh module with the committed one
    committed = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(committed)
    text = fresh["settlement_pb2.py"].decode()
    start = text.index("AddSerializedFile(b'") + len("AddSerializedFile(")
    end = text.index("')", start) + 1
    fresh_fdp = descriptor_pb2.FileDescriptorProto.FromString(eval(text[start:end]))  # noqa: S307
    assert fresh_fdp == committed, "proto/ changed: run python -m server.protogen"
    committed_text = (protogen.OUT_DIR / "settlement_pb2_grpc.py").read_text()
    gen_version = committed_text.split("GRPC_GENERATED_VERSION = '")[1].split("'")[0]
    if importlib.metadata.version("grpcio-tools") == gen_version:
        assert protogen.stale_files() == [], "server/_proto is not current: run python -m server.protogen"


def test_store_schema_version_and_single_writer(tmp_path):
    path = str(tmp_path / "s.db")
    s = SQLiteStore(path, exclusive=True)
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert s.schema_version() == SCHEMA_VERSION
    with pytest.raises(StoreError, match="another medsettle server"):
        SQLiteStore(path, exclusive=True)
    s.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(path)


def test_health_and_reflection(srv):
    h = health_pb2_grpc.HealthStub(srv.channel)
    for name in ("", "medsettle.v1.Settlement", "medsettle.v1.Registry"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    r = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"medsettle.v1.Settlement", "medsettle.v1.Registry", "grpc.health.v1.Health"} <= names
    resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="medsettle.v1.Settlement")])))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_listens_on_loopback_unless_told(tmp_path):
    policies = write_policies(tmp_path / "policies")
    for extra, host in (((), "127.0.0.1"), (("--insecure-listen-all",), "[::]")):
        proc, port = start_subprocess_server(tmp_path / f"s{len(extra)}.db", policies=policies, extra=extra)
        try:
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            h = health_pb2_grpc.HealthStub(ch)
            assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            ch.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert f"listening on {host}:{port}" in out, (out, err)
        assert proc.returncode == 0


def test_tls(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    policies = write_policies(tmp_path / "policies")
    proc, port = start_subprocess_server(tmp_path / "s.db", policies=policies,
                                         extra=["--tls-cert", str(cert), "--tls-key", str(key),
                                                "--insecure-listen-all"])  # no client CA: callers trusted
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        ch = grpc.secure_channel(f"localhost:{port}", creds)
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        ch.close()
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
        plain.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert f"listening on [::]:{port}" in out, (out, err)
