"""The SQLite store: one writer path, WAL, versioned migrations.

Invariant owned here: every write runs inside a ``BEGIN IMMEDIATE`` transaction on
the single writer connection, serialised by a ``CapacityLimiter(1)``; a write either
commits whole or leaves nothing. Reads use their own connection and, thanks to WAL,
never block the writer.

Group commit: writes that arrive while another batch is being committed wait in a
queue; the next writer to get the lock commits every queued write in one transaction,
each inside its own SAVEPOINT (so one failing write rolls back alone). Durability is
unchanged (``synchronous = FULL``: a write has returned only once its batch is on
disk), and the cost of an fsync is shared by every write of the batch.

SQLite calls are blocking, so they run in worker threads through an injectable
runner (tests under virtual time inject an inline one). A cancelled write still
completes in its thread (``abandon_on_cancel`` stays False): cancellation never
leaves a half-known commit behind.

Cancellation never leaves a write half-known: a write whose caller is cancelled
before a batch took it is removed from the queue and never commits; a write a batch
already took commits or fails with its batch, and only then does its caller get
``Cancelled`` (re-raised, never swallowed). A caller that must know the outcome of a
write it may be cancelled during shields it (admission does: ``routecat.completions``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs
import sqlite_utils
import trio

T = TypeVar("T")


class Row(Protocol):
    """A result row: by column name or position (``sqlite3.Row`` is one)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What a transaction function gets: one connection inside one open transaction.

    The whole storage interface of ``ledger`` and ``routecat.db`` is functions of a
    ``Connection`` run by a store (``Store.read``/``write``), so a second store over
    another database only has to supply a connection with ``execute``. The SQLite store
    passes a ``sqlite_utils.Database``.
    """

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...


class Storage(Protocol):
    """A database that runs transaction functions: ``Store`` (SQLite, one process) and
    ``ledger.postgres.PostgresStore`` (PostgreSQL, shared by replicas) implement it."""

    @property
    def path(self) -> str: ...

    async def write(self, fn: Callable[[Connection], T], /) -> T: ...

    async def read(self, fn: Callable[[Connection], T], /) -> T: ...

    def write_sync(self, fn: Callable[[Connection], T], /) -> T: ...

    def read_sync(self, fn: Callable[[Connection], T], /) -> T: ...

    def migrate(self, component: str, migrations: Sequence[Migration], /) -> int: ...

    def backup(self, target: str, /) -> None: ...

    def close(self) -> None: ...


class ThreadRunner(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def run_in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def run_inline(fn: Callable[[], T]) -> T:
    """Runs blocking work on the trio thread: only for tests under virtual time. Like a
    worker thread that is not abandoned, the work is done before any cancellation."""
    result = fn()
    await trio.lowlevel.cancel_shielded_checkpoint()
    return result


@attrs.define(eq=False)
class _Pending(Generic[T]):
    fn: Callable[[Connection], T]
    result: T | None = None
    error: BaseException | None = None
    done: bool = False
    taken: bool = False  # a batch has taken it: it will commit or fail with that batch
    finished: trio.Event = attrs.Factory(trio.Event)

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


@attrs.frozen
class Migration:
    """One schema step of one component; ``sql`` may hold several statements."""

    version: int
    sql: str


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@attrs.define(eq=False)
class Store:
    """A SQLite database file with one writer connection and one reader connection."""

    path: str
    _writer: sqlite3.Connection
    _reader: sqlite3.Connection
    _run: ThreadRunner = run_in_thread
    _peeker: sqlite3.Connection | None = None
    _write_lock: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    _read_lock: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    _queue: list[_Pending[Any]] = attrs.Factory(list)
    _wdb: sqlite_utils.Database = attrs.field(init=False)
    _rdb: sqlite_utils.Database = attrs.field(init=False)
    _pdb: sqlite_utils.Database = attrs.field(init=False)
    writes: int = 0
    batches: int = 0

    def __attrs_post_init__(self) -> None:
        self._wdb = sqlite_utils.Database(self._writer)
        self._rdb = (
            self._wdb if self._reader is self._writer else sqlite_utils.Database(self._reader)
        )
        self._pdb = sqlite_utils.Database(self._peeker or self._writer)

    @classmethod
    def open(cls, path: str, *, runner: ThreadRunner = run_in_thread) -> Store:
        writer = _connect(path)
        mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and str(mode).lower() != "wal":
            raise RuntimeError(f"cannot enable WAL on {path} (journal_mode={mode})")
        writer.execute("PRAGMA synchronous = FULL")
        reader = writer if path == ":memory:" else _connect(path)
        peeker = None
        if path != ":memory:":
            peeker = _connect(path)
            peeker.execute("PRAGMA busy_timeout = 0")  # never waits: see ``peek``
        return cls(path, writer, reader, runner, peeker)

    def close(self) -> None:
        if self._reader is not self._writer:
            self._reader.close()
        if self._peeker is not None:
            self._peeker.close()
        self._writer.close()

    def peek(self, fn: Callable[[Connection], T]) -> T:
        """Run a read of a few rows by key on the calling thread (the event loop), in its
        own connection: with WAL a reader never waits for the writer, so this takes
        microseconds and saves a worker-thread round trip. It never waits for a lock
        either (``busy_timeout = 0``): on the rare ``SQLITE_BUSY`` (a WAL reset) it raises
        ``sqlite3.OperationalError`` and the caller reads through ``read`` instead. On
        ``:memory:`` (tests, one thread) it reads through the writer."""
        conn = self._peeker or self._writer
        if conn is self._writer and conn.in_transaction:
            raise sqlite3.OperationalError("the writer is in a transaction")
        conn.execute("BEGIN")
        try:
            return fn(self._pdb)
        finally:
            conn.execute("COMMIT")

    # -- synchronous API (used inside worker threads and by offline CLI commands) --

    def write_sync(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one IMMEDIATE transaction on the writer; commit or roll back whole.
        For offline commands only: in the gateway, writes go through ``write``."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._wdb)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.writes += 1
        return result

    def read_sync(self, fn: Callable[[Connection], T]) -> T:
        conn = self._reader
        conn.execute("BEGIN")
        try:
            return fn(self._rdb)
        finally:
            conn.execute("COMMIT")

    # -- trio API --

    async def write(self, fn: Callable[[Connection], T]) -> T:
        pending = _Pending(fn)
        self._queue.append(pending)
        try:
            async with self._write_lock:
                # Holding the lock, our write is either done or still in the queue.
                if not pending.done:
                    await self._commit_queue()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                while not pending.done and pending.taken:
                    # A batch holds it: let it commit or fail before we leave.
                    await pending.finished.wait()
            if not pending.done:
                self._queue.remove(pending)  # never committed, never will be
            raise
        return pending.outcome()

    async def _commit_queue(self) -> None:
        batch, self._queue = self._queue, []
        for taken in batch:
            taken.taken = True
            taken.finished = trio.Event()
        try:
            await self._run(lambda: self._commit_batch(batch))
        finally:
            if not any(taken.done for taken in batch):
                # Cancelled before the batch ran (e.g. waiting for a worker thread): the
                # writes go back to the head of the queue for the next holder of the lock.
                for taken in batch:
                    taken.taken = False
                self._queue[:0] = batch
            for taken in batch:
                taken.finished.set()

    def _commit_batch(self, batch: list[_Pending[Any]]) -> None:
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            for pending in batch:
                conn.execute("SAVEPOINT w")
                try:
                    pending.result = pending.fn(self._wdb)
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    pending.error = exc
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for pending in batch:
                pending.result, pending.error = None, exc
            raise
        finally:
            for pending in batch:
                pending.done = True
        self.writes += sum(1 for p in batch if p.error is None)
        self.batches += 1

    async def read(self, fn: Callable[[Connection], T]) -> T:
        if self._reader is self._writer:
            return await self.write(fn)
        async with self._read_lock:
            return await self._run(lambda: self.read_sync(fn))

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply the steps of ``component`` not yet applied; idempotent. Returns the version."""
        conn = self._writer
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT NOT NULL, version INTEGER NOT NULL,"
            " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),"
            " PRIMARY KEY (component, version))"
        )
        current = conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?",
            (component,),
        ).fetchone()[0]
        for step in sorted(migrations, key=lambda m: m.version):
            if step.version <= current:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(step.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (component, version) VALUES (?, ?)",
                    (component, step.version),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            current = step.version
        return int(current)

    def backup(self, target: str) -> None:
        """Online backup (SQLite's backup API): consistent even while the gateway writes."""
        dest = sqlite3.connect(target)
        try:
            self._writer.backup(dest)
        finally:
            dest.close()


def _statements(sql: str) -> list[str]:
    """Split a migration script into statements (complete_statement respects quotes)."""
    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]}")
    return out


def rows(db: Connection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    return list(db.execute(sql, params).fetchall())


def one(db: Connection, sql: str, params: Sequence[Any] = ()) -> Row | None:
    row: Row | None = db.execute(sql, params).fetchone()
    return row
