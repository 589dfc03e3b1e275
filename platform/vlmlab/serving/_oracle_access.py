"""Who may call the oracle service, and how often: API keys authenticated and admitted.

:class:`_KeyAccess` is a part of :class:`~vlmlab.serving._oracle_service.OracleService`
(its base class): a request's key is authenticated from its headers, then
passes the key's rate limit and takes one of its ``max_concurrent`` slots,
all before its body is read; a reloaded keys file replaces the keys (a removed
key's image sets go with it, hence the base class :class:`_ImageSets`). Apart
from the service's budgets and logits because it decides from headers alone
and holds no per-call state.
"""

from __future__ import annotations

import asyncio

from vlmlab.oracle import scoped_image_set_id
from vlmlab.serving._classifier import RequestError
from vlmlab.serving._keys import ApiKey, KeyRing, KeySlots, RateLimiter, retry_after_header
from vlmlab.serving._oracle_sets import _ImageSets, _KeyState


class _KeyAccess(_ImageSets):
    """The access checks of :class:`OracleService`, which sets these attributes."""

    keys: dict[str, ApiKey]
    ring: KeyRing
    limiter: RateLimiter
    slots: KeySlots
    _state: dict[str, _KeyState]
    _budgets_set: bool
    _background: set[asyncio.Future[None]]

    # ---------------------------------------------------------------- access
    def admit(self, authorization: str | None) -> str:
        """The caller's key name, after authentication, the rate limit and a slot.

        Decided from the headers alone, before the body is read. The caller
        must :meth:`leave` once the request is answered.
        """
        scheme, _, token = (authorization or "").partition(" ")
        name = self.ring.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise RequestError(
                401,
                "missing or unknown API key: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        wait = self.limiter.acquire(name)
        if wait > 0:
            raise self._rate_limited(name, wait)
        if not self.slots.enter(name):
            limit = self.keys[name].max_concurrent
            raise RequestError(
                429,
                f"key {name!r} has {limit} requests in progress, its limit max_concurrent = "
                f"{limit}; retry when one is answered",
                headers=retry_after_header(1.0),
            )
        return name

    def leave(self, name: str) -> None:
        self.slots.leave(name)

    def replace_keys(self, keys: dict[str, ApiKey]) -> dict[str, list[str]]:
        """Serve ``keys`` from now on (a reloaded keys file); returns what changed.

        A removed key is refused from the next request on; its requests already
        in progress finish with its old record. A key's spent queries are its
        ledger account's (``api:<name>``), so they stay with its name: a key
        removed and added again, or given a new digest or budget, keeps them.
        New budgets are set on the ledger before the next metered call.
        """
        old = self.keys
        removed = set(old) - set(keys)
        in_progress = {name for name in removed if self.slots.held(name)}
        changed = sorted(n for n in set(old) & set(keys) if old[n] != keys[n])
        self.ring = KeyRing(keys)  # authentication sees only the new keys, at once
        self.keys = {**{name: old[name] for name in in_progress}, **keys}
        self.limiter.update(keys)
        self.slots.update(keys)
        for name in removed - in_progress:  # their image sets go with them
            state = self._state.pop(name, None)
            if state is not None and state.image_sets:
                scoped = [scoped_image_set_id(name, i) for i in state.image_sets]
                task = asyncio.ensure_future(self._evict(scoped))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                self._release(name, None)
        for name in keys:
            self._state.setdefault(name, _KeyState())
        self._budgets_set = False
        return {
            "added": sorted(set(keys) - set(old)),
            "removed": sorted(removed),
            "changed": changed,
        }

    def _rate_limited(self, name: str, wait: float) -> RequestError:
        rate = self.keys[name].rate
        return RequestError(
            429,
            f"rate limit of key {name!r} ({rate:g} requests/s) reached; retry in {wait:.2f} s",
            headers=retry_after_header(wait),
        )
