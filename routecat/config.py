"""Gateway configuration: one frozen value, resolved once at start-up.

Precedence is fixed: command-line flags > ``ROUTECAT_*`` environment > TOML file >
defaults. Secrets never come from a command-line value (``ps`` shows it to every
user): a field marked secret is read from the environment or from a file named by
``<FIELD>_FILE``.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import attrs

from owlrun.protocol import HEARTBEAT_INTERVAL_RANGE
from routecat.errors import ConfigError

ENV_PREFIX = "ROUTECAT_"


LogFormat = Literal["text", "json"]
RateMode = Literal["auto", "live"]
LightningKind = Literal["dev", "lnbits", "phoenixd", "lnd"]


def _secret(default: str = "") -> Any:
    return attrs.field(default=default, repr=False, metadata={"secret": True})


@attrs.frozen
class Config:
    """Every setting of a gateway process. Defaults are the documented ones (DESIGN.md section 7)."""

    # Process and HTTP surface.
    host: str = "127.0.0.1"
    port: int = 8080
    database: str = "routecat.db"
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    max_body_bytes: int = 8 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()
    public_url: str = ""  # shown in web pages; derived from the request when empty

    # Limits.
    rate_limit_per_minute: int = 60
    register_limit_per_hour: int = 5
    read_limit_per_minute: int = 600

    # Node network.
    heartbeat_interval: float = 10.0
    heartbeat_misses: int = 3
    queue_timeout: float = 30.0
    queue_max: int = 1000
    first_token_timeout: float = 120.0
    inter_token_timeout: float = 30.0
    keepalive_interval: float = 15.0
    drain_timeout: float = 30.0
    max_attempts: int = 3
    max_frame_bytes: int = 16 * 1024 * 1024
    default_max_tokens: int = 4096

    # Money.
    free_daily_requests: int = 10
    free_max_tokens: int = 1024
    free_daily_budget_sats: int = 10_000
    probation_days: float = 7.0
    catalog: str = ""  # path to a TOML price catalog; empty means the embedded one
    default_input_usd_per_1m: Decimal = Decimal("0.10")
    default_output_usd_per_1m: Decimal = Decimal("0.20")
    sweep_interval: float = 60.0  # how often stale reservations are released
    btc_usd: Decimal | None = None  # a pinned rate; None means live sources
    rate_mode: RateMode = (
        "auto"  # auto: the dev wallet pins a documented constant; live: always sources
    )
    rate_refresh: float = 300.0
    rate_max_age: float = 1800.0
    rate_sources: tuple[str, ...] = ("coinbase", "kraken", "bitstamp", "coingecko", "mempool")
    rate_urls: tuple[str, ...] = ()  # "source=url" overrides, e.g. for a proxy or tests

    # Lightning.
    lightning: LightningKind = "dev"
    lnbits_url: str = ""
    lnbits_invoice_key: str = _secret()
    lnbits_admin_key: str = _secret()
    phoenixd_url: str = ""
    phoenixd_password: str = _secret()
    lnd_url: str = ""
    lnd_macaroon: str = _secret()
    lnd_tls_cert: str = ""
    topup_min_sats: int = 10
    topup_max_sats: int = 1_000_000
    invoice_expiry: int = 600
    payout_threshold_sats: int = 1000
    payout_min_threshold_sats: int = 100
    payout_max_threshold_sats: int = 1_000_000
    payout_interval: float = 30.0
    lnurl_allow_private: bool = False
    lnurl_base_url_override: str = ""

    # Admin endpoint (loopback only, token in a 0600 file next to the database).
    admin: bool = True
    # Stock Go Owlrun agents (docs/providers.md): off unless the operator turns it on.
    owlrun_compat: bool = False
    compat_concurrency: int = 1  # jobs at once on one stock agent (it runs all it accepts)
    compat_fetch_timeout: float = 10.0  # an accepted job not fetched by then fails over
    # Replicas on one PostgreSQL database (docs/scaling.md).
    cluster_interval: float = 2.0  # how often a replica beats and reads the others
    replica_liveness: float = 10.0  # silent this long: a replica is dead to the others
    advertise_url: str = ""  # how other replicas reach this one; empty: the bound URL
    cluster_secret: str = _secret()  # authenticates forwarded jobs between replicas
    # The operator's Unix socket; empty: next to a SQLite file, or one per database URL in
    # the temporary directory with PostgreSQL (give each replica on one host its own).
    admin_socket: str = ""

    def payout_threshold(self, wanted: int | None) -> int:
        """A provider's payout threshold in sats: what it asked for (or the default),
        clamped to the operator's bounds."""
        chosen = wanted or self.payout_threshold_sats
        return min(max(chosen, self.payout_min_threshold_sats), self.payout_max_threshold_sats)


