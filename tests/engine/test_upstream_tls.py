"""An upstream's TLS client: its SSL context from the spec, built once, and refusals worded by model and key."""

from __future__ import annotations

import ssl

import pytest

from inhouse.config import ConfigError, UpstreamSpec, model_spec
from inhouse.engine.upstream import UpstreamEngine
from inhouse.engine.upstream_tls import upstream_ssl_context
from tests.tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def spec(**tls: object) -> UpstreamSpec:
    made = model_spec(name="fleet", engine="upstream", base_url="https://fleet:8443/v1", **tls)
    assert isinstance(made, UpstreamSpec)
    return made


def test_no_tls_files_no_context_of_its_own() -> None:
    assert upstream_ssl_context(spec()) is None


def test_the_ca_and_the_client_certificate_go_into_one_verifying_context(certs: Certs) -> None:
    context = upstream_ssl_context(spec(ca_file=str(certs.ca), client_cert=str(certs.gateway_cert),
                                        client_key=str(certs.gateway_key)))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [dict(rdn[0] for rdn in ca["subject"])["commonName"] for ca in context.get_ca_certs()] == \
        ["inhouse test CA"]
    engine = UpstreamEngine(spec(ca_file=str(certs.ca)))
    assert engine._ssl is not None  # built at construction, before start


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"ca_file": "/nonexistent/ca.pem"}, "model 'fleet' (https://fleet:8443/v1): ca_file: /nonexistent/ca.pem does "
                                         "not exist"),
    ({"client_cert": "/nonexistent/c.pem"}, "client_cert: /nonexistent/c.pem does not exist"),
    ({"client_cert": "gateway_cert", "client_key": "client_key"}, "client_cert / client_key:"),  # another's key
    ({"ca_file": "gateway_key"}, "ca_file:"),  # a key, not a certificate
])
def test_unusable_files_are_refused_naming_the_model_and_key(certs: Certs, fields: dict[str, str],
                                                            fragment: str) -> None:
    files = {k: str(getattr(certs, v)) if hasattr(certs, v) else v for k, v in fields.items()}
    with pytest.raises(ConfigError) as refused:
        UpstreamEngine(spec(**files))
    assert fragment in str(refused.value)
