"""A property test of the LNURL boundary: whatever a Lightning Address server answers
(any JSON, any shape, absurd numbers, odd callbacks), resolving it either yields an
invoice that passed every check or raises ``LnurlError``; nothing else escapes, so no
answer can stop the payout worker. One local server serves every example; each example
sets what it answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Response
from quart_trio import QuartTrio

from routecat.money.lightning.errors import LnurlError
from routecat.money.lightning.lnurl import Resolver
from tests.fakes import serve_app

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
amounts = st.one_of(st.integers(min_value=-5, max_value=10**12), json_values)


class Answers:
    """What the local server says, set by each example."""

    def __init__(self) -> None:
        self.pay_request: str = "{}"
        self.callback: str = "{}"
        self.url = ""
        self.token: trio.lowlevel.TrioToken | None = None


@pytest.fixture(scope="module")
def server() -> Iterator[Answers]:
    answers = Answers()
    ready = threading.Event()
    stop: list[trio.Event] = []
    app = QuartTrio("lnurl-property")

    @app.get("/.well-known/lnurlp/<user>")
    async def pay_request(user: str) -> Any:
        return Response(answers.pay_request, content_type="application/json")

    @app.get("/cb")
    async def callback() -> Any:
        return Response(answers.callback, content_type="application/json")

    async def main() -> None:
        stop.append(trio.Event())
        async with trio.open_nursery() as nursery:
            answers.url = await nursery.start(serve_app, app)
            answers.token = trio.lowlevel.current_trio_token()
            ready.set()
            await stop[0].wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield answers
    trio.from_thread.run_sync(stop[0].set, trio_token=answers.token)
    thread.join(10)


def pay_requests(url: str) -> st.SearchStrategy[Any]:
    good_callback = st.just(f"{url}/cb")
    callbacks = st.one_of(
        good_callback,
        good_callback,
        st.sampled_from(
            [f"{url}/cb?x=1", "https://pay.example:99999/cb", "ftp://x/cb", "http://[::1/cb", ""]
        ),
        st.text(max_size=30),
        json_values,
    )
    return st.one_of(
        st.fixed_dictionaries(
            {"tag": st.sampled_from(["payRequest", "withdrawRequest"]) | json_values},
            optional={
                "callback": callbacks,
                "minSendable": amounts,
                "maxSendable": amounts,
                "metadata": st.text(max_size=20) | json_values,
            },
        ),
        json_values,
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_lnurl_answer_yields_a_checked_invoice_or_lnurl_error(
    server: Answers, data: st.DataObject
) -> None:
    server.pay_request = json.dumps(data.draw(pay_requests(server.url), "pay request"))
    server.callback = json.dumps(
        data.draw(st.fixed_dictionaries({}, optional={"pr": json_values}) | json_values, "cb")
    )

    async def resolve() -> str | None:
        async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
            resolver = Resolver(client, allow_private=True, base_url_override=server.url)
            try:
                return await resolver.fetch_invoice("alice@pay.example", 100_000, "regtest")
            except LnurlError:
                return None

    # Nothing but LnurlError may escape; an invoice can only come from a check that
    # passed, and these answers hold no valid signed invoice.
    assert trio.run(resolve) is None
