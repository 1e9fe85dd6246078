"""AuditRecord (one API call, as the server saw it) and the hash that chains stored rows.

Owns the row's fields and its canonical form.  ``row_hash = sha256(prev_hash + canonical JSON of the
row with its seq)``; editing any stored field, or deleting or reordering rows, breaks the chain.  A field
added later is hashed only when set, so rows written before it keep their hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["HASHED_FIELDS", "AuditRecord", "row_hash"]


@dataclass
class AuditRecord:
    at: float
    request_id: str
    method: str
    path: str
    status: int = 0
    latency_ms: float = 0.0
    key_id: str | None = None
    key_name: str | None = None
    client_ip: str | None = None
    model: str | None = None
    served_model: str | None = None
    deployment: str | None = None
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    stream: bool = False
    finish_reason: str | None = None
    prompt_text: str | None = None
    response_text: str | None = None
    client_subject: str | None = None  # the client certificate's subject (mTLS), RFC 4514: CN=dify-prod,O=Bank
    model_version: str | None = None  # the version of the deployment that answered

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}  # flat values: no deep copy like asdict()


_FIELDS = tuple(AuditRecord.__dataclass_fields__)
HASHED_FIELDS = ("seq", *_FIELDS)
# Fields added after rows were first written are in the canonical form only when set: a row written before
# a field existed (NULL there) keeps the hash it was written with, so old chains still verify.
_ADDED_FIELDS = ("client_subject", "model_version")
_FIRST_FIELDS = tuple(k for k in HASHED_FIELDS if k not in _ADDED_FIELDS)


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    values = {k: row.get(k) for k in _FIRST_FIELDS}
    values.update({k: row[k] for k in _ADDED_FIELDS if row.get(k) is not None})
    canonical = json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + "\n" + canonical).encode("utf-8")).hexdigest()
