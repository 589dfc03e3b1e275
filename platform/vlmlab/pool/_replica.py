"""One replica of the oracle pool: the class that Serve deploys, and its batching settings.

:class:`OracleReplica` builds one backend in ``__init__`` and answers whole
populations; with batching on it computes the populations of concurrent
requests (several trials) in one text-tower pass
(:class:`~vlmlab.pool.MicroBatcher`). Image sets arrive as a reference into
Ray's object store; each replica fetches and encodes a set the first time a
request names it, then keeps the features (and the on-disk feature cache spares
the other replicas on the same machine the encoding).

Apart from :mod:`vlmlab.pool._pool` (which wraps this class in a Serve
deployment and deploys it) and from :mod:`vlmlab.pool._client` (the caller's
side): this is the code that runs inside a replica process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmlab.errors import LimitExceededError
from vlmlab.oracle import (
    DEFAULT_BUDGET_KEY,
    ImageSet,
    LogitsRequest,
    scoped_image_set_id,
)
from vlmlab.pool._batching import MicroBatcher

SERVED_FEATURE_BYTES = 1 << 30
"""Image features a replica holds for the HTTP service's keys (least recently used
dropped beyond it; a dropped set is encoded again when next scored)."""


def batching_settings(batching: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"max_requests": n, "wait_ms": w}`` checked (None or ``max_requests`` 1: off)."""
    if not batching:
        return None
    unknown = set(batching) - {"max_requests", "wait_ms"}
    if unknown:
        raise ValueError(
            f"unknown batching settings {sorted(unknown)}; known: max_requests, wait_ms"
        )
    max_requests = batching.get("max_requests", 8)
    wait_ms = batching.get("wait_ms", 2.0)
    if not isinstance(max_requests, int) or max_requests < 1:
        raise ValueError(f"batching max_requests must be an int >= 1, got {max_requests!r}")
    if not isinstance(wait_ms, int | float) or wait_ms < 0:
        raise ValueError(f"batching wait_ms must be non-negative milliseconds, got {wait_ms!r}")
    if max_requests == 1:
        return None
    return {"max_requests": max_requests, "wait_ms": float(wait_ms)}


