"""Adapters for Lightning nodes reached over HTTP: LNbits, phoenixd and LND REST.

Invariant: transport errors and unexpected answers raise ``LightningError`` (pending,
reconciled later); only a definite rejection (HTTP 401/403/404/405, or the backend's
own "failed" state) is a failure. Credentials travel in headers, never in URLs, and
are never logged.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import ssl
import time
from typing import Any

import attrs
import bolt11
import httpx

from owlrun.errors import LineTooLong
from owlrun.lines import read_lines
from routecat.money.lightning.backend import NETWORKS_BY_PREFIX, Invoice, InvoiceStatus, Payment
from routecat.money.lightning.errors import LightningError, map_exceptions

DEFINITE = {401, 403, 404, 405}
LND_MAX_LINE = 1024 * 1024  # characters in one of LND's streamed updates, at most
LND_KEPT_LINES = 16
TIMEOUT = httpx.Timeout(20.0, connect=10.0)


def _network_of(pr: str) -> str:
    currency = bolt11.decode(pr).currency
    return NETWORKS_BY_PREFIX.get(currency, currency)


async def _json(response: httpx.Response, what: str) -> Any:
    if response.status_code >= 400:
        raise LightningError(f"{what}: HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise LightningError(f"{what}: answer is not JSON") from None


@attrs.define(eq=False)
class LNbits:
    """LNbits: the invoice key receives, the admin key pays (both in ``X-Api-Key``)."""

    url: str
    invoice_key: str = attrs.field(repr=False)
    admin_key: str = attrs.field(repr=False)
    client: httpx.AsyncClient = attrs.Factory(lambda: httpx.AsyncClient(timeout=TIMEOUT))
    network: str = "bitcoin"
    webhook_url: str = ""
    name: str = "lnbits"

    def _headers(self, admin: bool = False) -> dict[str, str]:
        return {"X-Api-Key": self.admin_key if admin else self.invoice_key}

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Invoice:
        body: dict[str, Any] = {
            "out": False,
            "amount": amount_msat // 1000,
            "memo": memo,
            "expiry": expiry,
        }
        if self.webhook_url:
            body["webhook"] = self.webhook_url
        with map_exceptions("LNbits"):
            r = await self.client.post(
                f"{self.url}/api/v1/payments", json=body, headers=self._headers()
            )
        data = await _json(r, "LNbits create invoice")
        pr = data.get("bolt11") or data.get("payment_request")
        if not isinstance(pr, str):
            raise LightningError("LNbits returned no invoice")
        self.network = _network_of(pr)
        return Invoice(str(data["payment_hash"]), pr, amount_msat, time.time() + expiry)

    async def _payment(self, payment_hash: str, admin: bool) -> dict[str, Any] | None:
        with map_exceptions("LNbits"):
            r = await self.client.get(
                f"{self.url}/api/v1/payments/{payment_hash}", headers=self._headers(admin)
            )
        if r.status_code == 404:
            return None
        data = await _json(r, "LNbits payment status")
        return data if isinstance(data, dict) else None

    async def invoice_status(self, payment_hash: str) -> InvoiceStatus:
        data = await self._payment(payment_hash, admin=False)
        if data is None:
            return InvoiceStatus("expired")  # the backend does not know it: it cannot be paid
        details = data.get("details") or {}
        if data.get("paid") is True:
            amount = details.get("amount")
            return InvoiceStatus("paid", int(amount) if isinstance(amount, int) else None)
        # Only LNbits' own word makes it expired; our clock is no proof (the top-up
        # layer applies its grace period when a backend never says).
        if str(details.get("status", "")).lower() in ("failed", "expired"):
            return InvoiceStatus("expired")
        return InvoiceStatus("pending")

    async def pay_invoice(self, bolt11_invoice: str, max_fee_msat: int) -> Payment:
        payment_hash = str(bolt11.decode(bolt11_invoice).payment_hash)
        with map_exceptions("LNbits pay"):
            r = await self.client.post(
                f"{self.url}/api/v1/payments",
                json={"out": True, "bolt11": bolt11_invoice},
                headers=self._headers(admin=True),
                timeout=httpx.Timeout(90.0, connect=10.0),
            )
        if r.status_code in DEFINITE:
            return Payment("failed", payment_hash, reason=f"LNbits refused: HTTP {r.status_code}")
        if r.status_code >= 400:
            # 520 covers both "insufficient balance" and "already paid": ask the truth.
            return await self.payment_status(payment_hash)
        data = await _json(r, "LNbits pay")
        status = str(data.get("status", "")).lower()
        if status == "failed":
            return Payment("failed", payment_hash, reason="LNbits: payment failed")
        return await self.payment_status(payment_hash)

    async def payment_status(self, payment_hash: str) -> Payment:
        data = await self._payment(payment_hash, admin=True)
        if data is None:
            return Payment("failed", payment_hash, reason="LNbits has no such payment")
        details = data.get("details") or {}
        if data.get("paid") is True:
            fee = details.get("fee", 0)
            return Payment(
                "paid", payment_hash, fee_msat=abs(int(fee)) if isinstance(fee, int) else 0
            )
        if str(details.get("status", "")).lower() == "failed":
            return Payment("failed", payment_hash, reason="LNbits: payment failed")
        return Payment("pending", payment_hash)

    async def balance_msat(self) -> int:
        with map_exceptions("LNbits"):
            r = await self.client.get(f"{self.url}/api/v1/wallet", headers=self._headers())
        data = await _json(r, "LNbits wallet")
        return int(data["balance"])

    async def close(self) -> None:
        await self.client.aclose()


@attrs.define(eq=False)
class Phoenixd:
    """phoenixd: HTTP basic auth with the password only; amounts in sats."""

    url: str
    password: str = attrs.field(repr=False)
    client: httpx.AsyncClient = attrs.Factory(lambda: httpx.AsyncClient(timeout=TIMEOUT))
    network: str = "bitcoin"
    name: str = "phoenixd"

    def _auth(self) -> httpx.BasicAuth:
        return httpx.BasicAuth("", self.password)

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with map_exceptions("phoenixd"):
            return await self.client.request(
                method, f"{self.url}{path}", auth=self._auth(), **kwargs
            )

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Invoice:
        r = await self._call(
            "POST",
            "/createinvoice",
            data={
                "amountSat": str(amount_msat // 1000),
                "description": memo,
                "expirySeconds": str(expiry),
            },
        )
        data = await _json(r, "phoenixd createinvoice")
        pr = str(data["serialized"])
        self.network = _network_of(pr)
        return Invoice(str(data["paymentHash"]), pr, amount_msat, time.time() + expiry)

    async def invoice_status(self, payment_hash: str) -> InvoiceStatus:
        r = await self._call("GET", f"/payments/incoming/{payment_hash}")
        if r.status_code == 404:
            return InvoiceStatus("expired")
        data = await _json(r, "phoenixd incoming payment")
        if data.get("isPaid"):
            received = data.get("receivedSat")
            return InvoiceStatus(
                "paid", int(received) * 1000 if isinstance(received, int) else None
            )
        # phoenixd cannot say "expired": the top-up layer decides after its grace period.
        return InvoiceStatus("pending")

    async def pay_invoice(self, bolt11_invoice: str, max_fee_msat: int) -> Payment:
        payment_hash = str(bolt11.decode(bolt11_invoice).payment_hash)
        r = await self._call(
            "POST",
            "/payinvoice",
            data={"invoice": bolt11_invoice},
            timeout=httpx.Timeout(90.0, connect=10.0),
        )
        if r.status_code in DEFINITE:
            return Payment("failed", payment_hash, reason=f"phoenixd refused: HTTP {r.status_code}")
        if r.status_code >= 400:
            return await self.payment_status(payment_hash)
        data = await _json(r, "phoenixd payinvoice")
        if data.get("paymentPreimage"):
            fee = data.get("routingFeeSat", 0)
            return Payment(
                "paid", payment_hash, fee_msat=int(fee) * 1000 if isinstance(fee, int) else 0
            )
        if data.get("reason"):
            return Payment("failed", payment_hash, reason=f"phoenixd: {str(data['reason'])[:200]}")
        return await self.payment_status(payment_hash)

    async def payment_status(self, payment_hash: str) -> Payment:
        r = await self._call("GET", f"/payments/outgoingbyhash/{payment_hash}")
        if r.status_code == 404:
            return Payment("failed", payment_hash, reason="phoenixd has no such payment")
        data = await _json(r, "phoenixd outgoing payment")
        if data.get("isPaid"):
            fees = data.get("fees", 0)  # msat
            return Payment("paid", payment_hash, fee_msat=int(fees) if isinstance(fees, int) else 0)
        if data.get("completedAt") and not data.get("isPaid"):
            return Payment("failed", payment_hash, reason="phoenixd: payment failed")
        return Payment("pending", payment_hash)

    async def balance_msat(self) -> int:
        data = await _json(await self._call("GET", "/getbalance"), "phoenixd getbalance")
        return int(data["balanceSat"]) * 1000

    async def close(self) -> None:
        await self.client.aclose()


def lnd_client(tls_cert: str) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if tls_cert:
        verify = ssl.create_default_context(cafile=tls_cert)
        verify.check_hostname = False  # LND's self-signed certificate names "localhost"
    return httpx.AsyncClient(timeout=TIMEOUT, verify=verify)


@attrs.define(eq=False)
class LndRest:
    """LND's REST API: the macaroon (hex) in ``Grpc-Metadata-macaroon``, its TLS cert pinned."""

    url: str
    macaroon: str = attrs.field(repr=False)
    client: httpx.AsyncClient
    network: str = "bitcoin"
    name: str = "lnd"
    pay_timeout: float = 90.0

    def _headers(self) -> dict[str, str]:
        return {"Grpc-Metadata-macaroon": self.macaroon}

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with map_exceptions("LND"):
            return await self.client.request(
                method, f"{self.url}{path}", headers=self._headers(), **kwargs
            )

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Invoice:
        r = await self._call(
            "POST",
            "/v1/invoices",
            json={"value_msat": str(amount_msat), "memo": memo, "expiry": str(expiry)},
        )
        data = await _json(r, "LND add invoice")
        pr = str(data["payment_request"])
        self.network = _network_of(pr)
        payment_hash = base64.b64decode(data["r_hash"]).hex()
        return Invoice(payment_hash, pr, amount_msat, time.time() + expiry)

    async def invoice_status(self, payment_hash: str) -> InvoiceStatus:
        r = await self._call("GET", f"/v1/invoice/{payment_hash}")
        if r.status_code == 404:
            return InvoiceStatus("expired")
        data = await _json(r, "LND lookup invoice")
        state = data.get("state")
        if state == "SETTLED":
            return InvoiceStatus("paid", int(data.get("amt_paid_msat", 0)) or None)
        if state == "CANCELED":
            return InvoiceStatus("expired")
        return InvoiceStatus("pending")

    def _payment_from(self, payment_hash: str, lines: list[str]) -> Payment:
        last: dict[str, Any] = {}
        for line in lines:
            if line.strip():
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                last = data.get("result", data) if isinstance(data, dict) else {}
        status = last.get("status")
        if status == "SUCCEEDED":
            return Payment("paid", payment_hash, fee_msat=int(last.get("fee_msat", 0) or 0))
        if status == "FAILED":
            return Payment(
                "failed", payment_hash, reason=f"LND: {last.get('failure_reason', 'failed')}"
            )
        return Payment("pending", payment_hash)

    async def pay_invoice(self, bolt11_invoice: str, max_fee_msat: int) -> Payment:
        payment_hash = str(bolt11.decode(bolt11_invoice).payment_hash)
        body = {
            "payment_request": bolt11_invoice,
            "fee_limit_msat": str(max_fee_msat),
            "timeout_seconds": 60,
            "no_inflight_updates": True,
        }
        with map_exceptions("LND send"):
            async with self.client.stream(
                "POST",
                f"{self.url}/v2/router/send",
                json=body,
                headers=self._headers(),
                timeout=httpx.Timeout(self.pay_timeout, connect=10.0),
            ) as r:
                if r.status_code in DEFINITE:
                    return Payment(
                        "failed", payment_hash, reason=f"LND refused: HTTP {r.status_code}"
                    )
                if r.status_code >= 400:
                    raise LightningError(f"LND send: HTTP {r.status_code}")
                lines = await _last_lines(r, "LND send")
        return self._payment_from(payment_hash, lines)

    async def payment_status(self, payment_hash: str) -> Payment:
        with map_exceptions("LND track"):
            async with self.client.stream(
                "GET",
                f"{self.url}/v2/router/track/{payment_hash}",
                params={"no_inflight_updates": "true"},
                headers=self._headers(),
            ) as r:
                if r.status_code == 404:
                    return Payment("failed", payment_hash, reason="LND has no such payment")
                if r.status_code >= 400:
                    raise LightningError(f"LND track: HTTP {r.status_code}")
                lines = await _last_lines(r, "LND track", until=('"SUCCEEDED"', '"FAILED"'))
        return self._payment_from(payment_hash, lines)

    async def balance_msat(self) -> int:
        data = await _json(await self._call("GET", "/v1/balance/channels"), "LND channel balance")
        local = data.get("local_balance") or {}
        return int(local.get("msat", 0))

    async def close(self) -> None:
        await self.client.aclose()


async def _last_lines(
    response: httpx.Response, what: str, until: tuple[str, ...] = ()
) -> list[str]:
    """The last lines of LND's streamed updates (its final update is what counts),
    bounded: a line past ``LND_MAX_LINE`` is the backend's error, and however many lines
    it streams, only the last ``LND_KEPT_LINES`` are held. Stops after a line holding
    any of ``until``."""
    kept: collections.deque[str] = collections.deque(maxlen=LND_KEPT_LINES)
    try:
        async with contextlib.aclosing(read_lines(response, LND_MAX_LINE)) as lines:
            async for line in lines:
                kept.append(line)
                if any(word in line for word in until):
                    break
    except LineTooLong as exc:
        raise LightningError(f"{what}: {exc}") from None
    return list(kept)
