"""The gateway's exceptions. Every error a client can see leaves a view as one ``ApiError``.

Tree::

    RouteCatError
    ├── ConfigError                 bad configuration; the process refuses to start
    └── ApiError                    rendered as {"error": {message, type, param, code}}
        ├── InvalidRequest          400 invalid_request
        ├── InvalidApiKey           401 invalid_api_key
        ├── InsufficientBalance     402 insufficient_balance
        ├── NotFound                404 not_found / model_not_found
        ├── MethodNotAllowed        405 method_not_allowed
        ├── RequestTooLarge         413 request_too_large
        ├── RateLimited             429 rate_limit_exceeded (+ Retry-After)
        ├── UpstreamError           502 upstream_error
        └── ServiceUnavailable      503 no_capacity / pricing_unavailable (+ Retry-After)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class RouteCatError(Exception):
    """Base of every exception this package raises on purpose."""


class ConfigError(RouteCatError):
    """The configuration cannot be used."""


class ApiError(RouteCatError):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class InvalidApiKey(ApiError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class InsufficientBalance(ApiError):
    status = 402
    type = "insufficient_quota"
    default_code = "insufficient_balance"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(ApiError):
    status = 502
    type = "api_error"
    default_code = "upstream_error"


class ServiceUnavailable(ApiError):
    status = 503
    type = "api_error"
    default_code = "no_capacity"
