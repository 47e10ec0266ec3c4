"""Lightning with the dev wallet: top-ups credited once, payouts to Lightning Addresses,
hostile LNURL servers, ambiguous payments reconciled by payment hash."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import bolt11
import pytest
import trio

from ledger import book
from routecat.api.admin import socket_path
from routecat.money.lightning.backend import Payment, check_invoice
from routecat.money.lightning.errors import InvoiceRejected, LightningError
from tests.clients import topup, wait_for
from tests.servers import assert_error, earn, ledger_ok, register, reopen, start_network


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "routecat", *args], capture_output=True, text=True, timeout=60
    )


async def test_dev_wallet_invoice_decodes(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, nodes=0, credit_sats=0)
        async with net.client() as c:
            before = time.time()
            body = await topup(c, 500)
        assert set(body) == {"invoice", "payment_hash", "amount_sats", "expires_at"}
        decoded = bolt11.decode(body["invoice"])
        assert body["invoice"].startswith("lnbcrt5u")
        assert decoded.amount_msat == 500_000
        assert decoded.payment_hash == body["payment_hash"]
        assert decoded.expiry == 600
        assert abs(decoded.date + 600 - (before + 600)) < 5
        assert body["expires_at"].endswith("Z")
        assert decoded.payee  # the signature recovers a node key
        check_invoice(body["invoice"], 500_000, "regtest")
        with pytest.raises(InvoiceRejected, match="network"):
            check_invoice(body["invoice"], 500_000, "bitcoin")
        with pytest.raises(InvoiceRejected, match="differs"):
            check_invoice(body["invoice"], 400_000, "regtest")


async def test_topup_paid_with_wallet_cli_credits_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        net = await start_network(nursery, tmp_path, nodes=0, credit_sats=0)
        db = net.gateway.config.database
        async with net.client() as c:
            body = await topup(c, 500)
            status = (await c.get(f"/v1/auth/topup/{body['payment_hash']}")).json()
            assert status["status"] == "pending"
            out = await trio.to_thread.run_sync(
                run_cli, "wallet", "pay", body["invoice"], "--database", db
            )
            assert out.returncode == 0, out.stderr
            await wait_for(lambda: net.gateway.gw.topups.credited == 1)
            assert (await c.get("/v1/auth/balance")).json()["balance_sats"] == 500
            assert (await c.get(f"/v1/auth/topup/{body['payment_hash']}")).json()[
                "status"
            ] == "paid"
            # Paying again, replaying the webhook, reconciling: nothing more is credited.
            out = await trio.to_thread.run_sync(
                run_cli, "wallet", "pay", body["invoice"], "--database", db
            )
            assert out.returncode == 1 and "already paid" in out.stderr
            for _ in range(3):
                assert (
                    await c.post(
                        "/v1/lightning/webhook", json={"payment_hash": body["payment_hash"]}
                    )
                ).status_code == 200
            out = await trio.to_thread.run_sync(run_cli, "lightning", "reconcile", "--database", db)
            assert out.returncode == 0, out.stderr
            assert (await c.get("/v1/auth/balance")).json()["balance_msat"] == 500_000
            # Another key cannot see this top-up.
            other = await register(c, "other")
            r = await c.get(
                f"/v1/auth/topup/{body['payment_hash']}",
                headers={"Authorization": f"Bearer {other}"},
            )
            assert_error(r, 404, "not_found")
            # Bounds and bad input.
            assert_error(
                await c.post("/v1/auth/topup", json={"amount_sats": 5}), 400, "invalid_request"
            )
            assert_error(
                await c.post("/v1/auth/topup", json={"amount_sats": 2_000_000}),
                400,
                "invalid_request",
            )
            assert_error(
                await c.post("/v1/auth/topup", json={"amount_sats": "500"}), 400, "invalid_request"
            )
            assert_error(await c.get("/v1/auth/topup/nothex"), 400, "invalid_request")
        await ledger_ok(net)


async def test_unpaid_invoice_never_credits_and_paid_late_still_credits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        net = await start_network(nursery, tmp_path, nodes=0, credit_sats=0, invoice_expiry="600")
        gw = net.gateway.gw
        async with net.client() as c:
            never = await topup(c, 100)
            late = await topup(c, 200)
            # Time passes beyond the expiry for the unpaid one.
            wallet = gw.lightning
            real = gw.clock.wall
            await wallet.settle_own(late["invoice"])  # type: ignore[attr-defined]
            gw.clock.wall = lambda: real() + 700
            await gw.topups.reconcile()
            assert (await c.get(f"/v1/auth/topup/{never['payment_hash']}")).json()[
                "status"
            ] == "expired"
            assert (await c.get(f"/v1/auth/topup/{late['payment_hash']}")).json()[
                "status"
            ] == "paid"
            assert (await c.get("/v1/auth/balance")).json()["balance_sats"] == 200


async def test_pending_invoice_paid_while_gateway_down_is_credited_on_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from tests.servers import network_config, start_gateway

    with trio.fail_after(40):
        net = await start_network(nursery, tmp_path, nodes=0, credit_sats=0)
        async with net.client() as c:
            body = await topup(c, 300)
        net.gateway.stop.set()
        await wait_for(lambda: not Path(socket_path(net.gateway.config)).exists(), timeout=10)
        # The payer's wallet pays while the gateway is down (the dev wallet's state is in the DB).
        from routecat.clock import Clock
        from routecat.money.lightning.devwallet import DevWallet

        store = reopen(net.gateway.config.database)
        await DevWallet(store, Clock()).settle_own(body["invoice"])
        store.close()
        again = await start_gateway(
            nursery, network_config(tmp_path, database=net.gateway.config.database)
        )
        async with again.client(headers={"Authorization": f"Bearer {net.key}"}) as c:
            assert (await c.get("/v1/auth/balance")).json()["balance_sats"] == 300


async def test_payout_reaches_lightning_address_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net, lnurl = await earn(nursery, tmp_path, payout_interval="3600")
        gw = net.gateway.gw
        node_id = net.nodes[0].id
        earned = await gw.earnings.of(node_id)
        assert earned["payable_msat"] >= 100_000
        await gw.payouts.cycle()
        assert len(lnurl.invoices) == 1
        pr, asked = lnurl.invoices[0]
        # Whole sats, to the msat; the remainder stays as earnings.
        assert asked == earned["payable_msat"] // 1000 * 1000
        assert bolt11.decode(pr).amount_msat == asked
        payouts = await gw.payouts.list()
        assert [p.state for p in payouts] == ["paid"]
        after = await gw.earnings.of(node_id)
        assert after["payable_msat"] == earned["payable_msat"] % 1000
        assert after["paid_msat"] == asked
        # A second attempt for the same earnings pays nothing.
        await gw.payouts.cycle()
        await gw.payouts.cycle()
        assert len(lnurl.invoices) == 1
        balance, _ = await gw.store.read(lambda db: book.balance(db, book.LIGHTNING_OUT))
        assert balance == asked
        await ledger_ok(net)
        # The provider's agent hears about it.
        await wait_for(
            lambda: (
                net.nodes[0].agent.earnings is not None
                and net.nodes[0].agent.earnings.paid_msat == asked
            ),
            timeout=10,
        )
        out = await trio.to_thread.run_sync(
            run_cli, "payouts", "list", "--database", net.gateway.config.database
        )
        assert "paid" in out.stdout and "alice@provider.example" in out.stdout


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("wrong_amount", "differs from"),
        ("amountless", "no amount"),
        ("error", "this wallet is closed"),
        ("private_callback", "non-public address"),
        ("slow", "did not answer"),
        ("mainnet", "network"),
        ("expired", "expired"),
        ("odd_port", "malformed URL"),
        ("deep_json", "did not answer JSON"),
        ("huge", "response too large"),
        ("not_json", "did not answer JSON"),
        ("redirect_private", "HTTP 302"),
        ("bad_numbers", "malformed LNURL-pay response"),
    ],
)
async def test_hostile_lnurl_servers_get_nothing(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, message: str
) -> None:
    caplog.set_level(logging.WARNING, logger="routecat.lightning")
    with trio.fail_after(60):
        net, _lnurl = await earn(nursery, tmp_path, mode, payout_interval="3600")
        gw = net.gateway.gw
        gw.payouts.resolver.timeout = 1.0
        before = await gw.earnings.of(net.nodes[0].id)
        await gw.payouts.cycle()
        after = await gw.earnings.of(net.nodes[0].id)
        assert after["payable_msat"] == before["payable_msat"]  # funds held
        assert after["paid_msat"] == after["pending_msat"] == 0
        assert await gw.lightning.payment_status("0" * 64) == Payment(
            "failed", "0" * 64, reason="no such payment"
        )
        assert any(
            message in r.getMessage() and "held" in r.getMessage() for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        # The payout is held with its reason, counted, and retried later; the worker and
        # the gateway go on.
        (hold,) = await gw.payouts.holds()
        assert hold.node_id == net.nodes[0].id and message in hold.reason
        assert hold.next_attempt_at > gw.clock.wall()
        async with net.gateway.client() as c:
            assert (await c.get("/healthz")).status_code == 200
            metrics = (await c.get("/metrics")).text
        assert 'routecat_payout_failures_total{stage="resolve"} 1.0' in metrics
        await gw.payouts.cycle()  # in backoff: not tried again at once
        assert len(await gw.payouts.holds()) == 1
        assert (await gw.payouts.holds())[0].failures == 1
        await ledger_ok(net)


@attrs.define(eq=False)
class TimesOutAfterPaying:
    """A backend whose pay call times out although the payment went through."""

    inner: Any
    pays: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def pay_invoice(self, pr: str, max_fee_msat: int) -> Payment:
        self.pays += 1
        await self.inner.pay_invoice(pr, max_fee_msat)
        raise LightningError("timed out waiting for the node")


async def test_ambiguous_payment_is_reconciled_not_repeated(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        net, lnurl = await earn(nursery, tmp_path, payout_interval="3600")
        gw = net.gateway.gw
        flaky = TimesOutAfterPaying(gw.lightning)
        gw.payouts.backend = flaky
        await gw.payouts.cycle()
        payouts = await gw.payouts.list()
        assert [p.state for p in payouts] == ["pending"]
        earnings = await gw.earnings.of(net.nodes[0].id)
        assert earnings["pending_msat"] == payouts[0].amount_msat
        # Later cycles reconcile by payment hash: paid, and never paid a second time.
        await gw.payouts.cycle()
        await gw.payouts.cycle()
        assert [p.state for p in await gw.payouts.list()] == ["paid"]
        assert flaky.pays == 1
        assert len(lnurl.invoices) == 1
        await ledger_ok(net)


async def test_payouts_wait_when_the_wallet_is_short(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="routecat.lightning")
    with trio.fail_after(60):
        net, lnurl = await earn(nursery, tmp_path, payout_interval="3600")
        gw = net.gateway.gw
        # The operator's wallet is drained elsewhere.
        await gw.lightning.pay_invoice(lnurl.invoice(await gw.lightning.balance_msat()), 0)  # type: ignore[arg-type]
        assert await gw.lightning.balance_msat() == 0
        await gw.payouts.cycle()
        assert lnurl.invoices == []
        assert any("payouts that do not fit wait" in r.getMessage() for r in caplog.records)
        async with net.gateway.client() as c:
            metrics = (await c.get("/metrics")).text
        line = next(
            row for row in metrics.splitlines() if row.startswith("routecat_wallet_shortfall_msat ")
        )
        assert float(line.split()[1]) > 0


async def test_payout_worker_runs_by_itself(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net, lnurl = await earn(nursery, tmp_path)
        await wait_for(lambda: len(lnurl.invoices) == 1, timeout=10)
        await wait_for(lambda: net.gateway.gw.payouts.paid == 1, timeout=10)
