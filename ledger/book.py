"""The double-entry book: accounts, balanced transactions, reservations, holds.

Invariants owned here (``check`` proves them on demand):
- every transaction's postings sum to zero, so all accounts sum to zero at every commit;
- every account's ``balance_msat`` equals the sum of its postings;
- a transaction with a given idempotency key exists at most once (``UNIQUE``), so a
  settlement, credit or top-up replayed for any reason changes nothing;
- ``reserved_msat`` of an account equals the sum of its open reservations.

All amounts are integer millisatoshis. Functions here run inside a write transaction
of ``ledger.store.Store`` (they take the ``Connection`` of that
transaction); none of them commits.

Sign convention: a posting of +x raises the account's balance. A user's balance is
what the operator owes the user; a top-up posts +x to the user and -x to
``lightning:in`` (money that arrived over Lightning); spending posts -cost to the user
and +share to the provider and the fee account.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from ledger.errors import Unbalanced, WrongDirection
from ledger.money import split
from ledger.store import Connection, Migration, Row, one, rows

COMPONENT = "ledger"

# Well-known accounts.
OPERATOR_FEE = "operator:fee"
OPERATOR_EQUITY = "operator:equity"
SUBSIDY = "operator:subsidy"
LIGHTNING_IN = "lightning:in"
LIGHTNING_OUT = "lightning:out"
PAYOUTS_IN_FLIGHT = "payouts:in_flight"
ROUTING_FEES = "operator:routing_fees"

# The sign every kind of account keeps (``check`` proves it). A user may sit below zero
# by at most one admitted request (a response is never cut off): checked separately.
NON_NEGATIVE = ("provider:", OPERATOR_FEE, PAYOUTS_IN_FLIGHT, LIGHTNING_OUT)
NON_POSITIVE = (SUBSIDY, OPERATOR_EQUITY, LIGHTNING_IN, ROUTING_FEES)
JOB_PAYERS = ("user:", SUBSIDY)
JOB_PAYEES = ("provider:", OPERATOR_FEE)


def _is(account: str, kinds: Sequence[str]) -> bool:
    return any(account == k or (k.endswith(":") and account.startswith(k)) for k in kinds)


def user_account(key_id: int) -> str:
    return f"user:{key_id}"


def provider_account(node_id: str) -> str:
    return f"provider:{node_id}"


MIGRATIONS = (
    Migration(
        1,
        """
        CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            balance_msat INTEGER NOT NULL DEFAULT 0,
            reserved_msat INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        );
        CREATE TABLE transactions (
            id INTEGER PRIMARY KEY,
            idempotency_key TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            memo TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        );
        CREATE TABLE postings (
            id INTEGER PRIMARY KEY,
            tx_id INTEGER NOT NULL REFERENCES transactions (id),
            account TEXT NOT NULL REFERENCES accounts (id),
            amount_msat INTEGER NOT NULL
        );
        CREATE INDEX postings_account ON postings (account, tx_id);
        CREATE INDEX postings_tx ON postings (tx_id);
        CREATE TABLE reservations (
            id TEXT PRIMARY KEY,
            account TEXT NOT NULL REFERENCES accounts (id),
            amount_msat INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE holds (
            tx_id INTEGER NOT NULL REFERENCES transactions (id),
            account TEXT NOT NULL REFERENCES accounts (id),
            amount_msat INTEGER NOT NULL,
            release_at REAL NOT NULL
        );
        CREATE INDEX holds_account ON holds (account, release_at);
        """,
    ),
    Migration(
        2,
        """
        ALTER TABLE reservations ADD COLUMN holder TEXT NOT NULL DEFAULT '';
        """,
    ),
)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ensure_account(db: Connection, account: str) -> None:
    kind = account.split(":", 1)[0]
    db.execute(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?, ?, ?) ON CONFLICT(id) DO NOTHING",
        (account, kind, now_iso()),
    )


@attrs.frozen
class Posting:
    account: str
    amount_msat: int


def post(
    db: Connection,
    key: str,
    kind: str,
    postings: Sequence[Posting],
    memo: str = "",
) -> int | None:
    """Record one balanced transaction; None if ``key`` was already recorded."""
    if sum(p.amount_msat for p in postings) != 0:
        raise Unbalanced(f"transaction {key} does not balance: {postings}")
    if any(not isinstance(p.amount_msat, int) or isinstance(p.amount_msat, bool) for p in postings):
        raise TypeError("amounts must be integer msat")
    inserted = db.execute(
        "INSERT INTO transactions (idempotency_key, kind, memo, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(idempotency_key) DO NOTHING RETURNING id",
        (key, kind, memo, now_iso()),
    ).fetchone()
    if inserted is None:
        return None
    tx_id = int(inserted[0])
    for p in postings:
        if p.amount_msat == 0:
            continue
        ensure_account(db, p.account)
        db.execute(
            "INSERT INTO postings (tx_id, account, amount_msat) VALUES (?, ?, ?)",
            (tx_id, p.account, p.amount_msat),
        )
        db.execute(
            "UPDATE accounts SET balance_msat = balance_msat + ? WHERE id = ?",
            (p.amount_msat, p.account),
        )
    return tx_id


def post_job(
    db: Connection, key: str, payer: str, provider: str, cost_msat: int, memo: str = ""
) -> int | None:
    """Record one job's payment: ``cost_msat`` from the payer (a user or the subsidy) to
    the provider (95%) and the operator's fee account (the rest). The only way a job
    moves money; a negative cost or a wrong account raises ``WrongDirection``."""
    if isinstance(cost_msat, bool) or not isinstance(cost_msat, int) or cost_msat < 0:
        raise WrongDirection(f"job {key}: a cost must be a non-negative integer, got {cost_msat!r}")
    if not _is(payer, JOB_PAYERS) or not _is(provider, JOB_PAYEES):
        raise WrongDirection(f"job {key}: money moves from a user or the subsidy to a provider")
    share, fee = split(cost_msat)
    return post(
        db,
        key,
        "job",
        [Posting(payer, -cost_msat), Posting(provider, share), Posting(OPERATOR_FEE, fee)],
        memo=memo,
    )


def transaction_exists(db: Connection, key: str) -> bool:
    return one(db, "SELECT 1 FROM transactions WHERE idempotency_key = ?", (key,)) is not None


def balance(db: Connection, account: str) -> tuple[int, int]:
    """(balance, reserved) of an account; (0, 0) if it has never been used."""
    row = one(db, "SELECT balance_msat, reserved_msat FROM accounts WHERE id = ?", (account,))
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def reserve(
    db: Connection,
    reservation_id: str,
    account: str,
    amount_msat: int,
    now: float,
    holder: str = "",
) -> bool:
    """Reserve ``amount_msat`` if ``balance - reserved > 0`` (checked and taken atomically)."""
    if amount_msat < 0:
        raise ValueError("a reservation cannot be negative")
    ensure_account(db, account)
    cursor = db.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat + ?"
        " WHERE id = ? AND balance_msat - reserved_msat > 0",
        (amount_msat, account),
    )
    if cursor.rowcount == 0:
        return False
    _insert_reservation(db, reservation_id, account, amount_msat, now, holder)
    return True


def _insert_reservation(
    db: Connection, reservation_id: str, account: str, amount_msat: int, now: float, holder: str
) -> None:
    db.execute(
        "INSERT INTO reservations (id, account, amount_msat, created_at, holder)"
        " VALUES (?, ?, ?, ?, ?)",
        (reservation_id, account, amount_msat, now, holder),
    )


def reserve_unconditionally(
    db: Connection,
    reservation_id: str,
    account: str,
    amount_msat: int,
    now: float,
    holder: str = "",
) -> None:
    ensure_account(db, account)
    db.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat + ? WHERE id = ?", (amount_msat, account)
    )
    _insert_reservation(db, reservation_id, account, amount_msat, now, holder)


def release(db: Connection, reservation_id: str) -> int:
    """Release a reservation; idempotent. Returns the amount released (0 if none)."""
    row = one(db, "SELECT account, amount_msat FROM reservations WHERE id = ?", (reservation_id,))
    if row is None:
        return 0
    db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
    db.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?",
        (row["amount_msat"], row["account"]),
    )
    return int(row["amount_msat"])


def sweep_reservations(
    db: Connection, older_than: float, keep: Iterable[str] = (), spare: Iterable[str] = ()
) -> list[str]:
    """Release reservations created before ``older_than`` except those in ``keep``
    (jobs still running) and those whose holder is in ``spare`` (other live processes
    sharing the database: their jobs are theirs to settle). After a crash, with nothing
    kept or spared, it releases them all."""
    kept = set(keep)
    spared = set(spare)
    stale = [
        r["id"]
        for r in rows(db, "SELECT id, holder FROM reservations WHERE created_at < ?", (older_than,))
        if r["id"] not in kept and r["holder"] not in spared
    ]
    for reservation_id in stale:
        release(db, reservation_id)
    return stale


def hold(db: Connection, tx_id: int, account: str, amount_msat: int, release_at: float) -> None:
    """Mark part of an account's balance as not payable before ``release_at``."""
    db.execute(
        "INSERT INTO holds (tx_id, account, amount_msat, release_at) VALUES (?, ?, ?, ?)",
        (tx_id, account, amount_msat, release_at),
    )


def held(db: Connection, account: str, now: float) -> int:
    row = one(
        db,
        "SELECT COALESCE(SUM(amount_msat), 0) FROM holds WHERE account = ? AND release_at > ?",
        (account, now),
    )
    return int(row[0]) if row else 0


@attrs.frozen
class Check:
    accounts: int
    transactions: int
    postings: int
    total_msat: int
    mismatched_balances: list[tuple[str, int, int]]
    unbalanced_transactions: list[int]
    mismatched_reservations: list[tuple[str, int, int]]
    wrong_signs: list[tuple[str, int, str]] = attrs.Factory(list)
    wrong_jobs: list[tuple[int, str]] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return (
            self.total_msat == 0
            and not self.mismatched_balances
            and not self.unbalanced_transactions
            and not self.mismatched_reservations
            and not self.wrong_signs
            and not self.wrong_jobs
        )

    def problems(self) -> list[str]:
        """One line per broken invariant, for ``routecat ledger check``."""
        out = []
        if self.total_msat:
            out.append(f"all postings sum to {self.total_msat} msat, not 0")
        out += [f"{a}: balance {c} != postings {s}" for a, c, s in self.mismatched_balances]
        out += [f"transaction {tx} does not balance" for tx in self.unbalanced_transactions]
        out += [
            f"{a}: reserved {c} != reservations {s}" for a, c, s in self.mismatched_reservations
        ]
        out += [f"{a}: balance {b} msat, but {rule}" for a, b, rule in self.wrong_signs]
        out += [f"job transaction {tx}: {why}" for tx, why in self.wrong_jobs]
        return out


def _sign_problems(db: Connection) -> list[tuple[str, int, str]]:
    out: list[tuple[str, int, str]] = []
    for row in db.execute("SELECT id, balance_msat FROM accounts WHERE balance_msat != 0"):
        account, amount = str(row[0]), int(row[1])
        if amount < 0 and _is(account, NON_NEGATIVE):
            out.append((account, amount, "this kind of account never goes below zero"))
        elif amount > 0 and _is(account, NON_POSITIVE):
            out.append((account, amount, "this kind of account never goes above zero"))
    # A user may owe at most one admitted request: less than its largest job debit.
    for row in db.execute(
        "SELECT a.id, a.balance_msat, COALESCE(MAX(-p.amount_msat), 0) FROM accounts a"
        " LEFT JOIN postings p ON p.account = a.id AND p.amount_msat < 0"
        " AND p.tx_id IN (SELECT id FROM transactions WHERE kind = 'job')"
        " WHERE a.id LIKE 'user:%' AND a.balance_msat < 0 GROUP BY a.id"
    ):
        if -int(row[1]) >= int(row[2]):
            out.append(
                (str(row[0]), int(row[1]), "a user owes at most one request (its largest job)")
            )
    return out


def _job_problems(db: Connection) -> list[tuple[int, str]]:
    """Every job transaction moves money one way, payer -> provider and operator, and
    its provider share is ``floor(cost * 95%)`` of what the payer paid."""
    out: list[tuple[int, str]] = []
    postings: dict[int, list[tuple[str, int]]] = {}
    for row in db.execute(
        "SELECT p.tx_id, p.account, p.amount_msat FROM postings p"
        " JOIN transactions t ON t.id = p.tx_id WHERE t.kind = 'job' ORDER BY p.tx_id"
    ):
        postings.setdefault(int(row[0]), []).append((str(row[1]), int(row[2])))
    for tx, entries in postings.items():
        debits = [(a, -m) for a, m in entries if m < 0]
        credits = [(a, m) for a, m in entries if m > 0]
        if len(debits) != 1 or not _is(debits[0][0], JOB_PAYERS):
            out.append((tx, "not paid by exactly one user or the subsidy"))
            continue
        if not all(_is(a, JOB_PAYEES) for a, _ in credits):
            out.append((tx, "money went somewhere other than a provider and the operator fee"))
            continue
        cost = debits[0][1]
        share, fee = split(cost)
        to_fee = sum(m for a, m in credits if a == OPERATOR_FEE)
        to_providers = sum(m for a, m in credits if a != OPERATOR_FEE)
        if to_providers and to_providers != share:
            out.append((tx, f"provider got {to_providers} msat of a {cost} msat cost"))
        elif to_providers + to_fee != cost or (to_providers and to_fee != fee):
            out.append((tx, f"split {to_providers}+{to_fee} does not match the cost {cost}"))
    return out


def check(db: Connection) -> Check:
    """Prove the invariants from the raw postings (not from the cached balances): the
    zero sum, cached balances and reservations, each account kind's sign, and the
    direction and split of every job transaction."""
    mismatched = [
        (r[0], int(r[1]), int(r[2]))
        for r in db.execute(
            "SELECT a.id, a.balance_msat, COALESCE(SUM(p.amount_msat), 0)"
            " FROM accounts a LEFT JOIN postings p ON p.account = a.id"
            " GROUP BY a.id HAVING a.balance_msat != COALESCE(SUM(p.amount_msat), 0)"
        )
    ]
    unbalanced = [
        int(r[0])
        for r in db.execute(
            "SELECT tx_id FROM postings GROUP BY tx_id HAVING SUM(amount_msat) != 0"
        )
    ]
    reservations = [
        (r[0], int(r[1]), int(r[2]))
        for r in db.execute(
            "SELECT a.id, a.reserved_msat, COALESCE(SUM(r.amount_msat), 0)"
            " FROM accounts a LEFT JOIN reservations r ON r.account = a.id"
            " GROUP BY a.id HAVING a.reserved_msat != COALESCE(SUM(r.amount_msat), 0)"
        )
    ]
    total = db.execute("SELECT COALESCE(SUM(amount_msat), 0) FROM postings").fetchone()[0]
    counts = [
        db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("accounts", "transactions", "postings")
    ]
    return Check(
        counts[0],
        counts[1],
        counts[2],
        int(total),
        mismatched,
        unbalanced,
        reservations,
        _sign_problems(db),
        _job_problems(db),
    )


def history(db: Connection, account: str, limit: int = 100) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in rows(
            db,
            "SELECT t.id, t.created_at, t.kind, t.idempotency_key, t.memo, p.amount_msat"
            " FROM postings p JOIN transactions t ON t.id = p.tx_id"
            " WHERE p.account = ? ORDER BY t.id DESC LIMIT ?",
            (account, limit),
        )
    ]


def earned(db: Connection, account: str, kind: str) -> int:
    """The sum of an account's postings in transactions of one kind (e.g. ``job``)."""
    row = db.execute(
        "SELECT COALESCE(SUM(p.amount_msat), 0) FROM postings p JOIN transactions t"
        " ON t.id = p.tx_id WHERE p.account = ? AND t.kind = ?",
        (account, kind),
    ).fetchone()
    return int(row[0])


def accounts(db: Connection) -> list[Row]:
    return rows(db, "SELECT id, kind, balance_msat, reserved_msat FROM accounts ORDER BY id")
