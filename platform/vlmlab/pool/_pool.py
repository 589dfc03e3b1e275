"""The oracle replica pool on Ray Serve, and its client (itself an Oracle).

- :class:`OracleReplica` is the Serve deployment: it builds one backend in
  ``__init__`` and answers whole populations; with batching on it computes the
  populations of concurrent requests (several trials) in one text-tower pass
  (:class:`~vlmlab.pool.MicroBatcher`). Image sets arrive as a
  reference into Ray's object store; each replica fetches and encodes a set
  the first time a request names it, then keeps the features (and the on-disk
  feature cache spares the other replicas on the same machine the encoding).
- :class:`PoolOracle` is the client. It checks input, reserves the call's
  queries on the ledger actor, sends the population as one request (several
  concurrent requests, one per shard, when the population is larger than
  ``shard_size``), commits when the logits return, and releases and retries on
  another replica when a replica dies mid-request.
- :func:`deploy_oracle_pool` deploys from Python; :func:`build_app` is the
  application builder that ``serve run serve/oracle.yaml`` calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
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
    ImageSetRef,
    LogitsRequest,
    OracleMetadata,
    check_call,
    image_set_ref,
    metered,
    scoped_image_set_id,
)
from vlmlab.pool._batching import MicroBatcher
from vlmlab.pool._ledger import RemoteLedger
from vlmlab.pool._ray import NAMESPACE, ensure_ray

log = logging.getLogger(__name__)

DEFAULT_APP = "vlmlab-oracle"
DEPLOYMENT = "OracleReplica"
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


def oracle_deployment(
    *,
    num_replicas: int | str = 1,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = 4,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
):
    from ray import serve

    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Workers' output reaches the driver (Ray's default): without this, every
        # generation's request would print an access-log line into the user's terminal.
        # Warnings and errors still do.
        "logging_config": {"enable_access_log": False},
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(name=DEPLOYMENT, **options)(OracleReplica)


def build_app(args: dict[str, Any]):
    """Application builder for Serve config files (``serve run serve/oracle.yaml``).

    ``args``: ``backend`` (default ``conse``), ``backend_kwargs``, ``torch_threads`` and
    ``batching`` (``{max_requests, wait_ms}``); replicas and resources come from the
    config file's ``deployments`` section (``max_ongoing_requests`` at least
    ``max_requests``, or batches cannot fill).
    """
    args = dict(args or {})
    backend = args.pop("backend", "conse")
    backend_kwargs = args.pop("backend_kwargs", None) or {}
    torch_threads = args.pop("torch_threads", None)
    batching = batching_settings(args.pop("batching", None))
    if args:
        raise ValueError(
            f"unknown oracle app arguments {sorted(args)}; "
            "known: backend, backend_kwargs, torch_threads, batching"
        )
    return oracle_deployment().bind(backend, backend_kwargs, torch_threads, batching)


def deploy_oracle_pool(
    backend: str = "conse",
    *,
    backend_kwargs: dict[str, Any] | None = None,
    num_replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = 4,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    app_name: str = DEFAULT_APP,
    address: str | None = None,
    shard_size: int = 64,
    torch_threads: int | None = None,
    batching: dict[str, Any] | None = None,
) -> PoolOracle:
    """Deploy (or update) the oracle pool as a Serve app and return a client for it.

    Args:
        backend: ``"conse"`` or ``"open_clip:<arch>"``; ``backend_kwargs`` go to it.
        num_replicas: fixed replica count (ignored when ``autoscaling`` is given,
            a Serve ``autoscaling_config`` such as ``{"min_replicas": 1, "max_replicas": 4}``).
        max_ongoing_requests: requests one replica works on at once.
        num_cpus, num_gpus: resources of each replica.
        address: Ray cluster to join (default: ``$RAY_ADDRESS`` or a local Ray).
        torch_threads: torch threads of each replica (default: its CPUs).
        batching: ``{"max_requests": n, "wait_ms": w}``: each replica computes up to
            n concurrent requests (several trials' populations) in one pass, a
            request waiting at most w ms for company; ``max_ongoing_requests``
            must be at least n. None: each request alone.
    """
    from ray import serve

    settings = batching_settings(batching)
    if settings is not None and max_ongoing_requests < settings["max_requests"]:
        raise ValueError(
            f"batching max_requests={settings['max_requests']} needs max_ongoing_requests >= "
            f"{settings['max_requests']} (got {max_ongoing_requests}): a replica batches only "
            "the requests it holds"
        )
    ensure_ray(address)
    serve.start(proxy_location="Disabled")
    app = oracle_deployment(
        num_replicas=num_replicas,
        autoscaling=autoscaling,
        max_ongoing_requests=max_ongoing_requests,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    ).bind(backend, backend_kwargs or {}, torch_threads, settings)
    serve.run(app, name=app_name, route_prefix=None)
    return PoolOracle(app_name, shard_size=shard_size)


class PoolOracle:
    """An :class:`~vlmlab.oracle.Oracle` served by a replica pool.

    Args:
        app_name: the Serve application to call.
        shard_size: populations larger than this go out as several concurrent
            requests (candidates are independent, so results do not change).
        retries: how many times a request is retried when its replica dies.

    It pickles as its app name, so Ray workers (trials, actors) can receive it.
    """

    def __init__(
        self,
        app_name: str = DEFAULT_APP,
        *,
        shard_size: int = 64,
        retries: int = 5,
        ledger: RemoteLedger | None = None,
    ) -> None:
        from ray import serve

        ensure_ray()
        self.app_name = app_name
        self.shard_size = shard_size
        self.retries = retries
        self._handle = serve.get_app_handle(app_name)
        self._ledger = ledger if ledger is not None else RemoteLedger()
        described = self._handle.describe.remote().result()
        self._metadata = OracleMetadata(
            backend=described["backend"],
            model=described["model"],
            token_dim=described["token_dim"],
            context_length=described["context_length"],
            embedding_mean=torch.from_numpy(np.array(described["embedding_mean"])),
            embedding_std=described["embedding_std"],
        )
        self._image_sets: dict[str, dict[str, Any]] = {}

    def __reduce__(self):
        return (_reconnect, (self.app_name, self.shard_size, self.retries))

    # -------------------------------------------------------------- contract
    @property
    def metadata(self) -> OracleMetadata:
        return self._metadata

    @property
    def ledger(self) -> RemoteLedger:
        return self._ledger

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self._call("phrase_embeddings", phrase)))

    def register_images(self, images: ImageSet) -> ImageSetRef:
        import ray

        # The pool sends pixels once through the object store, so a lazy set (a folder
        # decoded on demand) is materialized here; the id is then the pixels' own hash,
        # the one each replica computes when it registers them.
        images = images.materialized() if isinstance(images, ImageSet) else images
        ref = image_set_ref(images)
        if ref.id not in self._image_sets:
            # Pixels go to the object store once; replicas fetch them on first use.
            self._image_sets[ref.id] = {
                "id": ref.id,
                "size": ref.size,
                "meta": images.meta,
                "pixels": [ray.put(images.pixels)],  # boxed: Serve must not resolve it
            }
        return ref

    def logits(
        self,
        contexts: torch.Tensor,
        class_names: Sequence[str],
        image_set: ImageSetRef | str,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        budget_key: str = DEFAULT_BUDGET_KEY,
    ) -> torch.Tensor:
        sizes = {set_id: box["size"] for set_id, box in self._image_sets.items()}
        call = check_call(contexts, class_names, image_set, indices, self._metadata, sizes)
        box = self._image_sets[call.set_id]
        index_array = None if call.index is None else call.index.numpy()
        with metered(self._ledger, budget_key, **call.charges):
            array = call.contexts.numpy()
            step = self.shard_size
            shards = [array[i : i + step] for i in range(0, len(array), step)]
            outputs = self._fan_out(shards, call.names, box, index_array)
        return torch.from_numpy(np.concatenate(outputs, axis=0))

    # ------------------------------------------------------------- plumbing
    def _retrying(self) -> Any:
        """Retry a replica call on the failures a restarted replica cures, and only those.

        Bounded (``retries``), with exponential back-off (0.25 s doubling, at most
        2 s); a user's mistake (ValueError, TypeError, KeyError in the replica) and
        any other error are raised at once.
        """
        import tenacity

        def before_sleep(state: Any) -> None:
            log.warning(
                "oracle replica failed (%s); retrying (%d/%d)",
                state.outcome.exception(),
                state.attempt_number,
                self.retries,
            )

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(replica_failure),
            stop=tenacity.stop_after_attempt(self.retries + 1),
            wait=tenacity.wait_exponential(multiplier=0.25, max=2.0),
            before_sleep=before_sleep,
            reraise=True,
        )

    def _fan_out(self, shards, names, box, index_array) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(shards)

        def send_the_missing() -> list[np.ndarray]:
            pending = {
                i: self._handle.logits.remote(shard, names, box, index_array)
                for i, shard in enumerate(shards)
                if results[i] is None
            }
            failure: BaseException | None = None
            for i, response in pending.items():
                try:
                    results[i] = response.result()
                except Exception as error:
                    cause = _user_error(error)
                    if cause is not None:
                        raise cause from None
                    failure = error
            if failure is not None:
                raise failure  # the shards that were answered are kept for the next try
            return results  # type: ignore[return-value]

        try:
            return self._retrying()(send_the_missing)
        except Exception as error:
            if not replica_failure(error):
                raise
            raise RuntimeError(
                f"oracle pool {self.app_name!r}: request failed after {self.retries} retries"
            ) from error

    def _call(self, method: str, *args: Any) -> Any:
        def call() -> Any:
            try:
                return getattr(self._handle, method).remote(*args).result()
            except Exception as error:
                cause = _user_error(error)
                if cause is not None:
                    raise cause from None
                raise

        return self._retrying()(call)

    def replica_stats(self) -> dict[str, Any]:
        """Stats of whichever replica answers (pid, peak RSS, image sets)."""
        return self._call("stats")


def replica_failure(error: BaseException) -> bool:
    """Whether ``error`` is a replica, worker or node going away: what a retry can cure.

    Serve replaces a dead replica, so the same request on another (or the new)
    one succeeds; anything else (a bug, a user's mistake, a cancelled call)
    would fail the same way again.
    """
    import ray.exceptions
    from ray.serve import exceptions as serve_exceptions

    transient = (
        ray.exceptions.RayActorError,  # the replica died or is unreachable
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError,
        ray.exceptions.OwnerDiedError,
        serve_exceptions.BackPressureError,
        serve_exceptions.DeploymentUnavailableError,
        serve_exceptions.ReplicaUnavailableError,
    )
    return isinstance(error, transient)


def _user_error(error: BaseException) -> BaseException | None:
    """The user-facing exception inside a Ray task error, or None for system failures."""
    import ray.exceptions

    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, ValueError | TypeError | KeyError):
            return cause
    if isinstance(error, ValueError | TypeError | KeyError) and not isinstance(
        error, ray.exceptions.RayError
    ):
        return error
    return None


def _reconnect(app_name: str, shard_size: int, retries: int) -> PoolOracle:
    return PoolOracle(app_name, shard_size=shard_size, retries=retries)


__all__ = [
    "DEFAULT_APP",
    "NAMESPACE",
    "OracleReplica",
    "PoolOracle",
    "batching_settings",
    "build_app",
    "deploy_oracle_pool",
]
