"""A query ledger whose every change is written to SQLite before it is acknowledged.

The in-memory :class:`QueryLedger` lives as long as its process: the pool's
ledger actor, as long as the Ray cluster. An API key's spent queries are
money, and a cluster is restarted for upgrades, spot losses and ``ray down``,
so :class:`JournaledLedger` keeps the account book in a SQLite database (WAL
mode) at a path of the operator's choosing:

- **Before acknowledging.** ``set_budget``, ``reserve``, ``commit`` and
  ``release`` each change the memory state and write the same change in one
  SQLite transaction before they return; a failed write undoes the change in
  memory and raises. Writes are deltas per ticket and per account, so the
  database always holds what the memory held after the last acknowledged call.
- **Restart.** Opening the file restores every account (budget, spent
  queries, images, prompts, wall time, calls, expired) and every open
  reservation. A reservation keeps its lease (stored as wall-clock time); one
  without a lease, whose holder may have died with the old process, gets
  ``orphan_ttl_s`` to be committed or released, then is dropped and counted
  as ``expired``. Tickets continue after the largest one ever issued, so a
  client that survived the restart can still commit its reservation, and no
  ticket is issued twice.
- **Audit.** Every change is also appended to an ``events`` table;
  :meth:`JournaledLedger.events` reads it back (what ``ledger.json`` reports is
  then a query over it).
- **Durability.** ``synchronous="normal"`` (default) survives a killed process
  (SIGKILL included: the write-ahead log is in the OS's hands once a call
  returns); ``"full"`` also survives an OS crash or power loss, at an fsync a
  call (BENCHMARKS.md has both latencies).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from vlmlab.ledger._book import QueryLedger, Reservation

Synchronous = Literal["normal", "full"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    key TEXT PRIMARY KEY,
    budget INTEGER,
    queries INTEGER NOT NULL DEFAULT 0,
    images_scored INTEGER NOT NULL DEFAULT 0,
    prompts_encoded INTEGER NOT NULL DEFAULT 0,
    wall_seconds REAL NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reservations (
    ticket INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    queries INTEGER NOT NULL,
    deadline REAL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    ticket INTEGER,
    queries INTEGER,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class JournaledLedger(QueryLedger):
    """:class:`QueryLedger` with every change journaled in SQLite (see the module docstring).

    Args:
        path: the database file (created with its folder); on the head node, or
            on storage that outlives it.
        orphan_ttl_s: how long a reservation without a lease, restored from an
            earlier process, waits for its commit or release.
        synchronous: ``normal`` or ``full`` (SQLite's ``PRAGMA synchronous``).
        clock: monotonic seconds, as :class:`QueryLedger`'s; ``wall``: wall-clock
            seconds, what leases are stored in.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        orphan_ttl_s: float = 600.0,
        synchronous: Synchronous = "normal",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if not orphan_ttl_s > 0:
            raise ValueError(f"orphan_ttl_s must be positive seconds, got {orphan_ttl_s!r}")
        super().__init__(clock)
        self._journaled = True
        self._db_lock = threading.Lock()  # one connection, many threads: innermost lock
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wall = wall
        self._journal_lock = threading.RLock()  # memory and database change together
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        self._restore(orphan_ttl_s)

    # ------------------------------------------------------------- restore
    def _restore(self, orphan_ttl_s: float) -> None:
        now_wall, now = self._wall(), self._clock()
        rows = self._db.execute(
            "SELECT key, budget, queries, images_scored, prompts_encoded, wall_seconds, calls, "
            "expired FROM accounts"
        ).fetchall()
        for key, budget, queries, images, prompts, seconds, calls, expired in rows:
            account = self._account(key)
            account.budget = budget
            usage = account.usage
            usage.queries, usage.images_scored, usage.prompts_encoded = queries, images, prompts
            usage.wall_seconds, usage.calls = seconds, calls
            account.expired = expired
        for ticket, key, queries, deadline in self._db.execute(
            "SELECT ticket, key, queries, deadline FROM reservations"
        ).fetchall():
            account = self._account(key)
            account.reserved[ticket] = queries
            left = orphan_ttl_s if deadline is None else deadline - now_wall
            account.leases[ticket] = now + left
        issued = self._db.execute("SELECT value FROM meta WHERE name = 'tickets'").fetchone()
        self._tickets = itertools.count(0 if issued is None else int(issued[0]))
        self._write(
            [("restored", "*", None, None, {"accounts": len(rows)})],
            [],
        )

    # -------------------------------------------------------------- writes
    def _write(
        self,
        events: list[tuple[str, str, int | None, int | None, dict[str, Any] | None]],
        statements: list[tuple[str, tuple[Any, ...]]],
    ) -> None:
        """One transaction: ``statements``, then ``events`` appended to the journal."""
        at = self._wall()
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, parameters in statements:
                    self._db.execute(sql, parameters)
                self._db.executemany(
                    "INSERT INTO events (at, op, key, ticket, queries, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            at,
                            op,
                            key,
                            ticket,
                            queries,
                            None if detail is None else json.dumps(detail),
                        )
                        for op, key, ticket, queries, detail in events
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @staticmethod
    def _ensure_account(key: str) -> tuple[str, tuple[Any, ...]]:
        return "INSERT OR IGNORE INTO accounts (key) VALUES (?)", (key,)

    def set_budget(self, key: str, max_queries: int | None) -> None:
        with self._journal_lock:
            before = self.budget(key)
            super().set_budget(key, max_queries)
            try:
                self._write(
                    [("set_budget", key, None, max_queries, None)],
                    [
                        self._ensure_account(key),
                        ("UPDATE accounts SET budget = ? WHERE key = ?", (max_queries, key)),
                    ],
                )
            except BaseException:
                super().set_budget(key, before)
                raise

    def reserve(self, key: str, queries: int, *, ttl: float | None = None) -> Reservation:
        with self._journal_lock:
            reservation = super().reserve(key, queries, ttl=ttl)
            deadline = None if ttl is None else self._wall() + ttl
            try:
                self._write(
                    [("reserve", key, reservation.ticket, queries, None)],
                    [
                        self._ensure_account(key),
                        (
                            "INSERT INTO reservations (ticket, key, queries, deadline) "
                            "VALUES (?, ?, ?, ?)",
                            (reservation.ticket, key, queries, deadline),
                        ),
                        (
                            "INSERT INTO meta (name, value) VALUES ('tickets', ?) "
                            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                            (reservation.ticket + 1,),
                        ),
                    ],
                )
            except BaseException:
                super().release(reservation)
                raise
            return reservation

    def commit(
        self,
        reservation: Reservation,
        *,
        images_scored: int,
        prompts_encoded: int,
        wall_seconds: float,
    ) -> None:
        with self._journal_lock:
            # Checked before the write: a commit the memory refuses (a lapsed lease)
            # must not reach the journal either.
            super().commit(
                reservation,
                images_scored=images_scored,
                prompts_encoded=prompts_encoded,
                wall_seconds=wall_seconds,
            )
            counts = {
                "images_scored": images_scored,
                "prompts_encoded": prompts_encoded,
                "wall_seconds": wall_seconds,
            }
            self._write(
                [("commit", reservation.key, reservation.ticket, reservation.queries, counts)],
                [
                    ("DELETE FROM reservations WHERE ticket = ?", (reservation.ticket,)),
                    (
                        "UPDATE accounts SET queries = queries + ?, images_scored = images_scored"
                        " + ?, prompts_encoded = prompts_encoded + ?, wall_seconds = "
                        "wall_seconds + ?, calls = calls + 1 WHERE key = ?",
                        (
                            reservation.queries,
                            images_scored,
                            prompts_encoded,
                            wall_seconds,
                            reservation.key,
                        ),
                    ),
                ],
            )

    def release(self, reservation: Reservation) -> None:
        with self._journal_lock:
            super().release(reservation)
            self._write(
                [("release", reservation.key, reservation.ticket, reservation.queries, None)],
                [("DELETE FROM reservations WHERE ticket = ?", (reservation.ticket,))],
            )

    def _account(self, key: str) -> Any:
        account = super()._account(key)
        if account.expired_tickets:  # leases that lapsed in memory: the same in the journal
            lapsed, account.expired_tickets = account.expired_tickets, []
            self._write(
                [("expire", key, ticket, queries, None) for ticket, queries in lapsed],
                [
                    *(("DELETE FROM reservations WHERE ticket = ?", (t,)) for t, _ in lapsed),
                    self._ensure_account(key),
                    (
                        "UPDATE accounts SET expired = expired + ? WHERE key = ?",
                        (sum(q for _, q in lapsed), key),
                    ),
                ],
            )
        return account

    # --------------------------------------------------------------- reads
    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        """The journal, oldest first: ``{at, op, key, ticket, queries, detail}`` each."""
        sql = "SELECT at, op, key, ticket, queries, detail FROM events"
        with self._db_lock:
            rows = self._db.execute(
                sql + (" WHERE key = ? ORDER BY seq" if key is not None else " ORDER BY seq"),
                (key,) if key is not None else (),
            ).fetchall()
        return [
            {
                "at": at,
                "op": op,
                "key": k,
                "ticket": ticket,
                "queries": queries,
                "detail": None if detail is None else json.loads(detail),
            }
            for at, op, k, ticket, queries, detail in rows
        ]

    def close(self) -> None:
        self._db.close()


def open_ledger(journal: str | Path | None, **options: Any) -> Any:
    """The ledger a journal names: ``None``, an in-memory :class:`QueryLedger`; a
    ``postgresql://`` URI, a :class:`~vlmlab.oracle.PostgresLedger` (one book for
    several services); any other string or path, a :class:`JournaledLedger` (SQLite)."""
    from vlmlab.ledger._postgres import PostgresLedger, is_postgres_uri

    if journal is None:
        return QueryLedger()
    if is_postgres_uri(journal):
        return PostgresLedger(str(journal), **options)
    return JournaledLedger(journal, **options)
