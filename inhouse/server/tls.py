"""Serving HTTPS: the server's SSL context, client certificates (mTLS), and who they name.

Owns turning ``tls_cert`` / ``tls_key`` / ``tls_client_ca`` into uvicorn's options: one ``ssl.SSLContext``,
built once at start (an unreadable or mismatched file is a ConfigError naming its key, not a traceback), that
with ``tls_client_ca`` refuses at the handshake any client without a certificate that CA signed; and the
uvicorn HTTP protocol that gives every request on a TLS connection the ASGI ``tls`` extension
(``scope["extensions"]["tls"]``), whose ``client_cert_name`` is the client certificate's subject in RFC 4514
form (``CN=dify-prod,O=Bank``), read once per connection.  Holds no state beyond one connection's extension.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inhouse.config import ConfigError, Settings

__all__ = ["TlsHttpProtocol", "client_subject", "rfc4514", "server_ssl_context", "server_tls"]


def server_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn's keyword arguments for the settings: none without ``tls_cert``."""
    context = server_ssl_context(settings)
    if context is None:
        return {}
    return {"ssl_context_factory": lambda _config, _default: context, "http": TlsHttpProtocol}


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    cert, key = settings.tls_cert, settings.tls_key
    if cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("tls_cert" if key is None else "tls_cert / tls_key", cert, lambda: context.load_cert_chain(cert, key))
    if settings.tls_client_ca is not None:
        client_ca = settings.tls_client_ca
        _load("tls_client_ca", client_ca, lambda: context.load_verify_locations(cafile=client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(key: str, path: Path, load: Callable[[], object]) -> None:
    """Runs ``load``; a missing or unreadable file becomes a ConfigError that names ``key``."""
    try:
        load()
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {exc.filename or path} does not exist") from None
    except OSError as exc:  # ssl.SSLError included: not PEM, or a key that does not match the certificate
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ConfigError(f"{key}: {path} cannot be used ({reason})") from None


class TlsHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI ``tls`` extension on each request of a TLS connection."""

    _tls: dict[object, object] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        self._tls = _extension(ssl_object) if ssl_object is not None else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": dict(self._tls)}


_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _extension(ssl_object: ssl.SSLObject) -> dict[object, object]:
    """The ASGI TLS extension of one connection (https://asgi.readthedocs.io/en/latest/specs/tls.html)."""
    peer = ssl_object.getpeercert()  # a dict only when the certificate was verified (tls_client_ca)
    der = ssl_object.getpeercert(binary_form=True) if peer else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": rfc4514(peer.get("subject", ())) if peer else None,  # type: ignore[arg-type]
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def client_subject(scope: dict[str, Any]) -> str | None:
    """The verified client certificate's subject of a request, from its ``tls`` extension (None without mTLS)."""
    tls = scope.get("extensions", {}).get("tls")
    return tls.get("client_cert_name") if tls else None


# OpenSSL's attribute names → RFC 4514 keywords; others keep OpenSSL's name (emailAddress, serialNumber)
_KEYWORDS = {"commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST", "organizationName": "O",
             "organizationalUnitName": "OU", "countryName": "C", "streetAddress": "STREET",
             "domainComponent": "DC", "userId": "UID"}


def rfc4514(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """``getpeercert()["subject"]`` as an RFC 4514 string: the last RDN first, special characters escaped."""
    return ",".join("+".join(f"{_KEYWORDS.get(name, name)}={_escape(value)}" for name, value in rdn)
                    for rdn in reversed(subject))


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in '"+,;<>\\' else "\\00" if c == "\0" else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if len(value) > 1 and value.endswith(" "):
        out = out[:-1] + "\\ "
    return out
