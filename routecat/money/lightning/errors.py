"""The Lightning adapters' exceptions, and the one mapping of httpx's errors to them.

Tree::

    LightningError          a backend call without a definite answer (treat as pending,
    │                       reconcile later); the base of this package's errors
    ├── InvoiceRejected     an invoice fails a check (amount, network, expiry): never pay it
    └── LnurlError          a Lightning Address could not be resolved to an acceptable
                            invoice; nothing was paid

Every message is fit for a log line and the operator's payout list: it names what
failed and the error's type, never a URL, a key or a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx


class LightningError(Exception):
    """A backend call that did not give a definite answer (treat as pending)."""


class InvoiceRejected(LightningError):
    """An invoice we were asked to pay fails a check: never pay it."""


class LnurlError(LightningError):
    """The address could not be resolved to an acceptable invoice; nothing was paid."""


@contextlib.contextmanager
def map_exceptions(what: str, error: type[LightningError] = LightningError) -> Iterator[None]:
    """httpx's transport and protocol errors as ``error``, named by ``what`` and the
    error's type, never its text (which may hold a URL)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise error(f"{what}: {type(exc).__name__}") from None
