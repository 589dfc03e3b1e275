"""The oracle pool's client: :class:`PoolOracle`, itself an :class:`~vlmlab.oracle.Oracle`.

It checks input, reserves the call's queries on the ledger actor, sends the
population as one request (several concurrent requests, one per shard, when
the population is larger than ``shard_size``), commits when the logits return,
and releases and retries on another replica when a replica dies mid-request
(:func:`replica_failure` names the failures a retry can cure).

Apart from :mod:`vlmlab.pool._replica` (the code inside a replica) and
:mod:`vlmlab.pool._pool` (deploying the app): this runs in the caller's
process (a driver, a trial, a Ray worker it was pickled to).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmlab.oracle import (
    DEFAULT_BUDGET_KEY,
    ImageSet,
    ImageSetRef,
    OracleMetadata,
    check_call,
    image_set_ref,
    metered,
)
from vlmlab.pool._ledger import RemoteLedger
from vlmlab.pool._ray import ensure_ray

log = logging.getLogger(__name__)

DEFAULT_APP = "vlmlab-oracle"


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
