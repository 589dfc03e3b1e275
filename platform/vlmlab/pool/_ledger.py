"""The budget ledger as a Ray actor, and a proxy with :class:`QueryLedger`'s methods.

Pool clients reserve on this one actor before sending a population to a
replica, commit when the logits come back and release when the request fails
(a replica that dies mid-request included), so counts stay exact however many
clients and replicas share a budget key. The actor processes one call at a
time, which is what makes reserve-then-check atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import (
    Reservation,
    Usage,
    is_postgres_uri,
    open_ledger,
    redact_postgres_uri,
)

LEDGER_NAME = "vlmlab-ledger"
HEAD_NODE = "node:__internal_head__"
"""The resource Ray gives the head node alone."""


JOURNAL_ENV = "VLMLAB_LEDGER_JOURNAL"
"""Where a new ledger actor journals when its creator names no journal (unset: nowhere)."""


class _LedgerService:
    """Runs inside the actor: a QueryLedger whose refusals come back as values.

    With a ``journal`` path it is a :class:`~vlmlab.oracle.JournaledLedger`: it
    starts from what the file holds and writes every change there first. With a
    ``postgresql://`` URI it is a :class:`~vlmlab.oracle.PostgresLedger`: the
    database is the book, shared with every other service that names it.
    """

    def __init__(self, journal: str | None = None) -> None:
        self._journal = journal
        self._ledger: Any = open_ledger(journal)

    def journal(self) -> str | None:
        return self._journal

    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        if not hasattr(self._ledger, "events"):
            raise ValueError(
                "this ledger keeps no journal (start it with one: --ledger PATH or postgresql://...)"
            )
        return self._ledger.events(key)

    def reserve(self, key: str, queries: int, ttl: float | None = None) -> tuple[str, Any]:
        try:
            return "ok", self._ledger.reserve(key, queries, ttl=ttl)
        except BudgetExceededError as refusal:
            return "refused", (refusal.key, refusal.requested, refusal.remaining, refusal.budget)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in {
            "commit",
            "release",
            "set_budget",
            "budget",
            "remaining",
            "usage",
            "keys",
            "account",
        }:
            raise AttributeError(f"ledger has no method {method!r}")
        return getattr(self._ledger, method)(*args, **kwargs)


def ledger_actor(name: str = LEDGER_NAME, *, journal: str | Path | None = None):
    """The named ledger actor of this Ray namespace, created on first use.

    ``journal``: the SQLite file the ledger keeps its account book in, so that
    budgets and spent queries survive the actor, the cluster and the head node
    (with the file on storage that outlives them); or a ``postgresql://`` URI,
    the database that is the book of every service naming it. Only its creator decides:
    asking an existing actor for another journal than its own is an error
    (None asks for nothing). Default for a new actor: ``$VLMLAB_LEDGER_JOURNAL``,
    else no journal (the account book lives as long as the cluster).

    It lives on the head node (a worker node lost mid-sweep must not take the
    counts with it; the head is the one node a Ray cluster cannot lose) and is
    detached: it outlives the driver that created it, so every driver on a
    cluster — two sweeps, a sweep and the HTTP service — shares one exact
    account book for as long as the cluster runs.
    """
    import ray

    from vlmlab.pool._ray import NAMESPACE

    wanted = None if journal is None else _journal_name(journal)
    initial = wanted if wanted is not None else os.environ.get(JOURNAL_ENV) or None
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_LedgerService)
    actor = actor_cls.options(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        resources={HEAD_NODE: 0.001},
    ).remote(initial)
    if wanted is not None:
        current: str | None = ray.get(actor.journal.remote())  # type: ignore[attr-defined,assignment]
        if current != wanted:
            shown = redact_postgres_uri(current) if current else "no file"
            raise ValueError(
                f"the ledger of this Ray cluster journals to {shown}, not "
                f"{redact_postgres_uri(wanted)}: its first user started it. Use the same journal, or start a new "
                "cluster (`ray stop`) to open this one"
            )
    return actor


def _journal_name(journal: str | Path) -> str:
    """A database URI as given; a file as its absolute path (one name per journal)."""
    if is_postgres_uri(journal):
        return str(journal)
    return str(Path(journal).expanduser().resolve())


class RemoteLedger:
    """The ledger actor behind :class:`~vlmlab.oracle.QueryLedger`'s interface."""

    def __init__(self, actor: Any = None) -> None:
        self._actor = actor if actor is not None else ledger_actor()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self._actor.call.remote(method, *args, **kwargs))

    def reserve(self, key: str, queries: int, *, ttl: float | None = None) -> Reservation:
        import ray

        status, value = ray.get(self._actor.reserve.remote(key, queries, ttl))
        if status == "refused":
            raise BudgetExceededError(*value)
        return value

    def commit(
        self,
        reservation: Reservation,
        *,
        images_scored: int,
        prompts_encoded: int,
        wall_seconds: float,
    ) -> None:
        self._call(
            "commit",
            reservation,
            images_scored=images_scored,
            prompts_encoded=prompts_encoded,
            wall_seconds=wall_seconds,
        )

    def release(self, reservation: Reservation) -> None:
        self._call("release", reservation)

    def set_budget(self, key: str, max_queries: int | None) -> None:
        self._call("set_budget", key, max_queries)

    def budget(self, key: str) -> int | None:
        return self._call("budget", key)

    def remaining(self, key: str) -> int | None:
        return self._call("remaining", key)

    def usage(self, key: str = "default") -> Usage:
        return self._call("usage", key)

    def keys(self) -> list[str]:
        return self._call("keys")

    def account(self, key: str) -> dict[str, Any]:
        return self._call("account", key)

    def journal(self) -> str | None:
        """Where the ledger keeps its account book: a SQLite file or a PostgreSQL URI
        (None: memory only). A URI may hold a password: print it redacted."""
        import ray

        return ray.get(self._actor.journal.remote())

    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        """The journal's events, oldest first (a ledger without journal: ValueError)."""
        import ray

        return ray.get(self._actor.events.remote(key))

    def __reduce__(self):  # travels to Ray workers as a handle to the same actor
        return (RemoteLedger, (self._actor,))
