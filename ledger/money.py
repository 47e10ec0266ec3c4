"""Exact money arithmetic: no float ever touches an amount.

Invariant: a job's cost is computed exactly (rational arithmetic on the decimal
prices and rate) and rounded up once, to whole msat; the provider's share is
``floor(cost * 95 / 100)`` and the fee is the rest, so the split always sums to the
cost.
"""

from __future__ import annotations

from decimal import Decimal

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
    # Exact, in integers (each Decimal is a ratio of two): Fraction costs 20x more on
    # a path every request takes twice (admission and settlement).
    in_num, in_den = input_usd_per_1m.as_integer_ratio()
    out_num, out_den = output_usd_per_1m.as_integer_ratio()
    rate_num, rate_den = btc_usd.as_integer_ratio()
    num = (prompt_tokens * in_num * out_den + completion_tokens * out_num * in_den) * (
        MSAT_PER_BTC * rate_den
    )
    den = in_den * out_den * TOKENS_PER_PRICE_UNIT * rate_num
    return -(-num // den)  # the ceiling


def split(cost: int) -> tuple[int, int]:
    """(provider, fee) shares of a cost in msat."""
    provider = cost * PROVIDER_PERCENT // 100
    return provider, cost - provider


def usd_to_sats(usd: Decimal, btc_usd: Decimal) -> Decimal:
    return (usd * SATS_PER_BTC / btc_usd).quantize(Decimal("0.001"))
