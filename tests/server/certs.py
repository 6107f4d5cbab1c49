"""A test CA and certificates for the security tests, made with `cryptography`:
facility and administrator client certificates (URI SANs as server/auth.py reads
them), a server certificate for localhost, an expired one, one of another CA."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import NamedTuple, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc)


class Pair(NamedTuple):
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "medsettle test CA") -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Pair(cert, key)


def issue(ca: Pair, cn: str, *, facility: Optional[str] = None, admin: bool = False, uris: tuple = (),
          server: bool = False, not_before: Optional[dt.datetime] = None,
          not_after: Optional[dt.datetime] = None) -> Pair:
    """A leaf certificate signed by `ca`; `facility` and `admin` become URI SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.UniformResourceIdentifier(u) for u in uris]
    if facility is not None:
        sans.append(x509.UniformResourceIdentifier(f"urn:medsettle:facility:{facility}"))
    if admin:
        sans.append(x509.UniformResourceIdentifier("urn:medsettle:role:admin"))
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
         .not_valid_after(not_after or NOW + dt.timedelta(days=7))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Pair(b.sign(ca.key, hashes.SHA256()), key)


def expired(ca: Pair, cn: str, facility: str) -> Pair:
    return issue(ca, cn, facility=facility, not_before=NOW - dt.timedelta(days=10),
                 not_after=NOW - dt.timedelta(days=1))


class PKI:
    """Everything the TLS tests need, written to `folder` as PEM files too."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.ca = make_ca()
        self.other_ca = make_ca("another CA")
        self.server = issue(self.ca, "localhost", server=True)
        self.h1 = issue(self.ca, "Hospital One", facility="H1")
        self.h2 = issue(self.ca, "Hospital Two", facility="H2")
        self.admin = issue(self.ca, "registry office", admin=True)
        self.cn_only = issue(self.ca, "H1")  # a CN but no facility SAN: not a facility
        self.expired = expired(self.ca, "Hospital One (expired)", "H1")
        self.foreign = issue(self.other_ca, "Hospital One (other CA)", facility="H1")
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in ("server",):
            pair = getattr(self, name)
            (self.folder / f"{name}.pem").write_bytes(pair.cert_pem)
            (self.folder / f"{name}.key").write_bytes(pair.key_pem)
        (self.folder / "ca.pem").write_bytes(self.ca.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert.public_bytes(serialization.Encoding.PEM)
