"""Lightning: one backend interface (dev wallet, LNbits, phoenixd, LND REST), top-ups
credited exactly once per payment hash, and automatic provider payouts to Lightning
Addresses. See ``docs/lightning.md``."""
