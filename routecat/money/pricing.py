"""Prices: the operator's catalog, in USD per 1M tokens, per model.

Invariant: every price is a finite, non-negative Decimal read once at start-up; a
model not in the catalog is priced at the catalog's default.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from routecat.config import Config
from routecat.errors import ConfigError


@attrs.frozen
class Price:
    input_usd_per_1m: Decimal
    output_usd_per_1m: Decimal
    max_tokens: int | None = None  # applied when a request gives none (else the default)
    max_output_tokens: int | None = None  # the ceiling on what a request may ask for


@attrs.frozen
class Catalog:
    models: dict[str, Price]
    default: Price

    def price(self, model: str) -> Price:
        return self.models.get(model, self.default)

    def listed(self, model: str) -> bool:
        return model in self.models


def _decimal(value: Any, where: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ConfigError(f"catalog: {where} is not a number") from exc
    if not result.is_finite() or result < 0:
        raise ConfigError(f"catalog: {where} must be a non-negative number")
    return result


def load_catalog(config: Config) -> Catalog:
    """The operator's catalog file, or the embedded one."""
    if config.catalog:
        text = Path(config.catalog).read_text(encoding="utf-8")
    else:
        text = resources.files("routecat").joinpath("catalog.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    models = {}
    for name, entry in (data.get("models") or {}).items():
        caps = {}
        for field in ("max_tokens", "max_output_tokens"):
            cap = entry.get(field)
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
                raise ConfigError(f"catalog: models.{name}.{field} must be a positive integer")
            caps[field] = cap
        models[name] = Price(
            _decimal(entry.get("input"), f"models.{name}.input"),
            _decimal(entry.get("output"), f"models.{name}.output"),
            caps["max_tokens"],
            caps["max_output_tokens"],
        )
    default = data.get("default") or {}
    return Catalog(
        models,
        Price(
            _decimal(default.get("input", config.default_input_usd_per_1m), "default.input"),
            _decimal(default.get("output", config.default_output_usd_per_1m), "default.output"),
        ),
    )


# -- BTC/USD -----------------------------------------------------------------------------
