"""JSON rendering of bodies and errors.  Every non-2xx body leaves through ``error_response``."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.responses import Response

from inhouse.errors import InhouseError

__all__ = ["error_response", "json_response"]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)  # embeddings: float32 rows as written


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(error: InhouseError, headers: dict[str, str] | None = None) -> Response:
    all_headers = {**error.headers, **(headers or {})}
    if error.retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(error.to_dict(), status_code=error.status, headers=all_headers)
