"""The query ledger: what each budget key has spent, and the budgets that cap it.

Counting protocol (exact under threads, and under Ray replicas through the pool's ledger actor):

1. ``reserve(key, queries)`` before any work. It refuses the call whole, with
   :class:`~vlmlab.errors.BudgetExceededError`, when spent + reserved +
   requested would exceed the key's budget.
2. ``commit(reservation, ...)`` after the work succeeded: the reserved queries
   become spent, and images scored, prompts encoded and wall time are added.
3. ``release(reservation)`` when the work failed: the reservation is dropped
   and nothing is counted.

A reservation may carry a lease (``reserve(..., ttl=seconds)``): when the lease
runs out before ``commit`` or ``release``, the ledger drops the reservation
itself. A caller that enforces a deadline on its call (the HTTP gateway does)
takes a lease a little longer than that deadline, so no reservation outlives
its call even when the caller's process dies between reserve and commit.
Without a lease a reservation is held until it is committed or released (the
pool's trials show the reservations of calls that died in flight that way).

One query is one candidate prompt scored on one batch of images.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from vlmlab.errors import BudgetExceededError

DEFAULT_BUDGET_KEY = "default"


@dataclass
class Usage:
    """What one budget key has spent so far."""

    queries: int = 0
    images_scored: int = 0
    prompts_encoded: int = 0
    wall_seconds: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class Reservation:
    """Queries held for one call between ``reserve`` and ``commit``/``release``."""

    key: str
    queries: int
    ticket: int


@dataclass
class _Account:
    usage: Usage = field(default_factory=Usage)
    budget: int | None = None
    reserved: dict[int, int] = field(default_factory=dict)
    leases: dict[int, float] = field(default_factory=dict)
    """Ticket -> the clock time its reservation lapses (only reservations with a ttl)."""
    expired: int = 0
    """Queries of reservations whose lease ran out (neither committed nor released)."""
    expired_tickets: list[tuple[int, int]] = field(default_factory=list)
    """``(ticket, queries)`` of lapsed leases not yet written to a journal (if any)."""

    @property
    def held(self) -> int:
        return self.usage.queries + sum(self.reserved.values())

    def expire(self, now: float, *, journaled: bool = False) -> None:
        lapsed = [ticket for ticket, until in self.leases.items() if until <= now]
        for ticket in lapsed:
            del self.leases[ticket]
            queries = self.reserved.pop(ticket, 0)
            self.expired += queries
            if journaled:
                self.expired_tickets.append((ticket, queries))


class Ledger(Protocol):
    """What an oracle's ledger offers (in-process :class:`QueryLedger`, or the pool's
    ledger actor through ``vlmlab.pool.RemoteLedger``): budgets and counts by key.

    Invariants: ``reserve`` refuses a call its budget cannot pay for, before any
    work; ``commit`` turns a reservation into spent queries; ``release`` drops one
    whose work failed. Counts are exact under concurrency.
    """

    def set_budget(self, key: str, max_queries: int | None) -> None: ...

    def budget(self, key: str) -> int | None: ...

    def remaining(self, key: str) -> int | None: ...

    def reserve(self, key: str, queries: int, *, ttl: float | None = None) -> Reservation: ...

    def commit(
        self,
        reservation: Reservation,
        *,
        images_scored: int,
        prompts_encoded: int,
        wall_seconds: float,
    ) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def usage(self, key: str = ...) -> Usage: ...

    def keys(self) -> list[str]: ...

    def account(self, key: str) -> dict[str, Any]: ...


class QueryLedger:
    """Thread-safe per-key accounting of queries, with optional budgets.

    Thread safety: every method takes one lock, so concurrent callers on the
    same key can never together exceed its budget.

    ``clock`` (monotonic seconds) times reservation leases; tests inject one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._tickets = itertools.count()
        self._clock = clock
        self._journaled = False  # JournaledLedger: lapsed leases are also written down

    def _account(self, key: str) -> _Account:
        if not isinstance(key, str) or not key:
            raise ValueError(f"budget key must be a non-empty string, got {key!r}")
        account = self._accounts.setdefault(key, _Account())
        if account.leases:  # lapsed leases are dropped whenever the account is read
            account.expire(self._clock(), journaled=self._journaled)
        return account

    def set_budget(self, key: str, max_queries: int | None) -> None:
        """Cap ``key`` at ``max_queries`` in total (``None`` removes the cap)."""
        if max_queries is not None and (not isinstance(max_queries, int) or max_queries < 0):
            raise ValueError(f"max_queries must be a non-negative int or None, got {max_queries!r}")
        with self._lock:
            self._account(key).budget = max_queries

    def budget(self, key: str) -> int | None:
        with self._lock:
            return self._account(key).budget

    def remaining(self, key: str) -> int | None:
        """Queries still available on ``key`` (``None`` when it has no budget)."""
        with self._lock:
            account = self._account(key)
            return None if account.budget is None else account.budget - account.held

    def reserve(self, key: str, queries: int, *, ttl: float | None = None) -> Reservation:
        """Hold ``queries`` on ``key`` or refuse the call whole.

        ``ttl``: seconds after which the ledger drops the reservation itself if it
        was neither committed nor released (``None``: held until one of them).
        """
        if queries <= 0:
            raise ValueError(f"a call must request at least one query, got {queries}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"a reservation's ttl must be positive seconds, got {ttl!r}")
        with self._lock:
            account = self._account(key)
            if account.budget is not None and account.held + queries > account.budget:
                raise BudgetExceededError(
                    key, queries, account.budget - account.held, account.budget
                )
            ticket = next(self._tickets)
            account.reserved[ticket] = queries
            if ttl is not None:
                account.leases[ticket] = self._clock() + ttl
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
        with self._lock:
            account = self._account(reservation.key)
            queries = account.reserved.pop(reservation.ticket, None)
            account.leases.pop(reservation.ticket, None)
            if queries is None:
                raise KeyError(
                    f"reservation {reservation.ticket} is not held "
                    "(committed twice, released, or its lease ran out)"
                )
            usage = account.usage
            usage.queries += queries
            usage.images_scored += images_scored
            usage.prompts_encoded += prompts_encoded
            usage.wall_seconds += wall_seconds
            usage.calls += 1

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose work failed; nothing is counted."""
        with self._lock:
            account = self._account(reservation.key)
            account.reserved.pop(reservation.ticket, None)
            account.leases.pop(reservation.ticket, None)

    def usage(self, key: str = DEFAULT_BUDGET_KEY) -> Usage:
        """A copy of what ``key`` has spent."""
        with self._lock:
            return Usage(**asdict(self._account(key).usage))

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)

    def account(self, key: str) -> dict[str, Any]:
        """One consistent view of ``key``: spent, held by calls in flight, budget.

        ``expired``: queries of reservations whose lease ran out (their calls
        ended without commit or release: a caller that died).
        """
        with self._lock:
            account = self._account(key)
            return {
                **asdict(account.usage),
                "reserved": sum(account.reserved.values()),
                "expired": account.expired,
                "budget": account.budget,
            }


@contextmanager
def metered(
    ledger: Any, key: str, *, queries: int, images_scored: int, prompts_encoded: int
) -> Iterator[None]:
    """Reserve before the block, commit after it, release if it raises.

    ``ledger`` is a :class:`QueryLedger` or anything with its reserve / commit /
    release methods (the Ray ledger actor's proxy). A refused reservation raises
    before the block runs, so a refused call does no work.
    """
    reservation = ledger.reserve(key, queries)
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        ledger.release(reservation)
        raise
    ledger.commit(
        reservation,
        images_scored=images_scored,
        prompts_encoded=prompts_encoded,
        wall_seconds=time.perf_counter() - started,
    )
