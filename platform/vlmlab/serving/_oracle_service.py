"""The black box as an HTTP service: API keys, per-key budgets and rates, image sets, logits.

:class:`OracleService` holds what the gateway needs to answer ``/v1/oracle/*``
(the FastAPI routes in :mod:`vlmlab.serving._http` only parse and delegate):

- **Who**: ``Authorization: Bearer <key>``; the key's SHA-256 is looked up in
  the keys file. A missing or unknown key is 401 (the two are not told apart).
- **How often**: a token bucket per key (``rate``, ``burst``); over it, 429
  with ``Retry-After``. The buckets live in the gateway, which runs as one
  replica, so a key's rate is exact.
- **How much**: each key's budget is the ledger actor's account ``api:<name>``
  (the same actor that keeps the runs' budgets), reserved before the oracle
  computes, committed after, released if it fails. A call the budget cannot
  pay for is refused whole with 402 and costs nothing, so a key with budget B
  is served exactly B queries.
- **On what**: a key registers image sets (content-addressed, like the Oracle
  protocol's ``register_images``) and may only score the sets it registered.

Wire format of arrays: a nested JSON list, or ``{"shape": [...],
"float32_base64": "..."}`` (little-endian float32), which is exact and ~4x
smaller. A response uses the request's form.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmlab.oracle import ImageSet, validate_class_names, validate_contexts, validate_indices
from vlmlab.serving._classifier import RequestError, decode_image
from vlmlab.serving._keys import BUDGET_PREFIX, ApiKey, KeyRing, RateLimiter, retry_after_header

MAX_LOGITS = 16 * 1024 * 1024
"""Most logits one response may carry (P x N x C); larger calls must pass ``indices``."""
MAX_IMAGES_PER_SET = 4096


def encode_array(array: np.ndarray, binary: bool) -> Any:
    if binary:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return {"shape": list(array.shape), "float32_base64": base64.b64encode(data).decode()}
    return array.tolist()


def decode_array(value: Any, name: str) -> tuple[np.ndarray, bool]:
    """A float32 array from either wire form, and whether it came in binary form."""
    if isinstance(value, dict):
        shape, data = value.get("shape"), value.get("float32_base64")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise RequestError(422, f"{name}.shape must be a list of non-negative integers")
        if not isinstance(data, str):
            raise RequestError(422, f"{name}.float32_base64 must be a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{name}.float32_base64 is not valid base64") from None
        if len(raw) != 4 * int(np.prod(shape)):
            raise RequestError(
                422, f"{name}: {len(raw)} bytes do not hold float32 of shape {shape}"
            )
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32), True
    if not isinstance(value, list):
        raise RequestError(
            422, f"{name} must be a nested list of numbers or {{shape, float32_base64}}"
        )
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(
            422, f"{name} must be a rectangular nested list of numbers (ragged or non-numeric)"
        ) from None
    return array, False


def _user_error(error: BaseException) -> RequestError | None:
    """A client's mistake found by the oracle replica (e.g. a prompt too long), as a 4xx."""
    import ray.exceptions

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    if isinstance(cause, RequestError):
        return cause
    if isinstance(cause, KeyError):
        return RequestError(404, str(cause.args[0]) if cause.args else "unknown", kind="KeyError")
    if isinstance(cause, ValueError | TypeError):
        return RequestError(422, str(cause), kind=type(cause).__name__)
    return None


@dataclass
class _KeyState:
    image_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: int = 0


