"""Shared machinery of in-process oracles: validation, ledger, image registry.

A backend implements four hooks (image encoder, population text encoder, suffix
token counts, metadata); :class:`LocalOracle` wraps them in the contract's
guarantees: every check runs before the budget is reserved, the budget is
reserved before any work, and a failure releases the reservation.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from vlmlab.oracle._cache import FeatureCache
from vlmlab.oracle._ledger import DEFAULT_BUDGET_KEY, QueryLedger
from vlmlab.oracle._protocol import ImageSet, ImageSetRef, OracleMetadata


class LocalOracle(ABC):
    """Base of the in-process backends (see :class:`vlmlab.oracle.Oracle`).

    Args:
        cache_dir: root of the on-disk feature cache (default ``$VLMLAB_CACHE_DIR``
            or ``~/.cache/vlmlab``).
        disk_cache: set False to keep features in memory only.
        ledger: share a ledger between oracles (a new one by default).

    Thread safety: ``logits`` may be called from several threads; the ledger
    keeps counts exact, and registration is serialized by a lock.
    """

    def __init__(
        self,
        *,
        cache_dir: str | None = None,
        disk_cache: bool = True,
        ledger: QueryLedger | None = None,
    ) -> None:
        self._ledger = ledger if ledger is not None else QueryLedger()
        self._cache = FeatureCache(cache_dir) if disk_cache else None
        self._features: dict[str, torch.Tensor] = {}
        self._register_lock = threading.Lock()

    # ----------------------------------------------------------------- hooks
    @property
    @abstractmethod
    def metadata(self) -> OracleMetadata: ...

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """Multiplier of the cosine similarities."""

    @abstractmethod
    def phrase_embeddings(self, phrase: str) -> torch.Tensor: ...

    @abstractmethod
    def _encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """Unit-norm image features ``N x E`` (float32, CPU) of uint8 pixels."""

    @abstractmethod
    def _suffix_token_counts(self, class_names: Sequence[str]) -> list[int]:
        """Tokens each class adds after the contexts (end token included)."""

    @abstractmethod
    def _encode_population(
        self, contexts: torch.Tensor, class_names: Sequence[str]
    ) -> torch.Tensor:
        """Unit-norm text features ``P x C x E`` (float32, CPU)."""

    def _logit_bias(self) -> float:
        return 0.0

    # ------------------------------------------------------------- contract
    @property
    def ledger(self) -> QueryLedger:
        return self._ledger

    def register_images(self, images: ImageSet) -> ImageSetRef:
        if not isinstance(images, ImageSet):
            raise TypeError(
                f"register_images expects a vlmlab.oracle.ImageSet, got {type(images).__name__}"
            )
        ref = images.ref
        with self._register_lock:
            if ref.id in self._features:
                return ref
            meta = self.metadata
            features = None
            path = None
            if self._cache is not None:
                path = self._cache.path(meta.backend, meta.model, ref.id, images.meta)
                cached = self._cache.load(path)
                if cached is not None and cached.shape[0] == ref.size:
                    features = torch.from_numpy(cached)
            if features is None:
                features = self._encode_images(images.pixels).float().cpu().contiguous()
                if self._cache is not None and path is not None:
                    self._cache.store(path, features.numpy())
            self._features[ref.id] = features
        return ref

    def image_features(self, image_set: ImageSetRef | str) -> torch.Tensor:
        """Cached features of a registered set (used by tests and benchmarks)."""
        return self._features[self._resolve_image_set(image_set)]

    def logits(
        self,
        contexts: torch.Tensor,
        class_names: Sequence[str],
        image_set: ImageSetRef | str,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        budget_key: str = DEFAULT_BUDGET_KEY,
    ) -> torch.Tensor:
        contexts = self._validate_contexts(contexts)
        names = self._validate_class_names(class_names, n_context=contexts.shape[1])
        set_id = self._resolve_image_set(image_set)
        features = self._features[set_id]
        index = self._validate_indices(indices, len(features))
        population = contexts.shape[0]
        n_images = len(features) if index is None else len(index)

        reservation = self._ledger.reserve(budget_key, population)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                text = self._encode_population(contexts, names)
                image = features if index is None else features[index]
                scores = torch.einsum("ne,pce->pnc", image, text) * self.logit_scale
                scores = scores + self._logit_bias()
        except BaseException:
            self._ledger.release(reservation)
            raise
        self._ledger.commit(
            reservation,
            images_scored=population * n_images,
            prompts_encoded=population * len(names),
            wall_seconds=time.perf_counter() - started,
        )
        return scores

    # ------------------------------------------------------------ validation
    def _validate_contexts(self, contexts: torch.Tensor) -> torch.Tensor:
        if isinstance(contexts, np.ndarray):
            contexts = torch.from_numpy(contexts)
        if not isinstance(contexts, torch.Tensor):
            raise TypeError(
                f"contexts must be a torch.Tensor or numpy array, got {type(contexts).__name__}"
            )
        dim = self.metadata.token_dim
        if contexts.ndim != 3:
            raise ValueError(
                f"contexts must have shape (population, context tokens, {dim}); "
                f"got shape {tuple(contexts.shape)}"
            )
        population, n_context, width = contexts.shape
        if width != dim:
            raise ValueError(
                f"contexts have token dimension {width}, but {self.metadata.display_name} "
                f"takes token embeddings of dimension {dim}"
            )
        if population == 0 or n_context == 0:
            raise ValueError(
                f"contexts must hold at least one candidate and one context token; "
                f"got shape {tuple(contexts.shape)}"
            )
        if not contexts.is_floating_point():
            raise TypeError(f"contexts must be floating point, got dtype {contexts.dtype}")
        finite = torch.isfinite(contexts)
        if not bool(finite.all()):
            bad = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"contexts contain {int((~finite).sum())} NaN/inf values "
                f"(candidates {bad[:10]}{'...' if len(bad) > 10 else ''})"
            )
        return contexts.detach().to(torch.float32).cpu()

    def _validate_class_names(self, class_names: Sequence[str], *, n_context: int) -> list[str]:
        if isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise TypeError(
                f"class_names must be a sequence of strings, got {type(class_names).__name__}"
            )
        names = list(class_names)
        if not names:
            raise ValueError("class_names is empty: give at least one class name")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"class_names[{i}] must be a non-empty string, got {name!r}")
        counts = self._suffix_token_counts(names)
        longest = max(range(len(names)), key=counts.__getitem__)
        limit = self.metadata.context_length
        if 1 + n_context + counts[longest] > limit:
            raise ValueError(
                f"prompt too long: 1 start token + {n_context} context tokens + "
                f"{counts[longest]} tokens of class {names[longest]!r} exceed the text tower's "
                f"context length {limit}; use at most {limit - 1 - counts[longest]} context tokens"
            )
        return names

    def _resolve_image_set(self, image_set: ImageSetRef | str) -> str:
        set_id = image_set.id if isinstance(image_set, ImageSetRef) else image_set
        if not isinstance(set_id, str):
            raise TypeError(
                f"image_set must be an ImageSetRef or its id string, got {type(image_set).__name__}"
            )
        if set_id not in self._features:
            known = ", ".join(sorted(self._features)) or "none"
            raise KeyError(
                f"unknown image set {set_id!r}: register it with register_images() first "
                f"(registered: {known})"
            )
        return set_id

    @staticmethod
    def _validate_indices(
        indices: Sequence[int] | np.ndarray | None, size: int
    ) -> torch.Tensor | None:
        if indices is None:
            return None
        index = torch.as_tensor(np.asarray(indices))
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(
                f"indices must be a non-empty 1-D sequence, got shape {tuple(index.shape)}"
            )
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got dtype {index.dtype}")
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            raise ValueError(
                f"indices out of range for an image set of {size} images: min {low}, max {high}"
            )
        return index.long()


def embedding_table_stats(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean vector and overall std of a token-embedding table (public metadata)."""
    table = table.detach().float()
    std = float(table.std())
    if not math.isfinite(std):
        raise ValueError("token-embedding table holds non-finite values")
    return table.mean(dim=0).cpu(), std
