"""The free tier's counters: requests used per key and UTC day, subsidy spent per day."""

from __future__ import annotations

from ledger.store import Connection


def free_used(db: Connection, key_id: int, day: str) -> int:
    row = db.execute(
        "SELECT used FROM free_usage WHERE key_id = ? AND day = ?", (key_id, day)
    ).fetchone()
    return int(row[0]) if row else 0


def take_free_request(db: Connection, key_id: int, day: str, job_id: str) -> None:
    """Count one of the key's free requests for ``day``, claimed by ``job_id`` until the
    job settles (so that whoever ends the job, even a sweeper after a crash, knows
    whose request to give back)."""
    db.execute(
        "INSERT INTO free_usage (key_id, day, used) VALUES (?, ?, 1)"
        " ON CONFLICT(key_id, day) DO UPDATE SET used = free_usage.used + 1",
        (key_id, day),
    )
    db.execute(
        "INSERT INTO free_claims (job_id, key_id, day) VALUES (?, ?, ?)", (job_id, key_id, day)
    )


def settle_claim(db: Connection, job_id: str, *, give_back: bool) -> bool:
    """End a free request's claim: the request stays used (the job was served) or is
    given back (it was not). False if the job held no claim (paid, or already settled)."""
    found = db.execute("SELECT key_id, day FROM free_claims WHERE job_id = ?", (job_id,)).fetchone()
    if found is None:
        return False
    db.execute("DELETE FROM free_claims WHERE job_id = ?", (job_id,))
    if give_back:
        give_back_free_request(db, int(found[0]), str(found[1]))
    return True


def give_back_free_request(db: Connection, key_id: int, day: str) -> None:
    db.execute(
        "UPDATE free_usage SET used = used - 1 WHERE key_id = ? AND day = ? AND used > 0",
        (key_id, day),
    )


def subsidy_spent(db: Connection, day: str) -> int:
    row = db.execute("SELECT spent_msat FROM subsidy_days WHERE day = ?", (day,)).fetchone()
    return int(row[0]) if row else 0


def add_subsidy_spent(db: Connection, day: str, amount_msat: int) -> None:
    db.execute(
        "INSERT INTO subsidy_days (day, spent_msat) VALUES (?, ?)"
        " ON CONFLICT(day) DO UPDATE SET spent_msat = subsidy_days.spent_msat + excluded.spent_msat",
        (day, amount_msat),
    )
