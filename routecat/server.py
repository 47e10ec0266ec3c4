"""``routecat serve``: one top-level nursery owning every service and the HTTP server.

Invariants: services run in this nursery, never in quart-trio's ``app.nursery``, so a
crashing service tears the whole process down at once (no zombie server answering
HTTP with nothing behind it); a stop request drains in-flight requests for at most
``drain_timeout`` seconds, then cancels everything.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hypercorn.config
import hypercorn.trio
import hypercorn.trio.tcp_server
import trio

from ledger.store import Storage
from routecat.api.admin import create_admin_app, prepare_socket, secure_socket, socket_path
from routecat.api.app import create_app
from routecat.api.asgi import CompletionRoutes
from routecat.config import Config
from routecat.db import schema
from routecat.gateway import Gateway, open_gateway
from routecat.network.session import evict_silent

log = logging.getLogger("routecat")

GC_YOUNG = 20_000  # allocations between young-generation collections

Service = Callable[..., Awaitable[Any]]


def guard_connections() -> None:
    """Make a connection's failure inside hypercorn end that connection, not the server;
    and let the application claim a new connection before hypercorn reads it.

    Hypercorn's trio server (0.17 and 0.18) lets any exception but ``OSError`` out of
    a connection's handler into the server's nursery, which stops the whole process,
    and its own code raises some: an upgrade request with bytes after its head makes
    hypercorn answer 400 while the app accepts the websocket, and h11's
    ``LocalProtocolError`` from the second of those stopped the gateway on one
    unauthenticated request (hypercorn issue 225; the fix upstream was reverted). Such
    an exception now closes its connection (hypercorn's ``finally`` already does) and is
    logged; cancellation and everything that is not an ``Exception`` pass through.

    An application with a ``claim(stream, wait, max_head)`` method (``CompletionRoutes``)
    is given each plain TCP connection first: it serves it itself (returns None) or
    returns the stream hypercorn is to serve. Idempotent.
    """
    tcp_server = hypercorn.trio.tcp_server.TCPServer
    original = tcp_server.run
    if getattr(original, "routecat_guarded", False):
        return

    @functools.wraps(original)
    async def run(self: Any) -> None:
        try:
            claim = getattr(getattr(self.app, "app", None), "claim", None)
            if claim is not None and isinstance(self.stream, trio.SocketStream):
                stream = await claim(
                    self.stream, self.config.keep_alive_timeout, self.config.h11_max_incomplete_size
                )
                if stream is None:
                    return
                self.stream = stream
            await original(self)
        except* Exception as group:
            log.warning(
                "closed a connection that failed inside the HTTP server: %s",
                "; ".join(repr(exc)[:200] for exc in group.exceptions),
            )
            log.debug("the connection's failure", exc_info=group)

    run.routecat_guarded = True  # type: ignore[attr-defined]
    tcp_server.run = run  # type: ignore[method-assign]


def open_store(config: Config) -> Storage:
    return schema.open_store(config.database)


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Hypercorn sets its logger's level from this (INFO by default), over ours: its
    # "Running on" lines repeat what RouteCat logs itself.
    hc.loglevel = "WARNING"
    # The drain (in-flight jobs, then in-flight HTTP exchanges) happens before the
    # server is told to stop; what is left then is idle keep-alive connections and node
    # sockets, closed after this short grace.
    hc.graceful_timeout = 0.5
    hc.read_timeout = None
    hc.keep_alive_timeout = 75
    hc.websocket_max_message_size = config.max_frame_bytes
    hc.h11_max_incomplete_size = 64 * 1024
    # Connections accepted by the kernel before the server takes them: bursts of new
    # clients (thousands of streams opened at once) are queued, not reset.
    hc.backlog = 4096
    return hc


async def serve_gateway(
    config: Config,
    *,
    stop: trio.Event | None = None,
    extra_services: Sequence[Service] = (),
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``stop`` is set; ``task_status`` receives the running gateway
    (its ``url`` attribute is the base URL)."""
    stop = trio.Event() if stop is None else stop
    guard_connections()
    async with open_gateway(config) as gw, trio.open_nursery() as nursery:
        app = create_app(gw)
        await gw.registry.load()
        await nursery.start(gw.rates.run)
        # Who else shares the database, before the sweeper decides whose reservations
        # are orphans.
        await nursery.start(gw.forwarder.run)
        await gw.cluster.sync()
        await nursery.start(gw.settlement.sweep)
        await nursery.start(gw.earnings.publish_earnings)
        await nursery.start(gw.settlement.retry_settlements)
        await nursery.start(gw.scheduler.run)
        await nursery.start(evict_silent, gw.registry, config)
        await nursery.start(gw.topups.run)
        await nursery.start(gw.payouts.run)
        for service in extra_services:
            await nursery.start(service)

        http_stop = trio.Event()

        async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn.trio.serve(
                CompletionRoutes(app, gw),  # type: ignore[arg-type]
                hypercorn_config(config),
                shutdown_trigger=http_stop.wait,
                task_status=task_status,
            )
            # HTTP is drained: stop every other service.
            nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(serve_http)
        gw.cluster.url = config.advertise_url or binds[0].replace("0.0.0.0", "127.0.0.1")
        await nursery.start(gw.cluster.run)
        if config.admin:
            await nursery.start(serve_admin, gw, stop)
        url = binds[0].replace("0.0.0.0", "127.0.0.1")
        gw.ready = True
        log.info("RouteCat %s (%s) listening on %s", gw.version, gw.commit, url)
        gw.url = url
        task_status.started(gw)
        await stop.wait()
        gw.ready = False
        log.info("stopping: draining in-flight jobs for up to %gs", config.drain_timeout)
        deadline = trio.current_time() + config.drain_timeout
        await gw.scheduler.drain(config.drain_timeout)
        # Jobs still running past the drain time are cut (billed as DESIGN says), and
        # their streams end with an error event; then the responses finish writing.
        gw.scheduler.cut_all()
        with trio.move_on_at(deadline + 2):
            await app.wait_quiet()
        http_stop.set()
    log.info("stopped")


async def serve_admin(
    gw: Gateway, stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The operator's endpoint on a 0600 Unix socket next to the database."""
    guard_connections()
    path = socket_path(gw.config)
    prepare_socket(path)
    hc = hypercorn.config.Config()
    hc.bind = [f"unix:{path}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.loglevel = "WARNING"
    hc.graceful_timeout = 1
    old_umask = os.umask(0o177)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    hypercorn.trio.serve,
                    create_admin_app(gw),
                    hc,
                    shutdown_trigger=stop.wait,
                )
            )
            os.umask(old_umask)
            await secure_socket(path)
            task_status.started()
    finally:
        os.umask(old_umask)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def watch_signals(stop: trio.Event) -> None:
    """First SIGINT/SIGTERM: graceful stop. A second one: stop waiting."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not stop.is_set():
                log.info("received %s", signal.Signals(signum).name)
                stop.set()
            else:
                raise KeyboardInterrupt


async def main_serve(config: Config) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, stop)
        await serve_gateway(config, stop=stop)
        nursery.cancel_scope.cancel()


def run(config: Config) -> int:
    # The modules loaded so far live as long as the process: the collector no longer
    # walks them, and it collects the young generation less often (a server allocates
    # fast; 700, the default, means a collection every few requests). Full collections
    # then walk only what requests, streams and nodes hold, which keeps their pauses
    # short with 10,000 open streams (docs/performance.md).
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 20, 20)
    try:
        trio.run(functools.partial(main_serve, config))
    except KeyboardInterrupt:
        log.error("stopped by a second signal before the drain finished")
        return 130
    except (Exception, BaseExceptionGroup) as exc:  # trio.run has returned: no Cancelled here
        log.critical("routecat stopped: a service crashed: %r", exc, exc_info=exc)
        return 1
    return 0
