"""The Quart-Trio application: the HTTP surface and its cross-cutting rules.

Invariants owned here: every response carries ``X-Request-Id``; every error, from a
view, the router or an unexpected exception, leaves in the OpenAI error shape with
the right status and never with a traceback; ``/v1/*`` answers CORS preflights.
"""

from __future__ import annotations

import logging
import secrets
import time

from quart import (
    Response,
    g,
    has_request_context,
    has_websocket_context,
    request,
    websocket,
)
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as MethodNotAllowedHTTP

from routecat import errors
from routecat.api.accounts import register_accounts
from routecat.api.embeddings import register_embeddings
from routecat.api.errors import FROM_STATUS
from routecat.api.http import (
    CORS_HEADERS,
    REQUEST_ID,
    App,
    error_response,
    method_label,
    preflight_headers,
)
from routecat.api.internal import register_internal
from routecat.api.public import register_public
from routecat.api.responses import register_responses
from routecat.api.stock import register_stock
from routecat.gateway import Gateway
from routecat.web.pages import create_web

log = logging.getLogger("routecat.http")


def create_app(gw: Gateway) -> App:
    # Static files are the web blueprint's (routecat/web/static); the app itself has none.
    app = App("routecat", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = gw.config.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.config["BODY_TIMEOUT"] = 60
    app.config["RESPONSE_TIMEOUT"] = None

    @app.before_request
    async def start_request() -> Response | None:
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else "req_" + secrets.token_hex(8)
        if request.method == "OPTIONS" and request.path.startswith("/v1/"):
            return Response("", status=204, headers=preflight_headers(request.headers))
        return None

    @app.after_request
    async def finish_request(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if request.path.startswith("/v1/"):
            response.headers.update(CORS_HEADERS)
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        gw.metrics.requests.labels(
            rule, method_label(request.method), str(response.status_code)
        ).inc()
        gw.metrics.latency.labels(rule).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %d %.1fms",
                request.method,
                request.path,
                response.status_code,
                elapsed * 1000,
                extra={"request_id": g.get("request_id", "")},
            )
        return response

    @app.errorhandler(errors.RequestError)
    async def api_error(exc: errors.RequestError) -> Response:
        return _closing_if_unread(error_response(exc))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = FROM_STATUS.get(status, errors.RequestError)
        message = {
            404: f"no route for {_method()} {_path()}",
            405: f"method {_method()} is not allowed on {_path()}",
            413: f"request body larger than {gw.config.max_body_bytes} bytes",
        }.get(status, exc.description or exc.name)
        response = error_response(kind(message))
        response.status_code = status
        if status == 413:
            response.headers["Connection"] = "close"
        _closing_if_unread(response)
        if status == 405 and isinstance(exc, MethodNotAllowedHTTP) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error(
            "unhandled error in %s %s",
            _method(),
            _path(),
            exc_info=exc,
            extra={"request_id": g.get("request_id", "")},
        )
        return _closing_if_unread(
            error_response(errors.RequestError("internal error; the request id names it"))
        )

    app.register_blueprint(create_web(gw))

    register_public(app, gw)
    register_internal(app, gw)
    register_embeddings(app, gw)
    register_responses(app, gw)
    register_stock(app, gw)
    register_accounts(app, gw)
    return app


def _closing_if_unread(response: Response) -> Response:
    """An error for a request that carried a body closes the connection: the error may
    have come before the body was read whole (a bad key, a rate limit, the router), and
    an unread rest would make the connection unusable for a client's next request."""
    if has_request_context() and (
        request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "")
    ):
        response.headers["Connection"] = "close"
    return response


def _method() -> str:
    """The request's method; a websocket upgrade (which has no request context) is GET."""
    return request.method if has_request_context() else "GET"


def _path() -> str:
    if has_request_context():
        return request.path
    return websocket.path if has_websocket_context() else "?"
