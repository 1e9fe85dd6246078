"""Certificates for TLS tests, made with ``cryptography``: a CA, a server certificate for 127.0.0.1 and localhost,
and client certificates (one signed by the CA, one by an unknown key), written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_SUBJECT = "CN=dify-prod,O=Bank"
GATEWAY_SUBJECT = "CN=inhouse-gateway,O=Bank"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    gateway_cert: Path  # a second client, for an inhouse gateway in front of an mTLS upstream
    gateway_key: Path
    stranger_cert: Path  # a client certificate signed by a key no server trusts
    stranger_key: Path

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """Trusts the test CA; presents ``cert`` (and ``key``) when given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(cert, key)
        return context


def _name(**parts: str) -> x509.Name:
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in parts.items()])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _issue(subject: x509.Name, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
           server: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate: for 127.0.0.1 and localhost (``server``) or for a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_valid(x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key()))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def _valid(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (builder.serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2)))


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca_name = _name(CN="inhouse test CA", O="Bank")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (_valid(x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                      .public_key(ca_key.public_key()))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    ca_path, _ = _write(folder, "ca", ca_cert, ca_key)
    server_cert, server_key = _write(folder, "server", *_issue(_name(CN="localhost"), ca_name, ca_key, server=True))
    client_cert, client_key = _write(folder, "client", *_issue(_name(O="Bank", CN="dify-prod"), ca_name, ca_key))
    gateway_cert, gateway_key = _write(folder, "gateway", *_issue(_name(O="Bank", CN="inhouse-gateway"), ca_name,
                                                                 ca_key))
    stranger_name = _name(O="Elsewhere", CN="stranger")
    own_key = ec.generate_private_key(ec.SECP256R1())
    stranger, stranger_key = _issue(stranger_name, stranger_name, own_key)
    stranger_cert, stranger_key_path = _write(folder, "stranger", stranger, stranger_key)
    return Certs(ca_path, server_cert, server_key, client_cert, client_key, gateway_cert, gateway_key, stranger_cert,
                 stranger_key_path)