class OracleReplica:
    """One replica of the pool: a backend, its image features, whole-population calls.

    ``batching`` (``{"max_requests": 8, "wait_ms": 2}``): concurrent requests are
    computed together, up to ``max_requests`` at a time, a request waiting at
    most ``wait_ms`` for company. None computes each request alone.
    """

    def __init__(
        self,
        backend: str = "conse",
        backend_kwargs: dict[str, Any] | None = None,
        torch_threads: int | None = None,
        batching: dict[str, Any] | None = None,
    ) -> None:
        from vlmlab.oracle import create_oracle

        self.backend = backend
        self.oracle = create_oracle(backend, **(backend_kwargs or {}))
        self.served_feature_bytes = SERVED_FEATURE_BYTES
        self._scoped: OrderedDict[str, int] = OrderedDict()  # served keys' sets, LRU first
        # Every call computes on this one thread: torch's OpenMP team stays warm on it.
        # torch_threads pins its thread count (default: Ray's, from the replica's CPUs);
        # floats can depend on it, so matching a client's count makes results equal bit for bit.
        threads = torch_threads
        self._compute = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="oracle",
            initializer=(lambda: torch.set_num_threads(threads)) if threads else None,
        )
        settings = batching_settings(batching)
        self._batcher: MicroBatcher[tuple[Any, ...], np.ndarray] | None = None
        if settings is not None:
            self._batcher = MicroBatcher(
                self._logits_many,
                self._compute,
                max_requests=settings["max_requests"],
                wait_s=settings["wait_ms"] / 1000,
            )

    def describe(self) -> dict[str, Any]:
        meta = self.oracle.metadata
        return {
            "backend": meta.backend,
            "model": meta.model,
            "token_dim": meta.token_dim,
            "context_length": meta.context_length,
            "embedding_mean": meta.embedding_mean.numpy(),
            "embedding_std": meta.embedding_std,
        }

    def phrase_embeddings(self, phrase: str, max_tokens: int | None = None) -> np.ndarray:
        """``max_tokens`` (a served key's limit) refuses a longer phrase before embedding it."""
        return self.oracle.phrase_embeddings(phrase, max_tokens=max_tokens).numpy()

    def check_names(self, names: list[str], n_context: int, max_tokens: int | None) -> None:
        """Refuse class names with more than ``max_tokens`` tokens, or whose prompt cannot fit.

        A served call runs this once before it is split into chunks, so a name
        that would fail in a late chunk refuses the whole call before any work.
        """
        if max_tokens is not None:
            for name, count in zip(names, self.oracle.count_tokens(names), strict=True):
                if count > max_tokens:
                    shown = name if len(name) <= 40 else name[:40] + "..."
                    raise LimitExceededError(
                        "max_tokens", count, max_tokens, f"tokens in class name {shown!r}"
                    )
        self.oracle.check_class_names(names, n_context=n_context)

    async def logits(
        self,
        contexts: np.ndarray,
        class_names: list[str],
        image_set: dict[str, Any],
        indices: np.ndarray | None,
    ) -> np.ndarray:
        request = (contexts, class_names, image_set, indices)
        if self._batcher is not None:
            return await self._batcher.submit(request)
        loop = asyncio.get_running_loop()
        alone = await loop.run_in_executor(self._compute, self._logits_many, [request])
        return alone[0]  # one request is the oracle's logits call itself

    def forget_image_sets(self, set_ids: Sequence[str]) -> int:
        """Drop these scoped sets' features (a key deleted them); how many were held here."""
        dropped = 0
        for set_id in set_ids:
            if self._scoped.pop(set_id, None) is not None:
                dropped += self.oracle.forget_image_set(set_id)
        return dropped

    def _ensure_image_set(self, image_set: dict[str, Any]) -> str:
        """The id to compute on; a set of a served key (``scope``) is held under its own id.

        Sets of served keys are held within :data:`SERVED_FEATURE_BYTES`, the least
        recently used dropped first; a set its key deletes is dropped at once
        (:meth:`forget_image_sets`, broadcast to every replica).
        """
        scope = image_set.get("scope")
        set_id: str = image_set["id"]
        if scope is not None:
            set_id = scoped_image_set_id(scope, set_id)
        if not self.oracle.has_image_set(set_id):
            import ray

            pixels = ray.get(
                image_set["pixels"][0]
            )  # the boxed ObjectRef, fetched once per replica
            self.oracle.register_images(ImageSet(pixels, image_set["meta"]), scope=scope)
            if scope is not None:
                self._scoped[set_id] = self.oracle.image_features(set_id).nbytes
        if scope is not None:
            self._scoped.move_to_end(set_id)
        return set_id

    def _trim_scoped(self, keep: set[str]) -> None:
        """Hold served keys' features within the bound, dropping the least recently used."""
        while sum(self._scoped.values()) > self.served_feature_bytes:
            oldest = next((i for i in self._scoped if i not in keep), None)
            if oldest is None:
                return
            del self._scoped[oldest]
            self.oracle.forget_image_set(oldest)

    def _logits_many(self, requests: list[tuple[Any, ...]]) -> list[np.ndarray]:
        calls = [
            LogitsRequest(
                # Ray hands arrays over read-only; torch wants to own writable memory.
                torch.from_numpy(np.require(contexts, requirements="W")),
                names,
                self._ensure_image_set(image_set),
                indices,
            )
            for contexts, names, image_set, indices in requests
        ]
        outputs = [out.numpy() for out in self.oracle.logits_many(calls)]
        self._trim_scoped({c.image_set for c in calls if isinstance(c.image_set, str)})
        return outputs

    def stats(self) -> dict[str, Any]:
        import resource

        import ray

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "image_sets": self.oracle.image_set_count,
            "queries": self.oracle.ledger.usage(DEFAULT_BUDGET_KEY).queries,
            "torch_threads": torch.get_num_threads(),
            "busy_seconds": self.oracle.ledger.usage(DEFAULT_BUDGET_KEY).wall_seconds,
            "batching": None if self._batcher is None else self._batcher.stats.as_dict(),
        }
