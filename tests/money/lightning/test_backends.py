"""The phoenixd and LND REST adapters against local servers that speak their documented
HTTP APIs: auth in headers, amounts, definite failures vs ambiguous answers."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio
from quart import Response, request
from quart_trio import QuartTrio

from routecat.money.lightning.errors import LightningError
from routecat.money.lightning.remote import LndRest, Phoenixd
from tests.fakes import LnurlServer, serve_app


@attrs.define
class FakeNode:
    """In-memory node state shared by the phoenixd and LND imitations."""

    invoices: dict[str, dict[str, Any]] = attrs.Factory(dict)
    payments: dict[str, dict[str, Any]] = attrs.Factory(dict)
    auth_seen: list[str] = attrs.Factory(list)
    pay_mode: str = "ok"  # ok, fail, hang_then_paid, http500
    signer: LnurlServer = attrs.Factory(LnurlServer)

    def new_invoice(self, msat: int) -> tuple[str, str]:
        pr = self.signer.invoice(msat)
        import bolt11

        h = str(bolt11.decode(pr).payment_hash)
        self.invoices[h] = {"msat": msat, "paid": False, "pr": pr}
        return h, pr

    def pay(self, pr: str) -> tuple[str, dict[str, Any]]:
        import bolt11

        h = str(bolt11.decode(pr).payment_hash)
        record = {
            "paid": self.pay_mode != "fail",
            "fee_msat": 2000,
            "failed": self.pay_mode == "fail",
        }
        self.payments[h] = record
        return h, record


def phoenixd_app(node: FakeNode, password: str) -> QuartTrio:
    app = QuartTrio("phoenixd")

    @app.before_request
    async def auth() -> Any:
        header = request.headers.get("Authorization", "")
        node.auth_seen.append(header)
        if header != "Basic " + base64.b64encode(f":{password}".encode()).decode():
            return Response("unauthorized", status=401)
        return None

    @app.post("/createinvoice")
    async def create() -> Any:
        form = await request.form
        h, pr = node.new_invoice(int(form["amountSat"]) * 1000)
        return {"amountSat": int(form["amountSat"]), "paymentHash": h, "serialized": pr}

    @app.get("/payments/incoming/<h>")
    async def incoming(h: str) -> Any:
        inv = node.invoices.get(h)
        if inv is None:
            return Response("not found", status=404)
        return {
            "paymentHash": h,
            "isPaid": inv["paid"],
            "receivedSat": inv["msat"] // 1000 if inv["paid"] else 0,
            "fees": 0,
        }

    @app.post("/payinvoice")
    async def pay() -> Any:
        form = await request.form
        if node.pay_mode == "http500":
            node.pay(form["invoice"])
            return Response("oops", status=500)
        h, record = node.pay(form["invoice"])
        if record["failed"]:
            return {"reason": "no route found"}
        return {
            "recipientAmountSat": 1,
            "routingFeeSat": 2,
            "paymentId": "x",
            "paymentHash": h,
            "paymentPreimage": secrets.token_hex(32),
        }

    @app.get("/payments/outgoingbyhash/<h>")
    async def outgoing(h: str) -> Any:
        p = node.payments.get(h)
        if p is None:
            return Response("not found", status=404)
        return {"paymentHash": h, "isPaid": p["paid"], "fees": p["fee_msat"], "completedAt": 1}

    @app.get("/getbalance")
    async def balance() -> Any:
        return {"balanceSat": 12345, "feeCreditSat": 0}

    return app


def lnd_app(node: FakeNode, macaroon: str) -> QuartTrio:
    app = QuartTrio("lnd")

    @app.before_request
    async def auth() -> Any:
        header = request.headers.get("Grpc-Metadata-macaroon", "")
        node.auth_seen.append(header)
        if header != macaroon:
            return Response(json.dumps({"code": 2, "message": "verification failed"}), status=403)
        return None

    @app.post("/v1/invoices")
    async def add() -> Any:
        body = await request.get_json()
        h, pr = node.new_invoice(int(body["value_msat"]))
        return {
            "r_hash": base64.b64encode(bytes.fromhex(h)).decode(),
            "payment_request": pr,
            "add_index": "1",
        }

    @app.get("/v1/invoice/<h>")
    async def lookup(h: str) -> Any:
        inv = node.invoices.get(h)
        if inv is None:
            return Response(
                json.dumps({"code": 5, "message": "unable to locate invoice"}), status=404
            )
        return {
            "state": "SETTLED" if inv["paid"] else "OPEN",
            "amt_paid_msat": str(inv["msat"] if inv["paid"] else 0),
        }

    @app.post("/v2/router/send")
    async def send() -> Any:
        body = await request.get_json()
        assert int(body["fee_limit_msat"]) > 0
        h, record = node.pay(body["payment_request"])
        if node.pay_mode == "hang_then_paid":
            await trio.sleep(60)
        status = "FAILED" if record["failed"] else "SUCCEEDED"
        line = {
            "result": {
                "payment_hash": h,
                "status": status,
                "fee_msat": str(record["fee_msat"]),
                "failure_reason": "FAILURE_REASON_NO_ROUTE"
                if record["failed"]
                else "FAILURE_REASON_NONE",
            }
        }
        if node.pay_mode == "endless_line":  # a hostile backend: one line, never ended

            async def endless() -> AsyncIterator[bytes]:
                yield b'{"result": {"status": "IN_FLIGHT", "x": "'
                while True:
                    yield b"x" * 65536
                    await trio.lowlevel.checkpoint()

            return Response(endless(), content_type="application/json")
        if node.pay_mode == "chatter_then_paid":  # many updates, the last one counts

            async def chatter() -> AsyncIterator[bytes]:
                for _ in range(1000):
                    yield json.dumps({"result": {"status": "IN_FLIGHT"}}).encode() + b"\n"
                yield json.dumps(line).encode() + b"\n"

            return Response(chatter(), content_type="application/json")
        return Response(json.dumps(line) + "\n", content_type="application/json")

    @app.get("/v2/router/track/<h>")
    async def track(h: str) -> Any:
        p = node.payments.get(h)
        if p is None:
            return Response(
                json.dumps({"code": 5, "message": "payment isn't initiated"}), status=404
            )
        status = "FAILED" if p["failed"] else "SUCCEEDED"
        return Response(
            json.dumps(
                {"result": {"payment_hash": h, "status": status, "fee_msat": str(p["fee_msat"])}}
            )
            + "\n"
        )

    @app.get("/v1/balance/channels")
    async def balance() -> Any:
        return {"local_balance": {"sat": "5000", "msat": "5000000"}}

    return app


async def test_phoenixd_adapter(nursery: trio.Nursery) -> None:
    node = FakeNode()
    with trio.fail_after(20):
        url = await nursery.start(serve_app, phoenixd_app(node, "s3cret-pass"))
        backend = Phoenixd(url, "s3cret-pass")
        invoice = await backend.create_invoice(500_000, "top-up", 600)
        assert invoice.amount_msat == 500_000
        assert backend.network == "regtest"
        assert (await backend.invoice_status(invoice.payment_hash)).state == "pending"
        node.invoices[invoice.payment_hash]["paid"] = True
        status = await backend.invoice_status(invoice.payment_hash)
        assert (status.state, status.amount_received_msat) == ("paid", 500_000)
        assert (await backend.invoice_status("ab" * 32)).state == "expired"
        _, pr = FakeNode().new_invoice(100_000)
        paid = await backend.pay_invoice(pr, 10_000)
        assert (paid.state, paid.fee_msat) == ("paid", 2000)
        node.pay_mode = "fail"
        _, pr2 = FakeNode().new_invoice(100_000)
        assert (await backend.pay_invoice(pr2, 10_000)).state == "failed"
        node.pay_mode = "http500"  # an error answer after paying: ask, do not guess
        _, pr3 = FakeNode().new_invoice(100_000)
        assert (await backend.pay_invoice(pr3, 10_000)).state == "paid"
        assert await backend.balance_msat() == 12_345_000
        assert "s3cret-pass" not in repr(backend)
        wrong = Phoenixd(url, "wrong")
        with pytest.raises(LightningError, match="401"):
            await wrong.create_invoice(1000, "x", 60)
        await backend.close()
        await wrong.close()


async def test_lnd_adapter(nursery: trio.Nursery) -> None:
    node = FakeNode()
    macaroon = secrets.token_hex(32)
    with trio.fail_after(20):
        url = await nursery.start(serve_app, lnd_app(node, macaroon))
        backend = LndRest(
            url, macaroon, httpx.AsyncClient(timeout=httpx.Timeout(2.0)), pay_timeout=1.0
        )
        invoice = await backend.create_invoice(250_000, "top-up", 600)
        assert invoice.payment_hash in node.invoices
        assert (await backend.invoice_status(invoice.payment_hash)).state == "pending"
        node.invoices[invoice.payment_hash]["paid"] = True
        assert (await backend.invoice_status(invoice.payment_hash)).state == "paid"
        assert (await backend.invoice_status("cd" * 32)).state == "expired"
        _, pr = FakeNode().new_invoice(100_000)
        paid = await backend.pay_invoice(pr, 10_000)
        assert (paid.state, paid.fee_msat) == ("paid", 2000)
        node.pay_mode = "fail"
        _, pr2 = FakeNode().new_invoice(100_000)
        failed = await backend.pay_invoice(pr2, 10_000)
        assert failed.state == "failed" and "NO_ROUTE" in failed.reason
        # A pay call that times out is ambiguous: an error, never "failed"; the
        # payment's status, asked by hash, tells the truth.
        node.pay_mode = "hang_then_paid"
        _, pr3 = FakeNode().new_invoice(100_000)
        with pytest.raises(LightningError):
            await backend.pay_invoice(pr3, 10_000)
        import bolt11

        h3 = str(bolt11.decode(pr3).payment_hash)
        assert (await backend.payment_status(h3)).state == "paid"
        assert (await backend.payment_status("ef" * 32)).state == "failed"
        # Streamed updates are read bounded: the last of many counts, and a line that
        # never ends is the backend's error (an unknown outcome), not unbounded memory.
        node.pay_mode = "chatter_then_paid"
        _, pr4 = FakeNode().new_invoice(100_000)
        assert (await backend.pay_invoice(pr4, 10_000)).state == "paid"
        node.pay_mode = "endless_line"
        _, pr5 = FakeNode().new_invoice(100_000)
        with pytest.raises(LightningError, match="LND send: a line over 1048576 characters"):
            await backend.pay_invoice(pr5, 10_000)
        assert await backend.balance_msat() == 5_000_000
        assert all(seen == macaroon for seen in node.auth_seen)
        await backend.close()
