"""The black box as an HTTP service: API keys, per-key budgets and limits, image sets, logits.

:class:`OracleService` holds what the gateway needs to answer ``/v1/oracle/*``
(the FastAPI routes in :mod:`vlmlab.serving._gateway` only parse and delegate):

- **Who**: ``Authorization: Bearer <key>``; the key's SHA-256 is looked up in
  the keys file. A missing or unknown key is 401 (the two are not told apart),
  decided from the headers before the body is read.
- **How often and how much at once**: a token bucket per key (``rate``,
  ``burst``; a logits call draws one token per started 1,000 prompts), and at
  most ``max_concurrent`` requests of a key in progress; over either, 429 with
  ``Retry-After``. Both live in the gateway, which runs as one replica, so
  they are exact.
- **How much work**: every call is checked against the key's limits
  (:data:`~vlmlab.serving.KEY_LIMITS`: classes, prompts, logits, text bytes and
  tokens, image pixels, set pixels, registered images and bytes) before any
  work; over one, 413 naming it, and nothing is charged.
- **How much it costs**: each key's budget is the ledger actor's account
  ``api:<name>``, reserved before the oracle computes (with a lease a little
  longer than ``call_timeout_s``), committed after, released if the call fails
  or its client disconnects. A call the budget cannot pay for is refused whole
  with 402 and costs nothing, so a key with budget B is served exactly B
  queries. One query is one candidate on one batch, whatever its classes (the
  papers' unit, the same as in-process); the work of a call (candidates x
  classes, "prompts") is what its limits, its rate-limit tokens and its turns
  on the oracle are counted in.
- **Whose turn**: a call computes in chunks of at most ``chunk_prompts``
  prompts, and keys take turns chunk by chunk (:class:`FairScheduler`), so a
  key's big call delays another key's call by the chunk in flight at most.
- **On what**: a key registers image sets (content-addressed, like the Oracle
  protocol's ``register_images``), may only score the sets it registered, and
  may delete them to free its quota.

A client that disconnects cancels its call: no more chunks are computed (the
one in flight finishes and is dropped), the reservation is released and
nothing is charged, as for any call that fails. A call whose logits were
computed in full is charged even if its client is gone when they are sent.

Where the parts live: this module holds the service itself (budgets, the
endpoints, metered logits). Its base classes hold authentication and admission
(:mod:`vlmlab.serving._oracle_access`) and each key's image sets
(:mod:`vlmlab.serving._oracle_sets`); the wire format of arrays and the checks
of request fields are in :mod:`vlmlab.serving._oracle_wire`, the reading of
other deployments' answers in :mod:`vlmlab.serving._remote_calls`. The names
that code imported from here before that split are still importable from here.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np

from vlmlab.oracle import validate_class_names, validate_contexts
from vlmlab.serving._classifier import RequestError, over_limit
from vlmlab.serving._keys import (
    BUDGET_PREFIX,
    PROMPTS_PER_REQUEST,
    ApiKey,
    KeyRing,
    KeySlots,
    RateLimiter,
    retry_after_header,
)
from vlmlab.serving._limits import ServerLimits
from vlmlab.serving._oracle_access import _KeyAccess
from vlmlab.serving._oracle_sets import MAX_IMAGES_PER_SET, _KeyState
from vlmlab.serving._oracle_wire import (
    MAX_ARRAY_DIM,
    MAX_CONTEXT_ABS,
    Answer,
    _binary,
    _indices,
    _Metadata,
    _shown,
    check_context_range,
    decode_array,
    encode_array,
    truncate_repr,
)
from vlmlab.serving._remote_calls import _lost as _lost
from vlmlab.serving._remote_calls import answer_of, user_error
from vlmlab.serving._scheduler import FairScheduler

LEASE_MARGIN_S = 60.0
"""A reservation's lease outlasts its call's deadline by this much."""


def plan_chunks(population: int, classes: int, chunk_prompts: int) -> list[tuple[slice, slice]]:
    """Candidate and class ranges of at most ``chunk_prompts`` prompts each, in order.

    Whole candidates (all classes) while a candidate fits in a chunk, so a call
    that fits in one chunk is computed exactly as in-process; classes are split
    only when one candidate alone is over a chunk.
    """
    if classes <= chunk_prompts:
        step = chunk_prompts // classes
        return [
            (slice(p, min(p + step, population)), slice(0, classes))
            for p in range(0, population, step)
        ]
    return [
        (slice(p, p + 1), slice(c, min(c + chunk_prompts, classes)))
        for p in range(population)
        for c in range(0, classes, chunk_prompts)
    ]


class OracleService(_KeyAccess):
    """Authentication, limits, image sets and metered logits for the gateway."""

    def __init__(
        self,
        keys: dict[str, ApiKey],
        oracle: Any,
        ledger: Any = None,
        *,
        limits: ServerLimits | None = None,
        oracle_replicas: int = 1,
        registrar: Any = None,
    ) -> None:
        from vlmlab.pool import ledger_actor

        self.keys = keys
        self.limits = limits or ServerLimits()
        self.ring = KeyRing(keys)
        self.limiter = RateLimiter(keys)
        self.slots = KeySlots(keys)
        self.compute = FairScheduler(self.limits.oracle_slots or oracle_replicas)
        self.decoding = FairScheduler(self.limits.decode_threads)
        self.registrar = registrar  # a handle to the ImageRegistrar deployment
        self.oracle = oracle  # a handle to the OracleReplica deployment
        self.ledger = ledger if ledger is not None else ledger_actor()
        self._state = {name: _KeyState() for name in keys}
        self._described: dict[str, Any] | None = None
        self._budgets_set = False
        self._background: set[asyncio.Future[None]] = set()  # releases of cancelled calls

    async def _ensure_ready(self) -> dict[str, Any]:
        if not self._budgets_set:  # keeps usage across a redeploy: only the caps are (re)set
            for name, key in self.keys.items():
                await self.ledger.call.remote("set_budget", BUDGET_PREFIX + name, key.budget)
            self._budgets_set = True
        if self._described is None:
            self._described = await self.oracle.describe.remote()
        return self._described

    # ------------------------------------------------------------- endpoints
    async def metadata(self) -> dict[str, Any]:
        described = await self._ensure_ready()
        return {
            "backend": described["backend"],
            "model": described["model"],
            "token_dim": described["token_dim"],
            "context_length": described["context_length"],
            "embedding_mean": np.asarray(described["embedding_mean"]).tolist(),
            "embedding_std": described["embedding_std"],
        }

    async def _standing(self, name: str) -> dict[str, Any]:
        """The key's account in one ledger call: spent, held by calls in flight, and left."""
        account = await self.ledger.call.remote("account", BUDGET_PREFIX + name)
        budget = account["budget"]
        held = account["queries"] + account["reserved"]
        return {**account, "left": None if budget is None else budget - held}

    async def usage(self, name: str) -> dict[str, Any]:
        """``queries_used + queries_reserved + queries_left == budget`` in every answer."""
        await self._ensure_ready()
        standing = await self._standing(name)
        state = self._state[name]
        key = self.keys[name]
        return {
            "key": name,
            "budget": key.budget,
            "queries_used": standing["queries"],
            "queries_reserved": standing["reserved"],
            "queries_left": standing["left"],
            "calls": standing["calls"],
            "prompts_encoded": standing["prompts_encoded"],
            "image_sets": len(state.image_sets),
            "images_registered": state.images,
            "image_bytes": state.image_bytes,
            "limits": key.model_dump(exclude={"sha256"}),
        }

    def _text_bytes(self, name: str, text: str, what: str) -> None:
        """``text`` is Unicode the tokenizer takes, within the key's ``max_text_bytes``."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate ("\ud800") from JSON
            raise RequestError(
                422,
                f"{what} is not valid Unicode text: a lone surrogate at character {error.start}",
                kind="ValueError",
            ) from None
        size = len(text.encode("utf-8"))
        limit = self.keys[name].max_text_bytes
        if size > limit:
            raise over_limit("max_text_bytes", size, limit, f"UTF-8 bytes of {what}")

    async def phrase_embeddings(self, name: str, fields: dict[str, Any]) -> Answer:
        phrase = fields.get("phrase")
        if not isinstance(phrase, str):
            raise RequestError(422, "phrase must be a string")
        binary = _binary(fields)
        self._text_bytes(name, phrase, "phrase")
        array = await answer_of(
            self.oracle.phrase_embeddings.remote(phrase, self.keys[name].max_tokens)
        )
        return Answer({}, "embeddings", np.asarray(array), binary)

    # ---------------------------------------------------------------- logits
    async def logits(self, name: str, fields: dict[str, Any]) -> Answer:
        key = self.keys[name]
        described = await self._ensure_ready()
        missing = [k for k in ("contexts", "class_names", "image_set") if k not in fields]
        if missing:
            raise RequestError(422, f"missing field(s): {', '.join(missing)}")
        if not isinstance(fields["image_set"], str):
            raise RequestError(422, "image_set must be a string (the id image-sets returned)")
        box = self._state[name].image_sets.get(fields["image_set"])
        if box is None:
            raise RequestError(
                404,
                f"image_set {_shown(fields['image_set'])} is no image set of this key: register "
                "it with POST /v1/oracle/image-sets first (sets are private to each key)",
                kind="KeyError",
            )
        contexts, binary = decode_array(fields["contexts"], "contexts")
        check_context_range(contexts)
        try:
            contexts_t = validate_contexts(contexts, _Metadata.of(described))
            names = validate_class_names(fields["class_names"])
        except (ValueError, TypeError) as error:
            raise RequestError(422, str(error), kind=type(error).__name__) from None
        index = _indices(fields["indices"], box["size"]) if "indices" in fields else None
        population, n_context = contexts_t.shape[0], contexts_t.shape[1]
        n_images = box["size"] if index is None else len(index)
        n_classes = len(names)

        # The work, bounded before any of it: every limit from what the request announces.
        if n_classes > key.max_classes:
            raise over_limit("max_classes", n_classes, key.max_classes, "class names in the call")
        for i, class_name in enumerate(names):
            self._text_bytes(name, class_name, f"class_names[{i}]")
        prompts = population * n_classes
        if prompts > key.max_prompts:
            what = f"prompts of the call ({population} candidates x {n_classes} classes)"
            raise over_limit("max_prompts", prompts, key.max_prompts, what)
        logits = prompts * n_images
        if logits > key.max_logits:
            what = (
                f"logits of the call ({population} x {n_images} images x {n_classes} classes; "
                "score fewer images a call with `indices`)"
            )
            raise over_limit("max_logits", logits, key.max_logits, what)
        if not binary and logits > key.max_json_logits:
            what = (
                f"logits of the call in a nested-list (JSON) response ({population} x "
                f"{n_images} x {n_classes}); send contexts as {{shape, float32_base64}} to get "
                "them in that form"
            )
            raise over_limit("max_json_logits", logits, key.max_json_logits, what)
        tokens = math.ceil(prompts / PROMPTS_PER_REQUEST)  # the first was taken on admission
        if key.rate is not None and tokens > 1:
            if tokens > key.burst:
                what = f"rate-limit tokens of a call of {prompts} prompts (1 per {PROMPTS_PER_REQUEST})"
                raise over_limit("burst", tokens, key.burst, what)
            wait = self.limiter.acquire(name, tokens - 1)
            if wait > 0:
                raise self._rate_limited(name, wait)
        # Tokens per name and the prompt's fit, by the model's tokenizer, for the names that
        # could fail them (a name of n UTF-8 bytes has at most n tokens): once, before chunks.
        room = min(key.max_tokens, int(described["context_length"]) - 3 - n_context)
        suspect = sorted({n for n in names if len(n.encode("utf-8", "surrogatepass")) > room})
        if suspect:
            await answer_of(
                self.oracle.check_names.remote(suspect, n_context, key.max_tokens),
                "the oracle failed; nothing was charged, retry",
            )

        account = BUDGET_PREFIX + name
        lease = self.limits.call_timeout_s + LEASE_MARGIN_S
        pending = self.ledger.reserve.remote(account, population, lease)
        try:
            status, reservation = await pending
        except asyncio.CancelledError:  # gone while reserving: release what gets reserved
            task = asyncio.ensure_future(self._release_when_reserved(pending))
            self._background.add(task)  # held until done: a task nobody holds may vanish
            task.add_done_callback(self._background.discard)
            raise
        if status == "refused":
            _, requested, remaining, budget = reservation
            raise RequestError(
                402,
                f"budget of key {name!r} exhausted: this call needs {requested} queries, "
                f"{remaining} left of {budget}",
                kind="BudgetExceededError",
                extra={"requested": requested, "queries_left": remaining, "budget": budget},
            )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.limits.call_timeout_s):
                out = await self._compute(name, contexts_t.numpy(), names, box, index, n_images)
        except asyncio.CancelledError:
            # The client is gone: stop here, hold nothing. Not awaited: this task is
            # being cancelled, and the ledger actor runs the release all the same.
            self.ledger.call.remote("release", reservation)
            raise
        except TimeoutError:
            await self.ledger.call.remote("release", reservation)
            raise RequestError(
                503,
                f"the call did not finish within call_timeout_s = {self.limits.call_timeout_s:g} "
                "(the oracle is busy); nothing was charged, retry",
                headers=retry_after_header(5.0),
            ) from None
        except Exception as error:
            await self.ledger.call.remote("release", reservation)
            if _lost(error):  # the registrar restarted: its sets are gone, send it again
                self._forget(name, fields["image_set"])
                raise RequestError(
                    404,
                    f"image set {fields['image_set']!r} was lost (the server restarted a "
                    "process): register it again; nothing was charged",
                    kind="KeyError",
                ) from None
            mapped = user_error(error)
            if mapped is not None:
                raise mapped from None
            raise RequestError(503, "the oracle failed; nothing was charged, retry") from None
        try:
            await self.ledger.call.remote(
                "commit",
                reservation,
                images_scored=population * n_images,
                prompts_encoded=prompts,
                wall_seconds=time.perf_counter() - started,
            )
        except Exception:  # the lease ran out (a call past its deadline): not charged
            raise RequestError(503, "the call took too long; nothing was charged, retry") from None
        standing = await self._standing(name)
        answer = {
            "shape": list(out.shape),
            "queries": population,
            "queries_used": standing["queries"],
            "queries_left": standing["left"],
            "backend": described["backend"],
            "model": described["model"],
        }
        return Answer(answer, "logits", out, binary)

    async def _release_when_reserved(self, pending: Any) -> None:
        status, reservation = await pending
        if status == "ok":
            await self.ledger.call.remote("release", reservation)

    async def _compute(
        self,
        name: str,
        contexts: np.ndarray,
        names: list[str],
        box: dict[str, Any],
        index: np.ndarray | None,
        n_images: int,
    ) -> np.ndarray:
        """The call's logits, chunk by chunk, each chunk in the key's fair turn."""
        out = np.empty((len(contexts), n_images, len(names)), dtype=np.float32)
        for rows, columns in plan_chunks(len(contexts), len(names), self.limits.chunk_prompts):
            cost = (rows.stop - rows.start) * (columns.stop - columns.start)
            async with self.compute.turn(name, cost):
                response = self.oracle.logits.remote(contexts[rows], names[columns], box, index)
                try:
                    part = await response
                except asyncio.CancelledError:
                    response.cancel()  # the replica drops it (a chunk computing ends first)
                    raise
            out[rows, :, columns] = part
        return out


__all__ = [
    "LEASE_MARGIN_S",
    "MAX_ARRAY_DIM",
    "MAX_CONTEXT_ABS",
    "MAX_IMAGES_PER_SET",
    "Answer",
    "OracleService",
    "answer_of",
    "check_context_range",
    "decode_array",
    "encode_array",
    "plan_chunks",
    "truncate_repr",
    "user_error",
]
