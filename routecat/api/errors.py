"""Errors as HTTP sees them: the one place where a domain error becomes a status, an
OpenAI-shaped body and headers.

Tree (transport-only errors; the domain's are in ``routecat.errors``)::

    RequestError (routecat.errors)
    ├── MethodNotAllowed            a route that exists, with another method
    ├── RequestTimeout              a body that did not arrive in time
    └── RequestTooLarge             a body over the configured limit
    ValueError
    └── FieldError                  a request field out of bounds (becomes InvalidRequest)
"""

from __future__ import annotations

import math
from typing import Any

from routecat import errors


class MethodNotAllowed(errors.RequestError):
    default_code = "method_not_allowed"


class RequestTimeout(errors.RequestError):
    default_code = "request_timeout"


class RequestTooLarge(errors.RequestError):
    default_code = "request_too_large"


class FieldError(ValueError):
    """A value of the right type but out of bounds; names its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# class -> (HTTP status, OpenAI error type); a subclass maps like its nearest listed base.
STATUS: dict[type[errors.RequestError], tuple[int, str]] = {
    errors.InvalidRequest: (400, "invalid_request_error"),
    errors.InvalidApiKey: (401, "authentication_error"),
    errors.InsufficientBalance: (402, "insufficient_quota"),
    errors.NotFound: (404, "invalid_request_error"),
    MethodNotAllowed: (405, "invalid_request_error"),
    RequestTimeout: (408, "invalid_request_error"),
    RequestTooLarge: (413, "invalid_request_error"),
    errors.RateLimited: (429, "rate_limit_error"),
    errors.UpstreamError: (502, "api_error"),
    errors.ServiceUnavailable: (503, "api_error"),
    errors.RequestError: (500, "server_error"),
}

# Router statuses (werkzeug's) -> the error class that says them.
FROM_STATUS: dict[int, type[errors.RequestError]] = {
    400: errors.InvalidRequest,
    404: errors.NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: RequestTooLarge,
}


def status_of(exc: errors.RequestError) -> tuple[int, str]:
    """The status and error type of ``exc`` (the table lists subclasses before bases)."""
    for cls, mapped in STATUS.items():
        if isinstance(exc, cls):
            return mapped
    return STATUS[errors.RequestError]


def error_body(exc: errors.RequestError) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {message, type, param, code}}``."""
    return {
        "error": {
            "message": exc.message,
            "type": status_of(exc)[1],
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_headers(exc: errors.RequestError) -> dict[str, str]:
    if exc.retry_after is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
