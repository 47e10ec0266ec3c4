"""Build the configured Lightning backend (secrets come from the environment or a file)."""

from __future__ import annotations

from ledger.store import Storage
from routecat.clock import Clock
from routecat.config import Config
from routecat.errors import ConfigError
from routecat.money.lightning.backend import Backend
from routecat.money.lightning.devwallet import DevWallet
from routecat.money.lightning.remote import LNbits, LndRest, Phoenixd, lnd_client


def make_backend(config: Config, store: Storage, clock: Clock) -> Backend:
    kind = config.lightning
    if kind == "dev":
        return DevWallet(store, clock=clock)
    if kind == "lnbits":
        if not (config.lnbits_url and config.lnbits_invoice_key and config.lnbits_admin_key):
            raise ConfigError(
                "lnbits needs lnbits_url, and ROUTECAT_LNBITS_INVOICE_KEY and"
                " ROUTECAT_LNBITS_ADMIN_KEY (or their _FILE variants)"
            )
        webhook = (
            config.public_url.rstrip("/") + "/v1/lightning/webhook" if config.public_url else ""
        )
        return LNbits(
            config.lnbits_url.rstrip("/"),
            config.lnbits_invoice_key,
            config.lnbits_admin_key,
            webhook_url=webhook,
        )
    if kind == "phoenixd":
        if not (config.phoenixd_url and config.phoenixd_password):
            raise ConfigError("phoenixd needs phoenixd_url and ROUTECAT_PHOENIXD_PASSWORD(_FILE)")
        return Phoenixd(config.phoenixd_url.rstrip("/"), config.phoenixd_password)
    if kind == "lnd":
        if not (config.lnd_url and config.lnd_macaroon):
            raise ConfigError("lnd needs lnd_url and ROUTECAT_LND_MACAROON(_FILE) (hex)")
        return LndRest(
            config.lnd_url.rstrip("/"), config.lnd_macaroon, lnd_client(config.lnd_tls_cert)
        )
    raise ConfigError(f"unknown Lightning backend {kind!r}")
