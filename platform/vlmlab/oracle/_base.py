"""Shared machinery of in-process oracles: validation, ledger, image registry.

A backend implements four hooks (image encoder, population text encoder, suffix
token counts, metadata); :class:`LocalOracle` wraps them in the contract's
guarantees: every check runs before the budget is reserved, the budget is
reserved before any work, and a failure releases the reservation.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from vlmlab.oracle._cache import FeatureCache
from vlmlab.oracle._ledger import DEFAULT_BUDGET_KEY, QueryLedger, metered
from vlmlab.oracle._protocol import ImageSet, ImageSetRef, OracleMetadata
from vlmlab.oracle._validation import (
    check_prompt_length,
    image_set_id,
    image_set_ref,
    unknown_image_set,
    validate_class_names,
    validate_contexts,
    validate_indices,
)


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
        self._suffix_cache: dict[str, list[int]] = {}
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
    def _token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens, never truncated."""

    @property
    @abstractmethod
    def _end_token(self) -> int:
        """The id that ends a prompt ([EOS] for CLIP, [SEP] for BERT)."""

    @abstractmethod
    def _embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """Rows of the token-embedding table for ``ids`` (float32, CPU)."""

    def _suffix(self, name: str) -> list[int]:
        """What follows the contexts for one class: ``<name tokens> . <end>`` (memoized)."""
        suffix = self._suffix_cache.get(name)
        if suffix is None:
            suffix = [*self._token_ids(f"{name}."), self._end_token]
            self._suffix_cache[name] = suffix
        return suffix

    def _suffix_token_counts(self, class_names: Sequence[str]) -> list[int]:
        return [len(self._suffix(name)) for name in class_names]

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        ids = self._token_ids(phrase)
        if not ids:
            raise ValueError(f"phrase {phrase!r} has no tokens")
        with torch.inference_mode():
            return self._embed_tokens(ids).float().cpu().clone()

    @abstractmethod
    def _encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        """Unit-norm image features ``N x E`` (float32, CPU) of uint8 pixels."""

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
        ref = image_set_ref(images)
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
        contexts = validate_contexts(contexts, self.metadata)
        names = self._validate_class_names(class_names, n_context=contexts.shape[1])
        set_id = self._resolve_image_set(image_set)
        features = self._features[set_id]
        index = validate_indices(indices, len(features))
        population = contexts.shape[0]
        n_images = len(features) if index is None else len(index)

        with (
            metered(
                self._ledger,
                budget_key,
                queries=population,
                images_scored=population * n_images,
                prompts_encoded=population * len(names),
            ),
            torch.inference_mode(),
        ):
            text = self._encode_population(contexts, names)
            image = features if index is None else features[index]
            scores = torch.einsum("ne,pce->pnc", image, text) * self.logit_scale
            scores = scores + self._logit_bias()
        return scores

    # ------------------------------------------------------------ validation
    def _validate_class_names(self, class_names: Sequence[str], *, n_context: int) -> list[str]:
        names = validate_class_names(class_names)
        check_prompt_length(
            names, self._suffix_token_counts(names), n_context, self.metadata.context_length
        )
        return names

    def _resolve_image_set(self, image_set: ImageSetRef | str) -> str:
        set_id = image_set_id(image_set)
        if set_id not in self._features:
            raise unknown_image_set(set_id, self._features)
        return set_id


def embedding_table_stats(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean vector and overall std of a token-embedding table (public metadata)."""
    table = table.detach().float()
    std = float(table.std())
    if not math.isfinite(std):
        raise ValueError("token-embedding table holds non-finite values")
    return table.mean(dim=0).cpu(), std
