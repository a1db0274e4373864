"""A private PKI for the broker: one CA, the broker's server certificate, optional device certs.

Devices pin our own CA (shipped in their bundle), so no public CA is involved and the broker's
certificate names exactly the addresses devices dial (SANs: localhost, 127.0.0.1 plus any given
host names / IPs). Keys are EC P-256: small, fast on a Raspberry Pi, accepted by OpenSSL 1.1+.
The CA key never leaves the server's broker directory; bundles get only `ca.crt`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class CertPair:
    cert_pem: bytes
    key_pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "KOALA Edge"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew


def make_ca(cn: str = "KOALA Edge broker CA") -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def _leaf(ca: CertPair, cn: str, usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier],
          sans: list[x509.GeneralName]) -> CertPair:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False)
        .add_extension(
            # the CA's key is one we made (EC/RSA); the stub's union also has X25519/X448 keys
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_server_cert(ca: CertPair, hosts: list[str] | None = None) -> CertPair:
    """The broker's certificate; always valid for localhost and 127.0.0.1, plus `hosts`."""
    names = ["localhost", "127.0.0.1", *(hosts or [])]
    return _leaf(ca, names[-1] if hosts else "localhost", ExtendedKeyUsageOID.SERVER_AUTH, _sans(names))


def make_route_cert(ca: CertPair, hosts: list[str]) -> CertPair:
    """A cluster-route certificate (NATS): each node is TLS server and client to the others."""
    return _leaf(ca, "koala-cluster-route", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], _sans(hosts))


def make_client_cert(ca: CertPair, device_id: str) -> CertPair:
    """A device client certificate (CN = device id), for brokers that require client certs."""
    return _leaf(ca, device_id, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def write_pair(pair: CertPair, cert_path: Path, key_path: Path) -> None:
    """Write a certificate (0644) and its private key (0600)."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(pair.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pair.key_pem)
    os.chmod(key_path, 0o600)


def load_pair(cert_path: Path, key_path: Path) -> CertPair:
    return CertPair(cert_path.read_bytes(), key_path.read_bytes())
