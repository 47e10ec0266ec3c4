"""The gateway's domain errors: why a request is not served as asked, in words and a
code, never as an HTTP status. The API layer maps each class to a status and the
OpenAI error shape in one place (``routecat.api.errors``).

Tree::

    RouteCatError
    ├── ConfigError                 bad configuration; the process refuses to start
    ├── DemoError                   ``routecat demo`` cannot start (engine build, start)
    └── RequestError                a request not served as asked (message, code, param,
        │                           and retry_after: when trying again can help)
        ├── InvalidRequest          the body or a parameter is wrong
        ├── InvalidApiKey           no key, a malformed one, an unknown or revoked one
        ├── InsufficientBalance     not enough balance and not free
        ├── NotFound                no such model / route / top-up
        ├── RateLimited             too many requests; retry_after says when
        ├── UpstreamError           the provider node failed
        └── ServiceUnavailable      no capacity, no price, shutting down, backend down

Other packages keep their own trees: ``routecat.api.errors`` (transport-only errors),
``routecat.network.errors``, ``routecat.money.lightning.errors``, ``ledger.errors``,
``owlrun.errors`` and ``owlrun.protocol.ProtocolError``.
"""

from __future__ import annotations

from typing import ClassVar


class RouteCatError(Exception):
    """Base of every exception this package raises on purpose."""


class ConfigError(RouteCatError):
    """The configuration cannot be used."""


class DemoError(RouteCatError):
    """``routecat demo`` cannot run its engine: the build failed, or it did not start."""


class RequestError(RouteCatError):
    """A request the gateway does not serve as asked; ``code`` is machine-readable."""

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


class InvalidRequest(RequestError):
    default_code = "invalid_request"


class InvalidApiKey(RequestError):
    default_code = "invalid_api_key"


class InsufficientBalance(RequestError):
    default_code = "insufficient_balance"


class NotFound(RequestError):
    default_code = "not_found"


class RateLimited(RequestError):
    default_code = "rate_limit_exceeded"


class UpstreamError(RequestError):
    default_code = "upstream_error"


class ServiceUnavailable(RequestError):
    default_code = "no_capacity"
