"""AuditRecord (one API call, as the server saw it) and the hash that chains stored rows.

Owns the row's fields and its canonical form.  ``row_hash = sha256(prev_hash + canonical JSON of the
row with its seq)``; editing any stored field, or deleting or reordering rows, breaks the chain.
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
    model_version: str | None = None  # the version of the deployment that answered

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}  # flat values: no deep copy like asdict()


_FIELDS = tuple(AuditRecord.__dataclass_fields__)
HASHED_FIELDS = ("seq", *_FIELDS)
# Fields added after rows were written: hashed only when set, so rows written before them still verify.
_ADDED_FIELDS = frozenset({"model_version"})


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    canonical = json.dumps({k: row.get(k) for k in HASHED_FIELDS
                            if k not in _ADDED_FIELDS or row.get(k) is not None},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + "\n" + canonical).encode("utf-8")).hexdigest()
