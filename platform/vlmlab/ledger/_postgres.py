"""A query ledger kept in PostgreSQL: one account book shared by several services.

:class:`JournaledLedger` keeps the book in memory and writes every change to
SQLite: exact for the one process that owns the file. An operator who runs
several services on one account book (two clusters, or the HTTP service of
each region, charging the same API keys) needs the book itself to be shared,
so :class:`PostgresLedger` holds no counts in memory at all: every call is one
PostgreSQL transaction, and the database is the book.

- **Exact across services.** ``reserve`` locks the key's account row, drops
  lapsed reservations, sums what is held and refuses or inserts the new
  reservation, all in one transaction: two services reserving on one key at
  once are serialized by that row lock, so together they never pass its
  budget. Tickets come from one sequence, so they are unique across services.
- **Before acknowledging.** A call returns only after its transaction
  committed; one that fails (the connection lost included) changed nothing.
- **Leases and orphans.** Time is the database server's clock, the one clock
  every service shares. A reservation with a lease lapses at its deadline. One
  without a lease belongs to the database connection that made it: when that
  connection is gone (its process died, or the ledger reconnected) and the
  reservation is older than ``orphan_ttl_s``, it is dropped and counted as
  ``expired``, like a reservation restored by :class:`JournaledLedger`.
- **Audit.** Every change is appended to an events table, with the service
  that made it; :meth:`PostgresLedger.events` reads it back.

Tables are created on first use (``ledger_accounts``, ``ledger_reservations``,
``ledger_events``); put them in their own schema with the URI's options
(``?options=-csearch_path%3Dvlmlab``). Needs ``psycopg`` (the ``postgres`` extra).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vlmlab.errors import BudgetExceededError
from vlmlab.ledger._book import DEFAULT_BUDGET_KEY, Reservation, Usage

POSTGRES_SCHEMES = ("postgresql", "postgres")

_SCHEMA_LOCK = 0x766C6D6C6162  # one advisory lock id: two services creating tables at once

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_accounts (
    key TEXT PRIMARY KEY,
    budget BIGINT,
    queries BIGINT NOT NULL DEFAULT 0,
    images_scored BIGINT NOT NULL DEFAULT 0,
    prompts_encoded BIGINT NOT NULL DEFAULT 0,
    wall_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    calls BIGINT NOT NULL DEFAULT 0,
    expired BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ledger_reservations (
    ticket BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL,
    queries BIGINT NOT NULL,
    holder INTEGER NOT NULL,
    made DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS ledger_reservations_key ON ledger_reservations (key);
CREATE TABLE IF NOT EXISTS ledger_events (
    seq BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    ticket BIGINT,
    queries BIGINT,
    detail TEXT,
    service TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_events_key ON ledger_events (key);
"""

_NOW = "extract(epoch from clock_timestamp())"

# Locks the account row (creating the account on first use) and returns it.
_LOCK_ACCOUNT = (
    "INSERT INTO ledger_accounts (key) VALUES (%(key)s) "
    "ON CONFLICT (key) DO UPDATE SET key = excluded.key "
    "RETURNING budget, queries, images_scored, prompts_encoded, wall_seconds, calls, expired"
)

# Drops the key's lapsed reservations: past their lease, or orphaned (no lease,
# older than the grace, and the connection that made them is gone).
_EXPIRE = f"""
DELETE FROM ledger_reservations
WHERE key = %(key)s AND (
    deadline <= {_NOW}
    OR (deadline IS NULL AND made <= {_NOW} - %(grace)s
        AND holder NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL))
)
RETURNING ticket, queries
"""

_EVENT = (
    f"INSERT INTO ledger_events (at, op, key, ticket, queries, detail, service) "
    f"VALUES ({_NOW}, %s, %s, %s, %s, %s, %s)"
)


