"""The foundation: a live gateway on port 0, keys, the error surface, CORS, metrics."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from routecat.config import Config, load_config
from routecat.errors import ConfigError
from routecat.money.keys import KEY_PATTERN, hash_key
from tests.servers import (
    Running,
    assert_error,
    everything_stored,
    make_config,
    register,
    start_gateway,
)

CHAT = {"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]}


async def test_register_returns_key_and_quota(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/v1/auth/register", json={"name": "  my app  "})
    assert r.status_code == 200
    body = r.json()
    assert body["quota_daily"] == 10
    assert KEY_PATTERN.fullmatch(body["api_key"])
    assert len(body["api_key"]) >= 35
    assert r.headers["x-request-id"]


async def test_key_authenticates_and_survives_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    with trio.fail_after(20):
        first = await start_gateway(nursery, config)
        async with first.client() as c:
            key = await register(c)
            r = await c.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
            )
            assert_error(r, 404, "model_not_found")
        await first.halt()
        second = await start_gateway(nursery, config)
        async with second.client() as c:
            r = await c.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
            )
            assert_error(r, 404, "model_not_found")
            forged = key[:-1] + ("Y" if key.endswith("X") else "X")  # never the key itself
            r = await c.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {forged}"}
            )
            assert_error(r, 401, "invalid_api_key")
        await second.halt()  # no checkpoint moving rows between the files being read
    data = everything_stored(config.database)
    assert key.encode() not in data
    assert key[3:].encode() not in data
    assert hash_key(key).encode() in data


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer"}, 401, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer rc_short"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer sk-" + "a" * 40}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer rc_" + "a" * 40}, 401, "invalid_api_key"),
    ],
)
async def test_bad_keys(
    client: httpx.AsyncClient, headers: dict[str, str], status: int, code: str
) -> None:
    with trio.fail_after(10):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert_error(r, status, code)


async def raw_request(url: str, head: bytes, body: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = await stream.receive_some()
            assert chunk, data
            data += chunk
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def test_key_with_trailing_whitespace(client: httpx.AsyncClient, gateway: Running) -> None:
    # HTTP strips optional whitespace around header values, so the key still authenticates;
    # whitespace inside the key makes it malformed. Neither is a 500.
    with trio.fail_after(10):
        key = await register(client)
        body = b'{"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]}'
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        )
        answer = await raw_request(
            gateway.url, head + b"Authorization: Bearer " + key.encode() + b" \t \r\n", body
        )
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
        assert b"model_not_found" in answer
        answer = await raw_request(
            gateway.url,
            head
            + b"Authorization: Bearer "
            + key[:20].encode()
            + b" "
            + key[20:].encode()
            + b"\r\n",
            body,
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"invalid_api_key" in answer


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2, 3]", None),
        (b"\xff\xfe\xfa garbage", None),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "bot", "content": "x"}]}', "messages[0].role"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            "temperature",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": 7}]}', "messages[0].content"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', "stop"),
    ],
)
async def test_malformed_bodies_are_400_naming_the_field(
    client: httpx.AsyncClient, body: bytes, param: str | None
) -> None:
    with trio.fail_after(10):
        key = await register(client)
        r = await client.post(
            "/v1/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
    error = assert_error(r, 400, "invalid_request")
    assert error["param"] == param
    if param:
        assert param in error["message"]


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        key = await register(client)
        body = {**CHAT, "user": "someone", "parallel_tool_calls": False, "x_extra": {"a": 1}}
        r = await client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    assert_error(r, 404, "model_not_found")


async def test_huge_body_is_413(client: httpx.AsyncClient) -> None:
    with trio.fail_after(20):
        r = await client.post(
            "/v1/auth/register", content=b'{"name": "' + b"a" * (10 * 1024 * 1024) + b'"}'
        )
    assert_error(r, 413, "request_too_large")


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        assert_error(await client.get("/v1/nothing"), 404, "not_found")
        wrong = await client.get("/v1/auth/register")
        assert_error(wrong, 405, "method_not_allowed")
        assert wrong.headers["allow"] == "OPTIONS, POST"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 65}, "name"),
        ({}, "name"),
        ({"name": 3}, "name"),
    ],
)
async def test_register_validates_name(client: httpx.AsyncClient, body: object, param: str) -> None:
    with trio.fail_after(10):
        r = await client.post("/v1/auth/register", json=body)
    assert assert_error(r, 400, "invalid_request")["param"] == param


async def test_register_rate_limited_per_ip_and_spoofing_ignored(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        gw = await start_gateway(nursery, make_config(tmp_path, register_limit_per_hour=2))
        async with gw.client() as c:
            for i in range(2):
                r = await c.post(
                    "/v1/auth/register",
                    json={"name": f"n{i}"},
                    headers={"X-Forwarded-For": f"10.0.0.{i}"},
                )
                assert r.status_code == 200
            r = await c.post(
                "/v1/auth/register", json={"name": "n3"}, headers={"X-Forwarded-For": "10.9.9.9"}
            )
            assert_error(r, 429, "rate_limit_exceeded")
            assert 3500 <= int(r.headers["Retry-After"]) <= 3600


async def test_trusted_proxy_sets_client_ip(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        gw = await start_gateway(
            nursery, make_config(tmp_path, register_limit_per_hour=1, trusted_proxies="127.0.0.1")
        )
        async with gw.client() as c:
            for ip in ("203.0.113.1", "203.0.113.2"):
                r = await c.post(
                    "/v1/auth/register",
                    json={"name": "x"},
                    headers={"X-Forwarded-For": f"1.1.1.1, {ip}"},
                )
                assert r.status_code == 200, ip
            r = await c.post(
                "/v1/auth/register", json={"name": "x"}, headers={"X-Forwarded-For": "203.0.113.1"}
            )
            assert_error(r, 429, "rate_limit_exceeded")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_completion_routes_keep_every_http_rule(
    client: httpx.AsyncClient, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completions routes are served as plain ASGI in front of the app
    (``routecat.api.asgi``): the app's rules still hold on them."""
    with trio.fail_after(30):
        key = await register(client)
        auth = {"Authorization": f"Bearer {key}"}
        body = {**CHAT, "prompt": "hi"}
        # Request id echoed when sane, made up when not; CORS on errors; counted.
        r = await client.post(path, json=body, headers={**auth, "X-Request-Id": "abc-123"})
        assert_error(r, 404, "model_not_found")
        assert r.headers["x-request-id"] == "abc-123"
        assert r.headers["access-control-allow-origin"] == "*"
        assert "X-RouteCat-Cost-Msat" in r.headers["access-control-expose-headers"]
        assert r.headers["connection"] == "close"  # an error for a request with a body
        r = await client.post(path, json=body, headers={**auth, "X-Request-Id": "bad id"})
        assert r.headers["x-request-id"].startswith("req_")
        # A chunked body is read like any other.
        chunks = [
            b'{"model": "nope:1b", ',
            b'"messages": [{"role": "user", "content": "x"}], ',
            b'"prompt": "x"}',
        ]

        async def chunked() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        r = await client.post(path, content=chunked(), headers=auth)
        assert_error(r, 404, "model_not_found")
        # Another method: 405 naming what is allowed; a preflight still answers.
        r = await client.get(path)
        assert_error(r, 405, "method_not_allowed")
        assert r.headers["allow"] == "OPTIONS, POST"
        assert r.headers["x-request-id"].startswith("req_")
        assert (await client.options(path)).status_code == 204
        # A made-up method is refused, and counted without a label of its own.
        assert_error(await client.request("FROB", path), 405, "method_not_allowed")
        # Past the body limit: 413, and the connection is closed.
        r = await client.post(path, content=b"x" * (10 * 1024 * 1024), headers=auth)
        assert_error(r, 413, "request_too_large")
        assert r.headers["connection"] == "close"
        text = (await client.get("/metrics")).text
        assert f'route="{path}",status="404"' in text.replace('method="POST",', "")
        assert 'method="OTHER"' in text and "FROB" not in text
    # A body that never arrives whole: 408 once the body timeout passes.
    monkeypatch.setattr("routecat.api.asgi.BODY_TIMEOUT", 0.5)
    host, port = client.base_url.host, client.base_url.port
    assert port is not None
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        answer = b""
        while part := await stream.receive_some():  # closed after the error
            answer += part
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in answer
    assert b'"code":"request_timeout"' in answer


