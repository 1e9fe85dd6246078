"""Errors as data: one code enum, one code → HTTP status table, one exception type.

Owns every error a client can see.  Nothing here knows HTTP beyond the status number, and no
message built here ever contains ``str(e)`` of an internal exception: callers pass a message
written for the client.
"""

from __future__ import annotations

import enum

__all__ = ["ERROR_TYPE", "STATUS", "ErrorCode", "InhouseError"]


class ErrorCode(enum.Enum):
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    MODEL_NOT_FOUND = "model_not_found"
    WRONG_MODEL_KIND = "model_not_supported"  # e.g. embeddings asked of a chat model
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNSUPPORTED = "unsupported_feature"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "request_too_large"
    QUEUE_FULL = "queue_full"
    MODEL_LOADING = "model_loading"
    MODEL_UNAVAILABLE = "model_unavailable"
    ENGINE_ERROR = "engine_error"
    INTERNAL = "internal_error"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    ADMIN_REQUIRED = "admin_required"
    RATE_LIMITED = "rate_limit_exceeded"
    QUOTA_EXCEEDED = "insufficient_quota"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    SWAP_FAILED = "swap_failed"  # a model swap, rollback or reload was refused; the old version keeps serving
    SERVER_DRAINING = "server_draining"  # shutting down (SIGTERM): retry on another replica


STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.WRONG_MODEL_KIND: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.UNSUPPORTED: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.MODEL_LOADING: 503,
    ErrorCode.MODEL_UNAVAILABLE: 503,
    ErrorCode.ENGINE_ERROR: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.INVALID_API_KEY: 401,
    ErrorCode.MODEL_NOT_ALLOWED: 403,
    ErrorCode.ADMIN_REQUIRED: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.AUDIT_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.CLIENT_DISCONNECTED: 499,  # nginx's "client closed request": only ever seen in the audit log
    ErrorCode.SWAP_FAILED: 409,
    ErrorCode.SERVER_DRAINING: 503,
}

# OpenAI's `error.type` vocabulary, by code.
ERROR_TYPE: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "invalid_request_error",
    ErrorCode.INVALID_JSON: "invalid_request_error",
    ErrorCode.MODEL_NOT_FOUND: "invalid_request_error",
    ErrorCode.WRONG_MODEL_KIND: "invalid_request_error",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorCode.UNSUPPORTED: "invalid_request_error",
    ErrorCode.NOT_FOUND: "invalid_request_error",
    ErrorCode.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorCode.BODY_TOO_LARGE: "invalid_request_error",
    ErrorCode.QUEUE_FULL: "rate_limit_error",
    ErrorCode.MODEL_LOADING: "service_unavailable_error",
    ErrorCode.MODEL_UNAVAILABLE: "service_unavailable_error",
    ErrorCode.ENGINE_ERROR: "server_error",
    ErrorCode.INTERNAL: "server_error",
    ErrorCode.INVALID_API_KEY: "authentication_error",
    ErrorCode.MODEL_NOT_ALLOWED: "permission_error",
    ErrorCode.ADMIN_REQUIRED: "permission_error",
    ErrorCode.RATE_LIMITED: "rate_limit_error",
    ErrorCode.QUOTA_EXCEEDED: "insufficient_quota",
    ErrorCode.AUDIT_UNAVAILABLE: "service_unavailable_error",
    ErrorCode.UPSTREAM_UNAVAILABLE: "service_unavailable_error",
    ErrorCode.UPSTREAM_ERROR: "server_error",
    ErrorCode.CLIENT_DISCONNECTED: "invalid_request_error",
    ErrorCode.SWAP_FAILED: "invalid_request_error",
    ErrorCode.SERVER_DRAINING: "service_unavailable_error",
}


class InhouseError(Exception):
    """An error meant for the client: a code, a readable message, and optionally the bad field."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.headers = headers or {}  # extra response headers (x-ratelimit-*)

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPE[self.code],
                "param": self.param,
                "code": self.code.value,
            }
        }