def is_postgres_uri(value: object) -> bool:
    """Whether ``value`` names a PostgreSQL database (``postgresql://…``)."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in POSTGRES_SCHEMES


def redact_postgres_uri(uri: str) -> str:
    """``uri`` without its password, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class PostgresLedger:
    """The :class:`~vlmlab.oracle.Ledger` protocol on a PostgreSQL database (module docstring).

    Args:
        uri: a libpq URI, ``postgresql://user:password@host:port/database``.
        orphan_ttl_s: how long a reservation without a lease, whose connection is
            gone, waits for its commit or release.
        service: who this ledger is in the audit (default ``host:pid``).
        connect_timeout_s: how long opening a connection may take.
    """

    def __init__(
        self,
        uri: str,
        *,
        orphan_ttl_s: float = 600.0,
        service: str | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not is_postgres_uri(uri):
            raise ValueError(f"not a PostgreSQL URI (postgresql://...): {redact_postgres_uri(uri)}")
        if not orphan_ttl_s > 0:
            raise ValueError(f"orphan_ttl_s must be positive seconds, got {orphan_ttl_s!r}")
        try:
            import psycopg  # noqa: F401
        except ImportError as missing:
            raise ImportError(
                "a PostgreSQL ledger needs psycopg: pip install 'vlmlab[postgres]'"
            ) from missing
        self.uri = uri
        self.orphan_ttl_s = float(orphan_ttl_s)
        self.service = service or f"{socket.gethostname()}:{os.getpid()}"
        self._connect_timeout = max(1, round(connect_timeout_s))
        self._lock = threading.Lock()  # one connection, many threads
        self._connection: Any = None
        with self._transaction() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in filter(str.strip, _SCHEMA.split(";")):
                cursor.execute(statement)
            cursor.execute("SELECT count(*) FROM ledger_accounts")
            accounts = cursor.fetchone()[0]
            self._event(cursor, "restored", "*", None, None, {"accounts": accounts})

    def __repr__(self) -> str:
        return f"PostgresLedger({redact_postgres_uri(self.uri)!r}, service={self.service!r})"

    # ------------------------------------------------------------- plumbing
    def _connect(self) -> Any:
        import psycopg

        if self._connection is None or self._connection.closed or self._connection.broken:
            try:
                self._connection = psycopg.connect(
                    self.uri, autocommit=True, connect_timeout=self._connect_timeout
                )
            except psycopg.OperationalError as error:
                raise ConnectionError(
                    f"cannot reach the ledger database {redact_postgres_uri(self.uri)}: {error}"
                ) from None
        return self._connection

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor in one transaction, committed at the end, rolled back on error."""
        with self._lock:
            connection = self._connect()
            with connection.transaction(), connection.cursor() as cursor:
                yield cursor

    def _event(
        self,
        cursor: Any,
        op: str,
        key: str,
        ticket: int | None,
        queries: int | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        cursor.execute(
            _EVENT,
            (
                op,
                key,
                ticket,
                queries,
                None if detail is None else json.dumps(detail),
                self.service,
            ),
        )

    def _locked_account(self, cursor: Any, key: str, *, held: bool = True) -> dict[str, Any]:
        """The key's account row, locked for this transaction, lapsed reservations dropped.

        ``held=False`` skips summing the key's reservations (``reserved`` is then
        None): a commit or release needs the lock, not the sum."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"budget key must be a non-empty string, got {key!r}")
        cursor.execute(_LOCK_ACCOUNT, {"key": key})
        budget, queries, images, prompts, seconds, calls, expired = cursor.fetchone()
        cursor.execute(_EXPIRE, {"key": key, "grace": self.orphan_ttl_s})
        lapsed = cursor.fetchall()
        if lapsed:
            dropped = sum(q for _, q in lapsed)
            cursor.execute(
                "UPDATE ledger_accounts SET expired = expired + %s WHERE key = %s", (dropped, key)
            )
            expired += dropped
            for ticket, lapsed_queries in lapsed:
                self._event(cursor, "expire", key, ticket, lapsed_queries)
        reserved = None
        if held:
            cursor.execute(
                "SELECT coalesce(sum(queries), 0) FROM ledger_reservations WHERE key = %s", (key,)
            )
            reserved = int(cursor.fetchone()[0])
        return {
            "queries": queries,
            "images_scored": images,
            "prompts_encoded": prompts,
            "wall_seconds": seconds,
            "calls": calls,
            "reserved": reserved,
            "expired": expired,
            "budget": budget,
        }

    # --------------------------------------------------------------- writes
    def set_budget(self, key: str, max_queries: int | None) -> None:
        """Cap ``key`` at ``max_queries`` in total (``None`` removes the cap)."""
        if max_queries is not None and (not isinstance(max_queries, int) or max_queries < 0):
            raise ValueError(f"max_queries must be a non-negative int or None, got {max_queries!r}")
        with self._transaction() as cursor:
            self._locked_account(cursor, key, held=False)
            cursor.execute(
                "UPDATE ledger_accounts SET budget = %s WHERE key = %s", (max_queries, key)
            )
            self._event(cursor, "set_budget", key, None, max_queries)

    def reserve(self, key: str, queries: int, *, ttl: float | None = None) -> Reservation:
        """Hold ``queries`` on ``key`` or refuse the call whole (see ``QueryLedger.reserve``)."""
        if queries <= 0:
            raise ValueError(f"a call must request at least one query, got {queries}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"a reservation's ttl must be positive seconds, got {ttl!r}")
        with self._transaction() as cursor:
            account = self._locked_account(cursor, key)
            budget = account["budget"]
            held = account["queries"] + account["reserved"]
            if budget is not None and held + queries > budget:
                refusal = BudgetExceededError(key, queries, budget - held, budget)
            else:
                refusal = None
                cursor.execute(
                    "INSERT INTO ledger_reservations (key, queries, holder, made, deadline) "
                    f"VALUES (%s, %s, pg_backend_pid(), {_NOW}, {_NOW} + %s) RETURNING ticket",
                    (key, queries, ttl),
                )
                ticket = int(cursor.fetchone()[0])
                self._event(cursor, "reserve", key, ticket, queries)
        if refusal is not None:  # raised outside: the lapsed leases dropped above still commit
            raise refusal
        return Reservation(key, queries, ticket)

    def commit(
        self,
        reservation: Reservation,
        *,
        images_scored: int,
        prompts_encoded: int,
        wall_seconds: float,
    ) -> None:
        """Turn a reservation into spent queries and add the call's other counts."""
        key = reservation.key
        with self._transaction() as cursor:
            self._locked_account(cursor, key, held=False)  # first: a lapsed lease can't commit
            cursor.execute(
                "DELETE FROM ledger_reservations WHERE ticket = %s AND key = %s RETURNING queries",
                (reservation.ticket, key),
            )
            row = cursor.fetchone()
            if row is not None:
                cursor.execute(
                    "UPDATE ledger_accounts SET queries = queries + %s, "
                    "images_scored = images_scored + %s, prompts_encoded = prompts_encoded + %s, "
                    "wall_seconds = wall_seconds + %s, calls = calls + 1 WHERE key = %s",
                    (row[0], images_scored, prompts_encoded, wall_seconds, key),
                )
                counts = {
                    "images_scored": images_scored,
                    "prompts_encoded": prompts_encoded,
                    "wall_seconds": wall_seconds,
                }
                self._event(cursor, "commit", key, reservation.ticket, row[0], counts)
        if row is None:
            raise KeyError(
                f"reservation {reservation.ticket} is not held "
                "(committed twice, released, or its lease ran out)"
            )

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose work failed; nothing is counted."""
        with self._transaction() as cursor:
            self._locked_account(cursor, reservation.key, held=False)
            cursor.execute(
                "DELETE FROM ledger_reservations WHERE ticket = %s AND key = %s RETURNING queries",
                (reservation.ticket, reservation.key),
            )
            row = cursor.fetchone()
            if row is not None:
                self._event(cursor, "release", reservation.key, reservation.ticket, row[0])

    # ---------------------------------------------------------------- reads
    def account(self, key: str) -> dict[str, Any]:
        """One consistent view of ``key``: spent, held by calls in flight, expired, budget."""
        with self._transaction() as cursor:
            return self._locked_account(cursor, key)

    def budget(self, key: str) -> int | None:
        budget: int | None = self.account(key)["budget"]
        return budget

    def remaining(self, key: str) -> int | None:
        """Queries still available on ``key`` (``None`` when it has no budget)."""
        account = self.account(key)
        if account["budget"] is None:
            return None
        left: int = account["budget"] - account["queries"] - account["reserved"]
        return left

    def usage(self, key: str = DEFAULT_BUDGET_KEY) -> Usage:
        account = self.account(key)
        return Usage(**{name: account[name] for name in Usage.__dataclass_fields__})

    def keys(self) -> list[str]:
        with self._transaction() as cursor:
            cursor.execute("SELECT key FROM ledger_accounts ORDER BY key")
            return [key for (key,) in cursor.fetchall()]

    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        """The audit, oldest first: ``{at, op, key, ticket, queries, detail, service}`` each."""
        sql = "SELECT at, op, key, ticket, queries, detail, service FROM ledger_events"
        with self._transaction() as cursor:
            if key is None:
                cursor.execute(sql + " ORDER BY seq")
            else:
                cursor.execute(sql + " WHERE key = %s ORDER BY seq", (key,))
            rows = cursor.fetchall()
        return [
            {
                "at": at,
                "op": op,
                "key": k,
                "ticket": ticket,
                "queries": queries,
                "detail": None if detail is None else json.loads(detail),
                "service": service,
            }
            for at, op, k, ticket, queries, detail, service in rows
        ]

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