class _Chunks:
    """A chunked request body (an iterator, not a generator: the server may stop
    reading it halfway, and a generator left unfinished warns when collected)."""

    def __init__(self, count: int, chunk: bytes) -> None:
        self.left, self.chunk = count, chunk

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if not self.left:
            raise StopAsyncIteration
        self.left -= 1
        return self.chunk


async def test_a_response_that_says_close_closes_the_connection(
    client: httpx.AsyncClient,
) -> None:
    """``Connection: close`` (asked by the client, or said by an error for a request
    whose body may be unread) ends with the socket closed, on the app's routes and on
    the completions routes, whether or not the body was read."""
    host, port = client.base_url.host, client.base_url.port
    assert port is not None
    key = await register(client)

    async def exchange(request: bytes) -> bytes:
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(request)
        answer = b""
        while part := await stream.receive_some():  # until the server closes
            answer += part
        await stream.aclose()
        return answer

    def post(path: str, body: bytes, extra: str = "") -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        return head.encode() + body

    auth = f"Authorization: Bearer {key}\r\n"
    with trio.fail_after(20):
        asked = await exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert asked.startswith(b"HTTP/1.1 200")
        invalid = await exchange(post("/v1/auth/register", b'{"name": ""}'))
        assert invalid.startswith(b"HTTP/1.1 400") and b"connection: close" in invalid
        unread = await exchange(post("/v1/chat/completions", b"{}"))  # no key: body unread
        assert unread.startswith(b"HTTP/1.1 401")
        absurd = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth.encode()
        absurd += b"Content-Length: " + b"9" * 40 + b"\r\n\r\n{}"
        answer = await exchange(absurd)  # refused by h11 itself, or by the route's 413
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), answer[:300]
        read = await exchange(post("/v1/chat/completions", json.dumps(CHAT).encode(), auth))
        assert read.startswith(b"HTTP/1.1 404") and b"model_not_found" in read
        # Answers given without reading a large body (a bad key, another method) still
        # end with the connection closed: the body is read and dropped meanwhile.
        for request in (
            post("/v1/chat/completions", b"", "Content-Length: 4194304\r\n"),
            b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n",
        ):
            request = request.replace(b"Content-Length: 0\r\n", b"")
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(request)

            async def send_the_body(stream: trio.SocketStream = stream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for _ in range(64):
                        await stream.send_all(b"x" * 65536)

            answer = b""
            async with trio.open_nursery() as sending:
                sending.start_soon(send_the_body)
                while part := await stream.receive_some():
                    answer += part
                sending.cancel_scope.cancel()
            await stream.aclose()
            assert answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 405")), answer[:100]

        # A chunked body past the limit is refused once the limit is passed, and the
        # rest is read and dropped until the connection closes.
        r = await client.post(
            "/v1/chat/completions",
            content=_Chunks(256, b"x" * 65536),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert_error(r, 413, "request_too_large")
        # A body far past the limit is refused at once, and the client's rest is not
        # waited for: the connection closes and the client sees the 413.
        r = await client.post(
            "/v1/chat/completions",
            content=b"x" * (64 * 1024 * 1024),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert_error(r, 413, "request_too_large")


async def test_cors_preflight_and_headers(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-allow-headers"] == "authorization, content-type"
        assert "POST" in r.headers["access-control-allow-methods"]
        # Whatever a browser client sends is echoed: OpenRouter-style and SDK headers.
        asked = "authorization, content-type, http-referer, x-title, x-stainless-os"
        r = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": asked,
            },
        )
        assert r.headers["access-control-allow-headers"] == asked
        assert r.headers["vary"] == "Access-Control-Request-Headers"
        # A malformed list is not echoed: the known list is answered.
        r = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "x", "Access-Control-Request-Headers": "b: c, <d>"},
        )
        assert "Authorization" in r.headers["access-control-allow-headers"]
        r = await client.get("/v1/stats", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "X-RouteCat-Max-Tokens" in r.headers["access-control-expose-headers"]


async def test_metrics_count_requests(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        await client.get("/v1/stats")
        await client.get("/v1/stats")
        text = (await client.get("/metrics")).text
    line = next(
        row
        for row in text.splitlines()
        if row.startswith("routecat_http_requests_total{")
        and 'route="/v1/stats"' in row
        and 'status="200"' in row
    )
    assert float(line.rsplit(" ", 1)[1]) == 2.0
    assert "routecat_http_request_duration_seconds_bucket" in text


async def test_health_ready_stats(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        stats = (await client.get("/v1/stats")).json()
    assert stats["version"] == "0.1.0"
    assert isinstance(stats["commit"], str)
    assert stats["commit"]


async def test_request_id_is_echoed_when_sane(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await client.get("/healthz", headers={"X-Request-Id": "bad id\twith junk"})
        assert r.headers["x-request-id"].startswith("req_")


async def test_crashing_service_stops_the_gateway(tmp_path: Path) -> None:
    from routecat.server import serve_gateway

    async def crashing(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0.1)
        raise RuntimeError("boom")

    with (
        trio.fail_after(10),
        pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom"), flatten_subgroups=True),
    ):
        await serve_gateway(make_config(tmp_path), extra_services=[crashing])


def test_config_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "rc.toml"
    toml.write_text(
        'port = 9000\nhost = "0.0.0.0"\nlog_level = "DEBUG"\ntrusted_proxies = ["10.0.0.1"]\n'
    )
    env = {"ROUTECAT_PORT": "9100", "ROUTECAT_LOG_LEVEL": "WARNING"}
    config = load_config(flags={"port": "9200"}, environ=env, config_file=str(toml))
    assert (config.port, config.host, config.log_level) == (9200, "0.0.0.0", "WARNING")
    assert config.trusted_proxies == ("10.0.0.1",)
    assert load_config(environ={}) == Config()
    with pytest.raises(ConfigError, match="secret"):
        load_config(flags={"lnbits_admin_key": "x"}, environ={})
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    assert (
        load_config(environ={"ROUTECAT_LNBITS_ADMIN_KEY_FILE": str(secret)}).lnbits_admin_key
        == "s3cret"
    )
    with pytest.raises(ConfigError, match="port"):
        load_config(environ={"ROUTECAT_PORT": "eighty"})
    toml.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(environ={}, config_file=str(toml))
    for interval in ("0", "-5", "0.01", "86400"):  # agents would refuse such a welcome
        with pytest.raises(ConfigError, match="heartbeat_interval"):
            load_config(environ={"ROUTECAT_HEARTBEAT_INTERVAL": interval})
    with pytest.raises(ConfigError, match="heartbeat_misses"):
        load_config(environ={"ROUTECAT_HEARTBEAT_MISSES": "0"})


def test_help_is_useful() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "routecat", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--host",
        "--port",
        "--database",
        "--log-format",
        "--max-body-bytes",
        "--trusted-proxies",
    ):
        assert flag in out
    out = subprocess.run(
        [sys.executable, "-m", "routecat", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in out
    assert "keys" in out


async def test_serve_subprocess_exits_0_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "ROUTECAT_DATABASE": str(tmp_path / "rc.db"), "ROUTECAT_PORT": "0"}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "routecat", "serve"], env=env, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(15):
        while b"listening on" not in seen:
            chunk = await proc.stderr.receive_some()
            assert chunk, seen
            seen += chunk
    url = seen.split(b"listening on ")[1].split()[0].decode()
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/healthz")).status_code == 200
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        assert await proc.wait() == 0


async def test_keys_cli_offline(client: httpx.AsyncClient, gateway: Running) -> None:
    with trio.fail_after(20):
        key = await register(client, "cli app")
        db = gateway.config.database
        run = functools.partial(subprocess.run, capture_output=True, text=True)
        out = await trio.to_thread.run_sync(
            lambda: run([sys.executable, "-m", "routecat", "keys", "list", "--database", db])
        )
        assert key[:11] in out.stdout
        assert "cli app" in out.stdout
        assert key not in out.stdout
        out = await trio.to_thread.run_sync(
            lambda: run(
                [sys.executable, "-m", "routecat", "keys", "rotate", key[:11], "--database", db]
            )
        )
        new_key = out.stdout.strip().rsplit(" ", 1)[1]
        assert KEY_PATTERN.fullmatch(new_key)
        r = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        )
        assert_error(r, 401, "invalid_api_key")
        r = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {new_key}"}
        )
        assert_error(r, 404, "model_not_found")
        out = await trio.to_thread.run_sync(
            lambda: run(
                [sys.executable, "-m", "routecat", "keys", "revoke", "rc_", "--database", db]
            )
        )
        assert out.returncode == 1
        assert "at least" in out.stderr
        out = await trio.to_thread.run_sync(
            lambda: run(
                [sys.executable, "-m", "routecat", "keys", "revoke", new_key[:11], "--database", db]
            )
        )
        assert out.returncode == 0, out.stderr
        r = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {new_key}"}
        )
        assert_error(r, 401, "invalid_api_key")


