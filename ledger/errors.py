"""The ledger's exceptions.

Tree::

    LedgerError
    └── Unbalanced     a transaction whose postings do not sum to zero (a bug: never recorded)
"""

from __future__ import annotations


class LedgerError(Exception):
    pass


class Unbalanced(LedgerError):
    pass
