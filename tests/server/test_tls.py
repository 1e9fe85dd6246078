"""The server's TLS options: the SSL context from the settings, refusals worded by key, and RFC 4514 subjects."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from inhouse.config import ConfigError, Settings
from inhouse.server.tls import TlsHttpProtocol, client_subject, rfc4514, server_ssl_context, server_tls
from tests.tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_no_certificate_no_tls() -> None:
    assert server_tls(Settings()) == {} and server_ssl_context(Settings()) is None


def test_https_and_mtls_contexts(certs: Certs) -> None:
    https = server_ssl_context(Settings(tls_cert=certs.server_cert, tls_key=certs.server_key))
    assert https is not None and https.verify_mode == ssl.CERT_NONE
    assert https.minimum_version == ssl.TLSVersion.TLSv1_2
    mtls = server_tls(Settings(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca))
    assert mtls["http"] is TlsHttpProtocol
    context = mtls["ssl_context_factory"](None, None)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert [dict(rdn[0] for rdn in ca["subject"])["commonName"] for ca in context.get_ca_certs()] == \
        ["inhouse test CA"]


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"tls_cert": "missing.pem"}, "tls_cert: missing.pem does not exist"),
    ({"tls_cert": "server", "tls_key": "client"}, "tls_cert / tls_key:"),  # a key of another certificate
    ({"tls_cert": "server", "tls_key": "server", "tls_client_ca": "missing.pem"}, "tls_client_ca: missing.pem"),
    ({"tls_cert": "server", "tls_key": "server", "tls_client_ca": "key"}, "tls_client_ca:"),  # not a certificate
])
def test_unusable_files_are_refused_by_key(certs: Certs, fields: dict[str, str], fragment: str) -> None:
    files = {"server": (certs.server_cert, certs.server_key), "client": (certs.client_cert, certs.client_key)}
    paths: dict[str, Path] = {}
    for key, value in fields.items():
        if value == "key":
            paths[key] = certs.server_key
        elif value in files:
            paths[key] = files[value][0 if key == "tls_cert" else 1]
        else:
            paths[key] = Path(value)
    with pytest.raises(ConfigError) as refused:
        server_ssl_context(Settings(**paths))  # type: ignore[arg-type]
    assert fragment in str(refused.value)


def test_rfc4514_matches_cryptography() -> None:
    """The subject getpeercert() gives, written as cryptography writes the same name."""
    subjects = [
        [(NameOID.COUNTRY_NAME, "CN"), (NameOID.ORGANIZATION_NAME, "Bank"), (NameOID.COMMON_NAME, "dify-prod")],
        [(NameOID.ORGANIZATION_NAME, "Smith, Jones + Co"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "#ops"),
         (NameOID.COMMON_NAME, ' a "quoted" <b>; c\\ ')],
        [(NameOID.DOMAIN_COMPONENT, "com"), (NameOID.DOMAIN_COMPONENT, "bank"), (NameOID.LOCALITY_NAME, "Zürich"),
         (NameOID.STATE_OR_PROVINCE_NAME, "ZH"), (NameOID.USER_ID, "u1")],
    ]
    for attributes in subjects:
        name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
        as_python = tuple(((_OPENSSL[oid], value),) for oid, value in attributes)
        assert rfc4514(as_python) == name.rfc4514_string()
    assert rfc4514(((("commonName", "a"), ("organizationName", "b")),)) == "CN=a+O=b"  # a multi-valued RDN
    assert rfc4514(((("emailAddress", "ops@bank.example"),), (("commonName", "x"),))) == \
        "CN=x,emailAddress=ops@bank.example"  # no RFC 4514 keyword: OpenSSL's name


_OPENSSL = {NameOID.COUNTRY_NAME: "countryName", NameOID.ORGANIZATION_NAME: "organizationName",
            NameOID.COMMON_NAME: "commonName", NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
            NameOID.DOMAIN_COMPONENT: "domainComponent", NameOID.LOCALITY_NAME: "localityName",
            NameOID.STATE_OR_PROVINCE_NAME: "stateOrProvinceName", NameOID.USER_ID: "userId"}


def test_client_subject_reads_the_tls_extension() -> None:
    assert client_subject({"type": "http"}) is None
    assert client_subject({"extensions": {"tls": {"client_cert_name": None}}}) is None
    assert client_subject({"extensions": {"tls": {"client_cert_name": "CN=a"}}}) == "CN=a"
