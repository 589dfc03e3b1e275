"""The budget ledger as a Ray actor, and a proxy with :class:`QueryLedger`'s methods.

Pool clients reserve on this one actor before sending a population to a
replica, commit when the logits come back and release when the request fails
(a replica that dies mid-request included), so counts stay exact however many
clients and replicas share a budget key. The actor processes one call at a
time, which is what makes reserve-then-check atomic.
"""

from __future__ import annotations

from typing import Any

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import QueryLedger, Reservation, Usage

LEDGER_NAME = "vlmlab-ledger"
HEAD_NODE = "node:__internal_head__"
"""The resource Ray gives the head node alone."""


class _LedgerService:
    """Runs inside the actor: a QueryLedger whose refusals come back as values."""

    def __init__(self) -> None:
        self._ledger = QueryLedger()

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


def ledger_actor(name: str = LEDGER_NAME):
    """The named ledger actor of this Ray namespace, created on first use.

    It lives on the head node (a worker node lost mid-sweep must not take the
    counts with it; the head is the one node a Ray cluster cannot lose) and is
    detached: it outlives the driver that created it, so every driver on a
    cluster — two sweeps, a sweep and the HTTP service — shares one exact
    account book for as long as the cluster runs.
    """
    import ray

    from vlmlab.pool._ray import NAMESPACE

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_LedgerService)
    return actor_cls.options(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        resources={HEAD_NODE: 0.001},
    ).remote()


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

    def __reduce__(self):  # travels to Ray workers as a handle to the same actor
        return (RemoteLedger, (self._actor,))
