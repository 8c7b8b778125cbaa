"""A store in one SQLite file: budgets shared by the processes of one host.

Every operation is one short ``BEGIN IMMEDIATE`` transaction: SQLite lets a
single writer in at a time, so reservations from many threads and processes
are serialised by the database's own lock, and a process killed mid-way
leaves either its whole transaction or nothing. WAL mode lets those writers
commit without blocking on one another's readers, and ``busy_timeout`` makes
a writer wait its turn instead of failing while another one commits.

Only the standard library's ``sqlite3`` is needed. The file must be on a local
file system: SQLite's locks are not reliable over network shares.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Amounts, Limits

__all__ = ["SQLiteStore"]

# One row in ``spent`` per key doubles as the key's window record: its
# ``expire_at`` is the latest one any operation named (as MemoryStore keeps
# one expiry per key), and forgetting a window deletes the key's leases and
# markers along with it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spent (
    key           TEXT PRIMARY KEY,
    calls         INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd      REAL    NOT NULL DEFAULT 0.0,
    expire_at     REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS spent_expire_at ON spent (expire_at);
CREATE TABLE IF NOT EXISTS leases (
    key           TEXT    NOT NULL,
    lease_id      TEXT    NOT NULL,
    calls         INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd      REAL    NOT NULL,
    until         REAL    NOT NULL,
    PRIMARY KEY (key, lease_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS markers (
    key    TEXT NOT NULL,
    marker TEXT NOT NULL,
    PRIMARY KEY (key, marker)
) WITHOUT ROWID;
"""

#: how often (seconds, per store object) a reservation also deletes other keys' ended windows
SWEEP_SECONDS = 60.0

# Every window that ended by the caller's clock. A reservation forgets its own
# key's ended window every time, as MemoryStore does; the rest is only garbage,
# so it goes now and then rather than in every transaction.
_FORGET_ENDED = (
    "DELETE FROM leases WHERE key IN (SELECT key FROM spent WHERE expire_at < :now)",
    "DELETE FROM markers WHERE key IN (SELECT key FROM spent WHERE expire_at < :now)",
    "DELETE FROM spent WHERE expire_at < :now",
)
_FORGET_KEY = (
    "DELETE FROM leases WHERE key = ?",
    "DELETE FROM markers WHERE key = ?",
    "DELETE FROM spent WHERE key = ?",
)

_TOUCH = (
    "INSERT INTO spent (key, expire_at) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET expire_at = excluded.expire_at"
)

_ADD_SPENT = (
    "INSERT INTO spent (key, calls, input_tokens, output_tokens, cost_usd, expire_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET"
    " calls = calls + excluded.calls,"
    " input_tokens = input_tokens + excluded.input_tokens,"
    " output_tokens = output_tokens + excluded.output_tokens,"
    " cost_usd = cost_usd + excluded.cost_usd,"
    " expire_at = excluded.expire_at"
)

_SPENT = "SELECT calls, input_tokens, output_tokens, cost_usd, expire_at FROM spent WHERE key = ?"

_LEASED = (
    "SELECT coalesce(sum(calls), 0), coalesce(sum(input_tokens), 0),"
    " coalesce(sum(output_tokens), 0), coalesce(sum(cost_usd), 0.0)"
    " FROM leases WHERE key = ?"
)

# Connections a forked child inherited from its parent. SQLite forbids using
# them in the child, and closing one is a use too: the child's copy believes it
# holds the parent's locks, and a close may checkpoint and remove the WAL the
# parent still writes. So they stay referenced, never closed, in the child.
_inherited: list[sqlite3.Connection] = []


