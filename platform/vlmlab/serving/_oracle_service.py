"""The black box as an HTTP service: API keys, per-key budgets and limits, image sets, logits.

:class:`OracleService` holds what the gateway needs to answer ``/v1/oracle/*``
(the FastAPI routes in :mod:`vlmlab.serving._http` only parse and delegate):

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

Wire format of arrays: a nested JSON list, or ``{"shape": [...],
"float32_base64": "..."}`` (little-endian float32), which is exact and ~4x
smaller. A response uses the request's form.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmlab.errors import LimitExceededError
from vlmlab.oracle import (
    scoped_image_set_id,
    validate_class_names,
    validate_contexts,
    validate_indices,
)
from vlmlab.serving._classifier import RequestError, limit_error, over_limit
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
from vlmlab.serving._scheduler import FairScheduler

MAX_IMAGES_PER_SET = 4096
MAX_ARRAY_DIM = 2**20
"""Largest extent of one axis of a base64 array (a shape's product is checked exactly);
far above any real axis (candidates, tokens, token dimension)."""
MAX_CONTEXT_ABS = 65504.0
"""Largest magnitude of a context value: fp16's largest finite number. Finite float32
values beyond it (3e38) overflow the text tower's arithmetic into NaN logits, and the
official code rounds contexts to fp16 anyway; refused before any query is charged."""
LEASE_MARGIN_S = 60.0
"""A reservation's lease outlasts its call's deadline by this much."""

log = logging.getLogger(__name__)


def encode_array(array: np.ndarray, binary: bool) -> Any:
    if binary:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return {"shape": list(array.shape), "float32_base64": base64.b64encode(data).decode()}
    return array.tolist()


def _nested_json(array: np.ndarray) -> str:
    """``json.dumps(array.tolist())``, a block of a few thousand values at a time.

    Each block is one short call, so a thread rendering a big response lets the
    gateway's event loop run between blocks instead of holding it for seconds.
    """
    if array.ndim <= 1 or array.size <= 4096:
        return json.dumps(array.tolist(), separators=(",", ":"))
    return "[" + ",".join(_nested_json(part) for part in array) + "]"


@dataclass
class Answer:
    """A response with one array in it, rendered to JSON bytes off the event loop."""

    fields: dict[str, Any]
    name: str
    array: np.ndarray
    binary: bool

    def render(self) -> bytes:
        if self.binary:
            value = json.dumps(encode_array(self.array, True), separators=(",", ":"))
        else:
            value = _nested_json(self.array)
        rest = json.dumps(self.fields, separators=(",", ":"))
        return (f'{{"{self.name}":{value}' + ("," + rest[1:] if self.fields else "}")).encode()


def decode_array(value: Any, name: str) -> tuple[np.ndarray, bool]:
    """A float32 array from either wire form, and whether it came in binary form."""
    if isinstance(value, dict):
        shape, data = value.get("shape"), value.get("float32_base64")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ARRAY_DIM
            for s in shape
        ):
            raise RequestError(
                422, f"{name}.shape must be a list of integers in [0, {MAX_ARRAY_DIM}]"
            )
        if len(shape) > 8:
            raise RequestError(422, f"{name}.shape has {len(shape)} axes; at most 8")
        if not isinstance(data, str):
            raise RequestError(422, f"{name}.float32_base64 must be a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{name}.float32_base64 is not valid base64") from None
        if len(raw) != 4 * math.prod(shape):  # exact integers: a product cannot overflow
            raise RequestError(
                422, f"{name}: {len(raw)} bytes do not hold float32 of shape {shape}"
            )
        try:
            return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32), True
        except (ValueError, OverflowError):  # e.g. a zero axis beside a vast one
            raise RequestError(
                422, f"{name}.shape {shape} cannot be used: its axes are too long together"
            ) from None
    if not isinstance(value, list):
        raise RequestError(
            422, f"{name} must be a nested list of numbers or {{shape, float32_base64}}"
        )
    _only_numbers(value, name)
    try:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused by the caller
            array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(
            422, f"{name} must be a rectangular nested list of numbers (ragged or too large)"
        ) from None
    return array, False


def _only_numbers(value: list[Any], name: str) -> None:
    """Every leaf a JSON number: numpy would read ``"0.5"``, ``" 1 "`` or ``true`` as numbers.

    Iterative (the body's depth is bounded, its size is not small), and by exact
    type: ``bool`` is a subclass of ``int``.
    """
    stack: list[list[Any]] = [value]
    while stack:
        for item in stack.pop():
            kind = type(item)
            if kind is list:
                stack.append(item)
            elif kind is not float and kind is not int:
                shown = truncate_repr(item)
                raise RequestError(
                    422, f"{name} must hold numbers only; found {shown} ({kind.__name__})"
                )


def truncate_repr(item: Any, limit: int = 40) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def check_context_range(contexts: np.ndarray, name: str = "contexts") -> None:
    """Refuse values fp16 cannot hold (:data:`MAX_CONTEXT_ABS`); NaN and inf are the oracle's."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(contexts) & (np.abs(contexts) > MAX_CONTEXT_ABS)  # NaN/inf: the oracle's
    if big.any():
        raise RequestError(
            422,
            f"{name} holds {int(big.sum())} values beyond +-{MAX_CONTEXT_ABS:g} (fp16's range); "
            "they overflow the text tower into NaN logits",
        )


def user_error(error: BaseException) -> RequestError | None:
    """A client's mistake found by the oracle replica (e.g. a prompt too long), as a 4xx."""
    import ray.exceptions

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    if isinstance(cause, RequestError):
        return cause
    if isinstance(cause, LimitExceededError):
        return limit_error(cause)
    if isinstance(cause, KeyError):
        return RequestError(404, str(cause.args[0]) if cause.args else "unknown", kind="KeyError")
    if isinstance(cause, ValueError | TypeError):
        return RequestError(422, str(cause), kind=type(cause).__name__)
    return None


async def answer_of(call: Awaitable[Any], unavailable: str | None = None) -> Any:
    """Await a call to another deployment; a client's mistake it found comes back as its 4xx.

    Any other failure is re-raised, or, with ``unavailable``, answered as a 503
    with that message.
    """
    try:
        return await call
    except Exception as error:
        mapped = user_error(error)
        if mapped is not None:
            raise mapped from None
        if unavailable is None:
            raise
        raise RequestError(503, unavailable) from None


def _lost(error: BaseException) -> bool:
    """Whether a replica failed because an image set's pixels are gone from the object store."""
    import ray.exceptions

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return isinstance(cause, ray.exceptions.ObjectLostError) or isinstance(
        error, ray.exceptions.ObjectLostError
    )


def _binary(fields: dict[str, Any]) -> bool:
    """The optional ``binary`` field: a JSON boolean, nothing that merely looks like one."""
    binary = fields.get("binary", False)
    if not isinstance(binary, bool):
        raise RequestError(422, "binary must be true or false")
    return binary


def _shown(text: str, most: int = 80) -> str:
    """A client's string, quoted, cut short: an error never echoes a whole body back."""
    return repr(text if len(text) <= most else text[:most] + "...")


def _indices(value: Any, size: int) -> np.ndarray | None:
    """The ``indices`` field as int64, checked in plain Python before numpy sees it."""
    if not isinstance(value, list) or not value:  # null too: leave the field out for all
        raise RequestError(422, "indices must be a non-empty list of integers")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise RequestError(422, "indices must be integers", kind="TypeError")
    low, high = min(value), max(value)
    if low < 0 or high >= size:
        raise RequestError(
            422, f"indices out of range for an image set of {size} images: min {low}, max {high}"
        )
    index = validate_indices(np.asarray(value, dtype=np.int64), size)
    return None if index is None else index.numpy()


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


@dataclass
class _KeyState:
    image_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: int = 0
    image_bytes: int = 0
    uploads: dict[str, str] = field(default_factory=dict)
    """Digest of an upload's bytes -> its set id: the same upload again is not decoded again."""
    registering: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by the key's registration in progress (one at a time: quotas stay exact)."""


class OracleService:
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

    # ------------------------------------------------------------ image sets
    async def register(self, name: str, images: list[bytes]) -> dict[str, Any]:
        """Register a set: checked from the images' headers, decoded in the registrar.

        One registration of a key at a time, so its image and byte quotas are
        exact; keys take fair turns on the registrar (cost: the upload's bytes).
        """
        key, state = self.keys[name], self._state[name]
        if not images:
            raise RequestError(422, "images is empty: send at least one image")
        if len(images) > MAX_IMAGES_PER_SET:
            raise RequestError(413, f"at most {MAX_IMAGES_PER_SET} images a set")
        if self.registrar is None:
            raise RequestError(404, "this server registers no image sets")
        digest = hashlib.sha256()
        for data in images:
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        upload = digest.hexdigest()
        async with state.registering:
            known = state.uploads.get(upload)
            if known is not None and known in state.image_sets:  # sent before: not decoded again
                return {"image_set": known, "size": state.image_sets[known]["size"]}
            limits = {
                field: getattr(key, field)
                for field in (
                    "max_image_pixels",
                    "max_image_side",
                    "max_set_pixels",
                    "max_images",
                    "max_image_bytes",
                )
            }
            room = (key.max_images - state.images, key.max_image_bytes - state.image_bytes)
            async with self.decoding.turn(name, sum(len(data) for data in images)):
                box = await answer_of(
                    self.registrar.register.remote(name, images, limits, room),
                    "the image registrar failed; nothing was registered, retry",
                )
            if box["id"] not in state.image_sets:  # the same pixels again: registered once
                # scope: the replicas hold this key's features apart from every other key's
                state.image_sets[box["id"]] = {**box, "upload": upload, "scope": name}
                state.images += box["size"]
                state.image_bytes += box["bytes"]
            state.uploads[upload] = box["id"]
        return {"image_set": box["id"], "size": box["size"]}

    async def delete(self, name: str, set_id: str) -> dict[str, Any]:
        """Forget one of the key's sets: its images and bytes no longer count against it,
        and every oracle replica drops its features before the answer."""
        if not self._forget(name, set_id):
            raise RequestError(404, f"unknown image set {set_id!r} of this key", kind="KeyError")
        await self._evict([scoped_image_set_id(name, set_id)])
        return {"image_set": set_id, "deleted": True, "images_registered": self._state[name].images}

    def _forget(self, name: str, set_id: str) -> bool:
        state = self._state[name]
        box = state.image_sets.pop(set_id, None)
        if box is None:
            return False
        state.images -= box["size"]
        state.image_bytes -= box["bytes"]
        state.uploads = {u: s for u, s in state.uploads.items() if s != set_id}
        self._release(name, [set_id])
        return True

    def _release(self, name: str, set_ids: list[str] | None) -> None:
        """The registrar lets go of these sets' pixels (in the background)."""
        if self.registrar is None:
            return
        release = self.registrar.release.remote(name, set_ids)

        async def wait() -> None:
            try:
                await release
            except Exception as error:  # a registrar that restarted holds nothing anyway
                log.warning("the image registrar did not release %s's sets: %s", name, error)

        self._background.add(task := asyncio.ensure_future(wait()))
        task.add_done_callback(self._background.discard)

    async def _evict(self, scoped: list[str]) -> None:
        """Every oracle replica drops these sets' features (a control call, not the hot path)."""
        if scoped and self.oracle is not None:
            await self.oracle.broadcast("forget_image_sets", scoped).results_async()

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


class _Metadata:
    """Just what :func:`validate_contexts` reads, from a replica's ``describe``."""

    def __init__(self, token_dim: int, display_name: str) -> None:
        self.token_dim = token_dim
        self.display_name = display_name

    @classmethod
    def of(cls, described: dict[str, Any]) -> Any:
        return cls(described["token_dim"], f"{described['backend']} {described['model']}")
