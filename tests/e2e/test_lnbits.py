"""Top-ups and payouts against a real LNbits (FakeWallet), started by the test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from ledger import book
from routecat.api.admin import socket_path
from tests.clients import chat, wait_for
from tests.e2e.lnbits import LNbits, Wallet
from tests.fakes import Knobs, start_engine
from tests.servers import (
    Network,
    catalog,
    ledger_ok,
    network_config,
    start_gateway,
    start_network,
    start_node,
)

pytestmark = pytest.mark.e2e


def lnbits_settings(lnbits: LNbits, wallet: Wallet) -> tuple[dict[str, str], dict[str, Any]]:
    environ = {
        "ROUTECAT_LNBITS_INVOICE_KEY": wallet.inkey,
        "ROUTECAT_LNBITS_ADMIN_KEY": wallet.adminkey,
    }
    return environ, {"lightning": "lnbits", "lnbits_url": lnbits.url}


async def balance_msat(net: Network) -> int:
    async with net.client() as c:
        return int((await c.get("/v1/auth/balance")).json()["balance_msat"])


async def test_topup_paid_from_a_customer_wallet_is_credited_once(
    nursery: trio.Nursery, tmp_path: Path, lnbits: LNbits
) -> None:
    gateway_wallet, customer = lnbits.wallet("gateway"), lnbits.wallet("customer")
    await trio.to_thread.run_sync(lnbits.fund, customer, 10_000)
    environ, settings = lnbits_settings(lnbits, gateway_wallet)
    with trio.fail_after(60):
        net = await start_network(
            nursery, tmp_path, nodes=0, credit_sats=0, environ=environ, **settings
        )
        async with net.client() as c:
            body = (await c.post("/v1/auth/topup", json={"amount_sats": 500})).json()
            never = (await c.post("/v1/auth/topup", json={"amount_sats": 100})).json()
            assert body["invoice"].startswith("lnbc5u")
            await trio.to_thread.run_sync(lnbits.pay, customer, body["invoice"])
            await wait_for(lambda: net.gateway.gw.topups.credited == 1, timeout=20)
            assert await balance_msat(net) == 500_000
            assert (await c.get(f"/v1/auth/topup/{body['payment_hash']}")).json()[
                "status"
            ] == "paid"
            # Replayed notifications (LNbits encodes its webhook body twice) credit nothing more.
            for _ in range(3):
                payload = json.dumps(
                    json.dumps({"payment_hash": body["payment_hash"], "amount": 500_000})
                )
                r = await c.post(
                    "/v1/lightning/webhook",
                    content=payload,
                    headers={"Content-Type": "application/json"},
                )
                assert r.status_code == 200
            await net.gateway.gw.topups.reconcile()
            assert await balance_msat(net) == 500_000
            # The invoice nobody paid is never credited.
            assert (await c.get(f"/v1/auth/topup/{never['payment_hash']}")).json()[
                "status"
            ] == "pending"
        assert await trio.to_thread.run_sync(lnbits.balance_msat, gateway_wallet) == 500_000
        await ledger_ok(net)


async def test_paid_while_the_gateway_was_down(
    nursery: trio.Nursery, tmp_path: Path, lnbits: LNbits
) -> None:
    gateway_wallet, customer = lnbits.wallet("gateway2"), lnbits.wallet("customer2")
    await trio.to_thread.run_sync(lnbits.fund, customer, 10_000)
    environ, settings = lnbits_settings(lnbits, gateway_wallet)
    with trio.fail_after(60):
        net = await start_network(
            nursery, tmp_path, nodes=0, credit_sats=0, environ=environ, **settings
        )
        async with net.client() as c:
            body = (await c.post("/v1/auth/topup", json={"amount_sats": 300})).json()
        net.gateway.stop.set()
        await wait_for(lambda: not Path(socket_path(net.gateway.config)).exists(), timeout=15)
        await trio.to_thread.run_sync(lnbits.pay, customer, body["invoice"])
        again = await start_gateway(
            nursery,
            network_config(tmp_path, environ, database=net.gateway.config.database, **settings),
        )
        async with again.client(headers={"Authorization": f"Bearer {net.key}"}) as c:
            assert (await c.get("/v1/auth/balance")).json()["balance_msat"] == 300_000
            assert (await c.get(f"/v1/auth/topup/{body['payment_hash']}")).json()[
                "status"
            ] == "paid"


async def test_provider_paid_to_its_lnbits_lightning_address(
    nursery: trio.Nursery, tmp_path: Path, lnbits: LNbits
) -> None:
    gateway_wallet, provider = lnbits.wallet("gateway3"), lnbits.wallet("provider")
    await trio.to_thread.run_sync(lnbits.fund, gateway_wallet, 50_000)
    environ, settings = lnbits_settings(lnbits, gateway_wallet)
    with trio.fail_after(90):
        net = await start_network(
            nursery,
            tmp_path,
            nodes=0,
            environ=environ,
            catalog=catalog(tmp_path),
            payout_threshold_sats="100",
            payout_interval="3600",
            free_daily_requests="0",
            lnurl_base_url_override=lnbits.url,
            lnurl_allow_private="true",
            **settings,
        )
        engine = await start_engine(nursery, Knobs())
        node = await start_node(
            nursery, net.url, engine, payout_address=f"{provider.address_name}@lnbits.test"
        )
        async with net.client() as c:
            for i in range(12):
                assert (
                    await c.post("/v1/chat/completions", json=chat(f"job {i}", max_tokens=2000))
                ).status_code == 200
        gw = net.gateway.gw
        earned = await gw.earnings.of(node.id)
        amount = earned["payable_msat"] // 1000 * 1000
        assert amount >= 100_000
        await gw.payouts.cycle()
        assert [p.state for p in await gw.payouts.list()] == ["paid"]
        assert await trio.to_thread.run_sync(lnbits.balance_msat, provider) == amount
        after = await gw.earnings.of(node.id)
        assert after["paid_msat"] == amount
        assert after["payable_msat"] == earned["payable_msat"] - amount
        # A second attempt for the same earnings pays nothing.
        await gw.payouts.cycle()
        assert await trio.to_thread.run_sync(lnbits.balance_msat, provider) == amount
        assert len(await gw.payouts.list()) == 1
        out, _ = await gw.store.read(lambda db: book.balance(db, book.LIGHTNING_OUT))
        assert out >= amount
        await ledger_ok(net)