_FIELD_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(typing.get_type_hints(Config))
    return _FIELD_TYPES


def _convert(name: str, kind: Any, raw: Any) -> Any:
    """Turn a TOML value or an environment string into the field's type, or fail naming it."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if raw is None or raw == "":
            return None
        inner = next(a for a in typing.get_args(kind) if a is not type(None))
        return _convert(name, inner, raw)
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            raise ConfigError(
                f"setting {name!r}: {raw!r} is not one of {', '.join(map(str, choices))}"
            )
        return raw
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, (bool, float)):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if kind is Decimal:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = Decimal(str(raw))
            if not value.is_finite():
                raise ValueError(raw)
            return value
        if kind is str:
            if not isinstance(raw, str):
                raise ValueError(raw)
            return raw
        if origin is tuple:
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            if isinstance(raw, list) and all(isinstance(p, str) for p in raw):
                return tuple(raw)
            raise ValueError(raw)
    except (ValueError, ArithmeticError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {raw!r} as {kind}") from exc
    raise ConfigError(f"setting {name!r}: unsupported type {kind}")


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Resolve the configuration. ``flags`` holds only the options given on the command line."""
    environ = os.environ if environ is None else environ
    kinds = _field_types()
    secret_names = {f.name for f in attrs.fields(Config) if f.metadata.get("secret")}
    values: dict[str, Any] = {}

    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        section = data.get("routecat", data)
        for key, raw in section.items():
            name = key.replace("-", "_")
            if name not in kinds:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[name] = _convert(name, kinds[name], raw)

    for name, kind in kinds.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _convert(name, kind, environ[env_name])
        if name in secret_names and env_name + "_FILE" in environ:
            file_path = environ[env_name + "_FILE"]
            try:
                values[name] = Path(file_path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read {env_name}_FILE {file_path}: {exc}") from exc

    for name, raw in (flags or {}).items():
        if name in secret_names:
            raise ConfigError(f"{name} is a secret: set it in the environment or a file")
        values[name] = _convert(name, kinds[name], raw)

    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    if not 0 <= config.port <= 65535:
        raise ConfigError("port must be between 0 and 65535")
    if config.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes must be at least 1024")
    low, high = HEARTBEAT_INTERVAL_RANGE  # what an agent accepts in its welcome
    if not low <= config.heartbeat_interval <= high:
        raise ConfigError(f"heartbeat_interval must be between {low:g} and {high:g} seconds")
    if config.heartbeat_misses < 1:
        raise ConfigError("heartbeat_misses must be at least 1")
    if config.btc_usd is not None and config.btc_usd <= 0:
        raise ConfigError("btc_usd must be positive")
    if not (
        config.payout_min_threshold_sats
        <= config.payout_threshold_sats
        <= config.payout_max_threshold_sats
    ):
        raise ConfigError("payout_threshold_sats must lie within the operator bounds")
    if config.compat_concurrency < 1 or config.compat_fetch_timeout <= 0:
        raise ConfigError("compat_concurrency must be at least 1, compat_fetch_timeout positive")
    for name in ("rate_limit_per_minute", "register_limit_per_hour", "free_daily_requests"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative")
