"""Exception → response, in one place.  Clients never see a stack trace or ``str(e)`` of an internal error."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.call import call_of
from inhouse.server.disconnect import ClientDisconnectedError
from inhouse.server.render import error_response

__all__ = ["EXCEPTION_HANDLERS"]

log = logging.getLogger("inhouse.server")

_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.BODY_TOO_LARGE}


def _answer(request: Request, error: InhouseError, headers: dict[str, str] | None = None) -> Response:
    """The error's response; its code is noted on the call, whose end the response's start is."""
    call = call_of(request)
    if call is not None:
        call.failed(error.code)
    return error_response(error, headers=headers)


async def _inhouse_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InhouseError)
    return _answer(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
    if exc.status_code == 404:
        message = f"{request.method} {request.url.path} does not exist; see /v1/models and /v1/chat/completions"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = "the request could not be handled"
    return _answer(request, InhouseError(code, message), headers=dict(exc.headers or {}))


async def _disconnected(request: Request, exc: Exception) -> Response:
    """Nobody reads it; it ends the call as 499 ``client_disconnected`` (the access-log sink writes the one line)."""
    return _answer(request, InhouseError(ErrorCode.CLIENT_DISCONNECTED, "the client closed the connection"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InhouseError(ErrorCode.INTERNAL, "internal server error; see the server log"))


EXCEPTION_HANDLERS = {
    InhouseError: _inhouse_error,
    HTTPException: _http_error,
    ClientDisconnectedError: _disconnected,
    Exception: _unexpected,
}
