"""The SSL context of one upstream's client: which CA to trust, and the client certificate to present (mTLS).

Owns turning an UpstreamSpec's ``ca_file`` / ``client_cert`` / ``client_key`` into one ``ssl.SSLContext``,
built once when the engine is constructed; an unreadable file or a key that does not match its certificate is
a ConfigError naming the model and the key.  Nothing here connects.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TypeVar

import aiohttp

from inhouse.config import ConfigError, UpstreamSpec

__all__ = ["tls_hint", "upstream_ssl_context"]

_T = TypeVar("_T")


def upstream_ssl_context(spec: UpstreamSpec) -> ssl.SSLContext | None:
    """None when the spec sets no TLS file (then the system's CAs verify an https:// upstream)."""
    if spec.ca_file is None and spec.client_cert is None:
        return None
    # verifies the certificate and the host name; ca_file replaces the system's CAs (as curl --cacert does)
    ca_file = spec.ca_file
    context = (ssl.create_default_context() if ca_file is None else
               _load(spec, "ca_file", ca_file, lambda: ssl.create_default_context(cafile=ca_file)))
    if spec.client_cert is not None:
        cert, key = spec.client_cert, spec.client_key
        _load(spec, "client_cert" if key is None else "client_cert / client_key", cert,
              lambda: context.load_cert_chain(cert, key))
    return context


def _load(spec: UpstreamSpec, key: str, path: str, load: Callable[[], _T]) -> _T:
    try:
        return load()
    except FileNotFoundError as exc:
        raise ConfigError(f"model {spec.name!r} ({spec.deployment_label}): {key}: {exc.filename or path} does "
                          "not exist") from None
    except OSError as exc:  # ssl.SSLError included: not PEM, or a key that does not match the certificate
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ConfigError(f"model {spec.name!r} ({spec.deployment_label}): {key}: {path} cannot be used "
                          f"({reason})") from None


def tls_hint(spec: UpstreamSpec, exc: BaseException) -> str:
    """What a connection failure to an https:// upstream may mean, for the operator ("" when nothing to add)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        reason = getattr(error, "verify_message", None) or getattr(error, "reason", None) or "not trusted"
        return f"; its TLS certificate was refused ({reason}): is ca_file the CA that signed it?"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "; the TLS handshake failed"
    if (spec.base_url.lower().startswith("https://") and spec.client_cert is None
            and isinstance(exc, aiohttp.ServerDisconnectedError)):
        return "; it closed the TLS connection unanswered: does it require a client certificate (client_cert)?"
    return ""
