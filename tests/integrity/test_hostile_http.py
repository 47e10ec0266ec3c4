"""Hostile HTTP clients against a live gateway: raw bytes no real client sends
(websocket upgrades with bytes or broken websocket frames after their head, broken
heads, lying lengths, bytes cut anywhere) must cost the gateway at most that
connection.

One live gateway, its engine and an honest owlrun node run in a thread of their own
(``tests.servers.LiveGateway``); each example is a fresh ``trio.run`` talking to it
over real sockets. After every example the server still answers, its honest node is
still connected, and a paid request is still answered exactly.
"""

from __future__ import annotations

import os

import httpx
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from owlrun.protocol import WS_PATH
from tests.clients import chat
from tests.servers import LiveGateway

EXAMPLES = int(os.environ.get("ROUTECAT_HOSTILE_EXAMPLES", "200")) // 2
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: bKdPyn3u98cTfZJSh4TNeQ==\r\n"
    "X-Owlrun-Node: node-x\r\nX-Owlrun-Secret: {secret}\r\n\r\n"
)
POST = (
    "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    "Content-Length: {length}\r\n\r\n"
)
PATHS = [WS_PATH, "/v1/gateway/ws", "/v1/chat/completions", "/healthz", "/nowhere"]


heads = st.one_of(
    st.builds(
        lambda path, secret: UPGRADE.format(path=path, secret=secret).encode(),
        st.sampled_from(PATHS),
        st.sampled_from(["s" * 32, ""]),
    ),
    st.builds(
        lambda path, length: POST.format(path=path, length=length).encode(),
        st.sampled_from(PATHS),
        st.sampled_from(["0", "5", "-1", "99999999999999999999", "x"]),
    ),
    st.binary(max_size=200),
)


def ws_frame(
    opcode: int, fin: bool, mask: bytes | None, payload: bytes, length: int | None
) -> bytes:
    """One websocket frame as a client writes it, or as a liar does (unmasked, a
    reserved opcode, a length that is not the payload's)."""
    n = len(payload) if length is None else length
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([(0x80 if fin else 0) | opcode, bit | n])
    elif n < 1 << 16:
        head = bytes([(0x80 if fin else 0) | opcode, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([(0x80 if fin else 0) | opcode, bit | 127]) + n.to_bytes(8, "big")
    if mask is not None:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


payloads = st.one_of(
    st.binary(max_size=100),
    st.text(max_size=50).map(str.encode),
    st.sampled_from(
        [
            b'{"type":"hello","node_id":"node-x","agent_version":"1","protocol_version":4,'
            b'"models":[{"name":"m:1b"}],"max_concurrency":1}',
            b'{"type":"heartbeat","in_flight":0}',
            b"\x03\xe8bye",  # a close's code and reason
        ]
    ),
)
frames = st.lists(
    st.builds(
        ws_frame,
        st.sampled_from([0, 1, 2, 3, 8, 9, 10, 11]),  # continuation, text, binary, ping...
        st.booleans(),
        st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
        payloads,
        st.one_of(st.none(), st.integers(min_value=0, max_value=(1 << 63) - 1)),
    ),
    max_size=4,
).map(b"".join)
attacks = st.tuples(
    heads,
    st.one_of(st.binary(max_size=64), frames),  # what follows the head in the same write
    st.one_of(st.none(), st.integers(min_value=0, max_value=400)),  # cut after n bytes
    st.sampled_from([0.0, 0.05]),  # time before the client vanishes
)


async def send_attack(url: str, head: bytes, tail: bytes, cut: int | None, linger: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    data = (head + tail)[:cut]
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        try:
            await stream.send_all(data)
            with trio.move_on_after(linger):
                while await stream.receive_some(65536):
                    pass
        except trio.BrokenResourceError:
            pass  # the server closed on it: its right
        finally:
            await stream.aclose()


async def still_serving(live: LiveGateway) -> None:
    headers = {"Authorization": f"Bearer {live.paid_key}"}
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=10) as c:
            r = await c.get("/healthz")
            assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", json=chat("still there?"))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "You said: still there?"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(attack=attacks)
# Hypercorn issue 225: bytes after an upgrade's head stopped the whole server.
@example(attack=(UPGRADE.format(path=WS_PATH, secret="s" * 32).encode(), b"x\r\n", None, 0.05))
@example(attack=(UPGRADE.format(path="/v1/gateway/ws", secret="").encode(), b"x", None, 0.0))
@example(attack=(UPGRADE.format(path="/nowhere", secret="").encode(), b"\r\n", None, 0.05))
def test_a_hostile_http_client_costs_only_its_connection(
    live: LiveGateway, attack: tuple[bytes, bytes, int | None, float]
) -> None:
    trio.run(send_attack, live.url, *attack)
    trio.run(still_serving, live)
    assert live.error is None
    assert len(live.call(online_nodes)) == 1  # the honest node kept its socket


async def online_nodes(gw: object) -> list[str]:
    return list(gw.registry.nodes)  # type: ignore[attr-defined]
