"""The ledger's exceptions.

Tree::

    LedgerError
    ├── Unbalanced     a transaction whose postings do not sum to zero (a bug: never recorded)
    └── WrongDirection a job transaction that would not move money payer -> provider and
                       operator (a negative cost, a wrong account): never recorded
"""

from __future__ import annotations


class LedgerError(Exception):
    pass


class Unbalanced(LedgerError):
    pass


class WrongDirection(LedgerError):
    pass