class OracleService:
    """Authentication, limits, image sets and metered logits for the gateway."""

    def __init__(self, keys: dict[str, ApiKey], oracle: Any, ledger: Any = None) -> None:
        from vlmlab.pool import ledger_actor

        self.keys = keys
        self.ring = KeyRing(keys)
        self.limiter = RateLimiter(keys)
        self.oracle = oracle  # a handle to the OracleReplica deployment
        self.ledger = ledger if ledger is not None else ledger_actor()
        self._state = {name: _KeyState() for name in keys}
        self._described: dict[str, Any] | None = None
        self._budgets_set = False

    # ---------------------------------------------------------------- access
    def admit(self, authorization: str | None) -> str:
        """The caller's key name, after authentication and the rate limit."""
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
            rate = self.keys[name].rate
            raise RequestError(
                429,
                f"rate limit of key {name!r} ({rate:g} requests/s) reached; retry in {wait:.2f} s",
                headers=retry_after_header(wait),
            )
        return name

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
        """The key's account in one ledger call: spent, and left after calls in flight."""
        account = await self.ledger.call.remote("account", BUDGET_PREFIX + name)
        budget = account["budget"]
        held = account["queries"] + account["reserved"]
        return {**account, "left": None if budget is None else budget - held}

    async def usage(self, name: str) -> dict[str, Any]:
        await self._ensure_ready()
        standing = await self._standing(name)
        state = self._state[name]
        return {
            "key": name,
            "budget": self.keys[name].budget,
            "queries_used": standing["queries"],
            "queries_left": standing["left"],
            "calls": standing["calls"],
            "image_sets": len(state.image_sets),
            "images_registered": state.images,
        }

    async def phrase_embeddings(self, fields: dict[str, Any]) -> dict[str, Any]:
        phrase = fields.get("phrase")
        if not isinstance(phrase, str):
            raise RequestError(422, "phrase must be a string")
        try:
            array = await self.oracle.phrase_embeddings.remote(phrase)
        except Exception as error:
            mapped = _user_error(error)
            if mapped is None:
                raise
            raise mapped from None
        return {"embeddings": encode_array(np.asarray(array), bool(fields.get("binary")))}

    async def register(self, name: str, images: list[bytes]) -> dict[str, Any]:
        import ray

        if not images:
            raise RequestError(422, "images is empty: send at least one image")
        if len(images) > MAX_IMAGES_PER_SET:
            raise RequestError(413, f"at most {MAX_IMAGES_PER_SET} images a set")
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(decode_image(data))
            except RequestError as error:  # say which image of the set
                raise RequestError(error.status, f"images[{i}]: {error}") from None
        shape = pixels[0].shape
        for i, image in enumerate(pixels):
            if image.shape != shape:
                raise RequestError(
                    422,
                    f"images[{i}] is {image.shape[1]}x{image.shape[0]} but images[0] is "
                    f"{shape[1]}x{shape[0]}: one set holds images of one size (resize them first)",
                )
        image_set = ImageSet(np.stack(pixels), {"dataset": "http", "key": name})
        ref = image_set.ref
        state = self._state[name]
        if ref.id not in state.image_sets:
            limit = self.keys[name].max_images
            if state.images + ref.size > limit:
                raise RequestError(
                    413,
                    f"key {name!r} may register {limit} images in all; "
                    f"{state.images} are registered and this set has {ref.size}",
                )
            state.image_sets[ref.id] = {
                "id": ref.id,
                "size": ref.size,
                "meta": image_set.meta,
                "pixels": [ray.put(image_set.pixels)],  # boxed: Serve must not resolve it
            }
            state.images += ref.size
        return {"image_set": ref.id, "size": ref.size}

    async def logits(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
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
                f"unknown image set {fields['image_set']!r}: register it with "
                "POST /v1/oracle/image-sets first (sets are private to each key)",
                kind="KeyError",
            )
        contexts, binary = decode_array(fields["contexts"], "contexts")
        try:
            contexts_t = validate_contexts(contexts, _Metadata.of(described))
            names = validate_class_names(fields["class_names"])
            index = validate_indices(fields.get("indices"), box["size"])
        except (ValueError, TypeError) as error:
            raise RequestError(422, str(error), kind=type(error).__name__) from None
        population = contexts_t.shape[0]
        n_images = box["size"] if index is None else len(index)
        if population * n_images * len(names) > MAX_LOGITS:
            raise RequestError(
                413,
                f"{population} x {n_images} x {len(names)} logits is over {MAX_LOGITS}: "
                "score fewer images a call with `indices`",
            )

        account = BUDGET_PREFIX + name
        status, reservation = await self.ledger.reserve.remote(account, population)
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
            out = await self.oracle.logits.remote(
                contexts_t.numpy(), names, box, None if index is None else index.numpy()
            )
        except Exception as error:
            await self.ledger.call.remote("release", reservation)
            mapped = _user_error(error)
            if mapped is not None:
                raise mapped from None
            raise RequestError(503, "the oracle failed; nothing was charged, retry") from None
        await self.ledger.call.remote(
            "commit",
            reservation,
            images_scored=population * n_images,
            prompts_encoded=population * len(names),
            wall_seconds=time.perf_counter() - started,
        )
        standing = await self._standing(name)
        return {
            "logits": encode_array(out, binary),
            "shape": list(out.shape),
            "queries": population,
            "queries_used": standing["queries"],
            "queries_left": standing["left"],
            "backend": described["backend"],
            "model": described["model"],
        }


class _Metadata:
    """Just what :func:`validate_contexts` reads, from a replica's ``describe``."""

    def __init__(self, token_dim: int, display_name: str) -> None:
        self.token_dim = token_dim
        self.display_name = display_name

    @classmethod
    def of(cls, described: dict[str, Any]) -> Any:
        return cls(described["token_dim"], f"{described['backend']} {described['model']}")
