"""Reads a request body into a protocol model, turning every failure into a clear 400 or 413.

The body is decoded as UTF-8 JSON whatever the Content-Type charset says (Dify sends raw UTF-8).  JSON
nested deeper than ``MAX_DEPTH`` is refused here, so nothing further in (templates, counting, logging)
ever walks a structure deep enough to exhaust the stack.  A client that leaves while its body is still
uploading is a ``ClientDisconnectedError``, not a server failure.
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.disconnect import ClientDisconnectedError

__all__ = ["MAX_DEPTH", "read_model"]

MAX_DEPTH = 64  # OpenAI-style bodies need about 10 (a JSON schema inside a tool inside tools)

M = TypeVar("M", bound=BaseModel)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = InhouseError(ErrorCode.BODY_TOO_LARGE, f"request body is larger than the {limit} byte limit")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnectedError from None
    return b"".join(chunks)


async def read_model(request: Request, model: type[M], limit: int) -> M:
    raw = await _read_limited(request, limit)
    if not raw.strip():
        raise InhouseError(ErrorCode.INVALID_JSON, "request body is empty; send a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "is not valid UTF-8" if "utf-8" in str(exc).lower() else f"is not valid JSON ({exc.msg})"
        raise InhouseError(ErrorCode.INVALID_JSON, f"request body {reason}") from None
    if not isinstance(data, dict):
        raise InhouseError(ErrorCode.INVALID_JSON, "request body must be a JSON object")
    deep = _too_deep(data)
    if deep is not None:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"'{deep}' is nested more than {MAX_DEPTH} levels deep",
                           param=deep)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _describe(exc, data) from None


def _too_deep(data: dict[str, object]) -> str | None:
    """The top-level field holding JSON nested deeper than MAX_DEPTH, or None (walked without recursion)."""
    for name, value in data.items():
        stack: list[tuple[object, int]] = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if depth > MAX_DEPTH:
                return name
            if isinstance(item, dict):
                stack.extend((v, depth + 1) for v in item.values())
            elif isinstance(item, list):
                stack.extend((v, depth + 1) for v in item)
    return None


def _param(loc: tuple[int | str, ...], data: object) -> str | None:
    """The dotted path of the offending field: the part of pydantic's loc that exists in the input.

    pydantic appends union member names (``str``, ``list[str]``) to the loc; they are not fields.  A
    missing required field is the one name allowed that is not in the input, as the loc's last item.
    """
    path: list[str] = []
    current = data
    for position, item in enumerate(loc):
        if isinstance(current, dict) and isinstance(item, str) and (item in current or position == len(loc) - 1):
            current = current.get(item)
        elif isinstance(current, list) and isinstance(item, int) and 0 <= item < len(current):
            current = current[item]
        else:
            break
        path.append(str(item))
    return ".".join(path) or None


def _describe(exc: ValidationError, data: object) -> InhouseError:
    first = exc.errors()[0]
    param = _param(tuple(first["loc"]), data)
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix on a validator's own message
    if first["type"] == "missing":
        message = f"'{param}' is a required property"
    else:
        message = f"Invalid value for '{param}': {msg}" if param else msg
    return InhouseError(ErrorCode.INVALID_REQUEST, message, param=param)
