"""Everything that can change a balance or a payout: prices and rates, usage bounds,
keys, admission, settlement, earnings, and ``lightning/`` (top-ups and payouts)."""