async def test_openapi_documents_every_public_route(gateway: Running) -> None:
    import re

    import yaml

    from routecat.api.app import create_app
    from routecat.api.asgi import ROUTES

    spec = yaml.safe_load((Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text())
    app = create_app(gateway.gw)
    routes = set(ROUTES)  # served as plain ASGI in front of the app
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        if (
            path.startswith(("/static", "/internal/", "/v1/gateway/"))
            or rule.websocket
            or rule.endpoint.startswith("web.")
        ):
            # pages: docs/web.md; the replicas' route: docs/scaling.md; the stock Owlrun
            # agents' routes (an agent protocol, not the client API): docs/providers.md
            continue
        routes.add(path)
    documented = set(spec["paths"])
    assert routes - documented == set(), "routes missing from docs/openapi.yaml"
    assert documented - routes == set(), "docs/openapi.yaml documents routes that do not exist"


async def test_what_the_contract_fuzzer_found(client: httpx.AsyncClient) -> None:
    """Each a failure schemathesis found against docs/openapi.yaml (nox -s contract)."""
    with trio.fail_after(20):
        # A lone surrogate is valid JSON, not Unicode text: a 400, never a 500.
        r = await client.post(
            "/v1/auth/register",
            content=b'{"name": "a\\udab0b"}',
            headers={"Content-Type": "application/json"},
        )
        assert_error(r, 400, "invalid_request")
        assert "surrogate" in r.json()["error"]["message"]
        # An integer in JSON Schema's sense: 10.0 is 10; 10.5 and "10" are not.
        key = await register(client)
        auth = {"Authorization": f"Bearer {key}"}
        ok = await client.post("/v1/auth/topup", json={"amount_sats": 1000.0}, headers=auth)
        assert ok.status_code == 200, ok.text
        for bad in (1000.5, "1000", True):
            r = await client.post("/v1/auth/topup", json={"amount_sats": bad}, headers=auth)
            assert_error(r, 400, "invalid_request")
        # An error for a request with a body closes the connection (its unread rest
        # would poison the next request on it).
        r = await client.post("/v1/chat/completions", json={"model": "x"})
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["connection"] == "close"
        # The webhook is a hint: any JSON, even a string that is not JSON inside, is 200.
        r = await client.post("/v1/lightning/webhook", json="")
        assert r.status_code == 200 and r.json() == {"ok": True}
