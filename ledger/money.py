"""Exact money arithmetic: no float ever touches an amount.

Invariant: a job's cost is computed exactly (rational arithmetic on the decimal
prices and rate) and rounded up once, to whole msat; the provider's share is
``floor(cost * 95 / 100)`` and the fee is the rest, so the split always sums to the
cost.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

MSAT_PER_BTC = 100_000_000_000
SATS_PER_BTC = 100_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
PROVIDER_PERCENT = 95


def cost_msat(
    prompt_tokens: int,
    completion_tokens: int,
    input_usd_per_1m: Decimal,
    output_usd_per_1m: Decimal,
    btc_usd: Decimal,
) -> int:
    """ceil(exact cost in msat) of the tokens at these USD prices and this BTC/USD rate."""
    if btc_usd <= 0:
        raise ValueError("never price at a non-positive BTC/USD rate")
    usd = Fraction(prompt_tokens) * Fraction(input_usd_per_1m) + Fraction(
        completion_tokens
    ) * Fraction(output_usd_per_1m)
    exact = usd * MSAT_PER_BTC / (TOKENS_PER_PRICE_UNIT * Fraction(btc_usd))
    return math.ceil(exact)


def split(cost: int) -> tuple[int, int]:
    """(provider, fee) shares of a cost in msat."""
    provider = cost * PROVIDER_PERCENT // 100
    return provider, cost - provider


def usd_to_sats(usd: Decimal, btc_usd: Decimal) -> Decimal:
    return (usd * SATS_PER_BTC / btc_usd).quantize(Decimal("0.001"))