class SQLiteStore:
    """Budget totals in a SQLite file, shared by every process that opens it.

    Safe across threads (each thread has its own connection, opened on first
    use) and across processes, forked or spawned (a forked child opens its
    own). ``timeout`` is how long an operation waits for another writer before
    raising ``sqlite3.OperationalError``.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        path = os.fspath(path)
        if path in ("", ":memory:"):
            # each connection would get its own private database
            raise ValueError("SQLiteStore needs a file path, not an in-memory database")
        self.path = path
        self.timeout = timeout
        self.name = f"sqlite:{path}"
        self._local = threading.local()
        self._next_sweep = 0.0  # time.monotonic(): robust to callers' clocks jumping

    def reserve(
        self,
        key: str,
        ask: Amounts,
        limits: Limits,
        lease_id: str,
        lease_until: float,
        now: float,
        expire_at: float,
    ) -> tuple[bool, Amounts]:
        from . import Amounts

        db = self._connection()
        with _write(db):
            if self._sweep_due():
                for sql in _FORGET_ENDED:
                    db.execute(sql, {"now": now})
            spent = db.execute(_SPENT, (key,)).fetchone()
            if spent is not None and spent[4] < now:
                # the key's window has ended (a caller whose clock is ahead reuses it)
                for sql in _FORGET_KEY:
                    db.execute(sql, (key,))
                spent = None
            db.execute("DELETE FROM leases WHERE key = ? AND until <= ?", (key, now))
            calls, input_tokens, output_tokens, cost_usd = db.execute(_LEASED, (key,)).fetchone()
            leased = Amounts(calls, input_tokens, output_tokens, float(cost_usd))
            total = _amounts(spent) + leased
            db.execute(_TOUCH, (key, expire_at))
            if not limits.admits(total + ask):
                return False, total
            db.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, lease_id, *_row(ask), lease_until),
            )
            return True, total

    def settle(self, key: str, lease_id: str, actual: Amounts, expire_at: float) -> Amounts:
        db = self._connection()
        with _write(db):
            db.execute("DELETE FROM leases WHERE key = ? AND lease_id = ?", (key, lease_id))
            db.execute(_ADD_SPENT, (key, *_row(actual), expire_at))
            return _amounts(db.execute(_SPENT, (key,)).fetchone())

    def first(self, key: str, marker: str, expire_at: float) -> bool:
        db = self._connection()
        with _write(db):
            db.execute(_TOUCH, (key, expire_at))
            added = db.execute(
                "INSERT OR IGNORE INTO markers VALUES (?, ?)", (key, marker)
            ).rowcount
            return added == 1

    def close(self) -> None:
        """Close the calling thread's connection (others close as their threads end)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            del self._local.db
            db.close()

    def _sweep_due(self) -> bool:
        # threads racing here may both sweep once: harmless
        clock = time.monotonic()
        if clock < self._next_sweep:
            return False
        self._next_sweep = clock + SWEEP_SECONDS
        return True

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        pid = os.getpid()
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is not None and local.pid == pid:
            return db
        if db is not None:
            _inherited.append(db)
        # timeout= is SQLite's busy_timeout: wait for the write lock, don't fail.
        # isolation_level=None: no implicit transactions; each operation opens its own
        # BEGIN IMMEDIATE so the write lock is taken before anything is read
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            self._use_wal(db)
            # in WAL mode a commit survives a process crash without an fsync;
            # only a power loss can undo the last commits, never corrupt the file
            db.execute("PRAGMA synchronous = NORMAL")
            with _write(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except BaseException:
            db.close()
            raise
        local.db, local.pid = db, pid
        return db

    def _use_wal(self, db: sqlite3.Connection) -> None:
        # Switching a new file to WAL takes an exclusive lock without waiting on the
        # busy handler, so processes opening a new file together can see "database
        # is locked" here: retry until the timeout, as a busy handler would.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)


@contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction. The write lock is taken up front (BEGIN IMMEDIATE), so
    two writers never both read the totals and then both add to them."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    finally:
        # after any error, a failed COMMIT included, so the connection stays usable
        if db.in_transaction:
            db.execute("ROLLBACK")


def _amounts(spent: tuple[int, int, int, float, float] | None) -> Amounts:
    """The amounts of a row of ``spent`` (none if there is no row)."""
    from . import Amounts

    if spent is None:
        return Amounts()
    calls, input_tokens, output_tokens, cost_usd, _ = spent
    return Amounts(calls, input_tokens, output_tokens, float(cost_usd))


def _row(amounts: Amounts) -> tuple[int, int, int, float]:
    return (
        int(amounts.calls),
        int(amounts.input_tokens),
        int(amounts.output_tokens),
        float(amounts.cost_usd),
    )
