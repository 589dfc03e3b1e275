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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlmlab.errors import LimitExceededError
from vlmlab.ledger import DEFAULT_BUDGET_KEY, QueryLedger, Reservation
from vlmlab.oracle._cache import FeatureCache
from vlmlab.oracle._protocol import ImageSet, ImageSetRef, OracleMetadata, PixelSource
from vlmlab.oracle._validation import (
    check_prompt_length,
    image_set_id,
    image_set_ref,
    scoped_image_set_id,
    unknown_image_set,
    validate_class_names,
    validate_contexts,
    validate_indices,
)


@dataclass(frozen=True)
class FineTunableText:
    """A private, trainable copy of a backend's text side (white-box methods only).

    ``tower`` maps prompt strings to pooled text features ``N x W`` (before the
    projection); ``projection`` is the ``W x E`` matrix onto the image-feature
    space (CLIP's ``text_projection``; an identity where the backend has none).
    Training either never touches the backend's own weights.
    """

    tower: nn.Module
    projection: torch.Tensor


@dataclass(frozen=True)
class FineTunableImage:
    """A private, trainable copy of a backend's image tower (white-box methods only).

    ``tower`` maps the float batch ``preprocess`` makes of uint8 ``N x H x W x 3``
    pixels to image features ``N x E`` (not yet unit-norm), as the backend's own
    encoder does before its cache. Training it never touches the backend's weights.
    """

    tower: nn.Module
    preprocess: Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class LogitsRequest:
    """One ``logits`` call's arguments, for :meth:`LocalOracle.logits_many`."""

    contexts: torch.Tensor
    class_names: Sequence[str]
    image_set: ImageSetRef | str
    indices: Sequence[int] | np.ndarray | None = None
    budget_key: str = DEFAULT_BUDGET_KEY


@dataclass(frozen=True)
class _Prepared:
    contexts: torch.Tensor
    names: list[str]
    image: torch.Tensor
    budget_key: str

    @property
    def charges(self) -> dict[str, int]:
        population = self.contexts.shape[0]
        return {
            "queries": population,
            "images_scored": population * len(self.image),
            "prompts_encoded": population * len(self.names),
        }


class LocalOracle(ABC):
    """Base of the in-process backends (see :class:`vlmlab.oracle.Oracle`).

    Beyond the black-box contract, an in-process backend offers what serving,
    white-box methods and the Serve pool need from it, as public capability:
    :meth:`encode_images`, :meth:`class_embeddings`, :meth:`image_features`,
    :meth:`has_image_set`, :meth:`text_tower`, :attr:`logit_scale`,
    :attr:`logit_bias` and :attr:`device`. None of them is metered: they are
    the model owner's view, never a black-box user's.

    Args:
        cache_dir: root of the on-disk feature cache (default ``$VLMLAB_CACHE_DIR``
            or ``~/.cache/vlmlab``).
        disk_cache: set False to keep features in memory only.
        ledger: share a ledger between oracles (a new one by default).

    Thread safety: ``logits`` may be called from several threads; the ledger
    keeps counts exact, and registration is serialized by a lock.
    """

    device: torch.device = torch.device("cpu")
    """Where the backend's towers compute (backends set it in their constructor)."""

    SUFFIX_CACHE_SIZE = 65_536
    """Class names whose tokens are memoized; beyond it the oldest are dropped. Bounded
    because a served oracle sees whatever names its clients send, every call new ones."""

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
            if len(self._suffix_cache) >= self.SUFFIX_CACHE_SIZE:
                del self._suffix_cache[next(iter(self._suffix_cache))]  # oldest first
            self._suffix_cache[name] = suffix
        return suffix

    def _suffix_token_counts(self, class_names: Sequence[str]) -> list[int]:
        return [len(self._suffix(name)) for name in class_names]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens the model's tokenizer makes of each text (no start/end tokens).

        What a served oracle checks against a client's token limit before any work.
        """
        return [len(self._token_ids(text)) for text in texts]

    def phrase_embeddings(self, phrase: str, *, max_tokens: int | None = None) -> torch.Tensor:
        """Token embeddings of ``phrase``; ``max_tokens`` refuses a longer one before embedding."""
        ids = self._token_ids(phrase)
        if not ids:
            raise ValueError(f"phrase {phrase!r} has no tokens")
        if max_tokens is not None and len(ids) > max_tokens:
            raise LimitExceededError("max_tokens", len(ids), max_tokens, "tokens in the phrase")
        with torch.inference_mode():
            return self._embed_tokens(ids).float().cpu().clone()

    @abstractmethod
    def _encode_images(self, pixels: np.ndarray | PixelSource) -> torch.Tensor:
        """Unit-norm image features ``N x E`` (float32, CPU) of uint8 pixels.

        ``pixels`` may be a lazy source (a folder of photos decoded on demand):
        take it in batches (``vlmlab.oracle.pixel_batches``), never whole, so
        peak memory grows with the batch and not with the set.
        """

    @abstractmethod
    def _encode_population(
        self, contexts: torch.Tensor, class_names: Sequence[str]
    ) -> torch.Tensor:
        """Unit-norm text features ``P x C x E`` (float32, CPU)."""

    @property
    def logit_bias(self) -> float:
        """Added to every scaled similarity (SigLIP models have one; CLIP's is 0)."""
        return 0.0

    def text_tower(self) -> FineTunableText:
        """A trainable copy of the text side, for white-box methods (devsafety, CoOp)."""
        raise NotImplementedError(
            f"the {self.metadata.backend} backend offers no fine-tunable text tower"
        )

    def trainable_image_tower(self) -> FineTunableImage:
        """A trainable copy of the image tower, for white-box methods (devsafety ``full``)."""
        raise NotImplementedError(
            f"the {self.metadata.backend} backend offers no fine-tunable image tower; "
            "use an open_clip backend"
        )

    # --------------------------------------------------- owner's capabilities
    def encode_images(self, pixels: np.ndarray | PixelSource) -> torch.Tensor:
        """Unit-norm image features ``N x E`` (float32, CPU) of uint8 ``N x H x W x 3`` pixels
        (an array, or a lazy source that is decoded batch by batch)."""
        with torch.inference_mode():
            return self._encode_images(pixels).float().cpu()

    def class_embeddings(self, contexts: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Unit-norm class embeddings ``P x C x E`` of soft prompts (what ``logits`` scores)."""
        contexts = validate_contexts(contexts, self.metadata)
        names = self.check_class_names(class_names, n_context=contexts.shape[1])
        with torch.inference_mode():
            return self._encode_population(contexts, names)

    def differentiable_class_embeddings(
        self, contexts: torch.Tensor, class_names: Sequence[str]
    ) -> torch.Tensor:
        """:meth:`class_embeddings` with gradients to ``contexts`` (the model's weights stay frozen).

        For white-box reference methods (CoOp) that learn the same soft prompts
        by gradient: the same encoder, hence the same logits as the oracle's at
        equal contexts. Never exposed through the pool: a black box gives no gradients.
        """
        if not torch.is_floating_point(contexts) or contexts.dim() != 3:
            raise ValueError(
                f"contexts must be a float P x m x D tensor, got {tuple(contexts.shape)}"
            )
        if contexts.shape[2] != self.metadata.token_dim:
            raise ValueError(
                f"contexts have width {contexts.shape[2]}, the model's token width is "
                f"{self.metadata.token_dim}"
            )
        names = self.check_class_names(class_names, n_context=contexts.shape[1])
        return self._encode_population(contexts.float(), names)

    def has_image_set(self, image_set: ImageSetRef | str) -> bool:
        """Whether the set's features are held here (registered in this process)."""
        return image_set_id(image_set) in self._features

    @property
    def image_set_count(self) -> int:
        return len(self._features)

    # ------------------------------------------------------------- contract
    @property
    def ledger(self) -> QueryLedger:
        return self._ledger

    def register_images(self, images: ImageSet, *, scope: str | None = None) -> ImageSetRef:
        """Encode the set once and hold its features; returns the id calls name it by.

        ``scope`` (the served API key that owns the set): the features are held
        under :func:`scoped_image_set_id` and never read from or written to the
        disk cache, so one scope's work is never another's cache hit (the HTTP
        service: a key must not learn from a fast first call that another key
        registered the same images).
        """
        ref = image_set_ref(images)
        if scope is not None:
            ref = ImageSetRef(scoped_image_set_id(scope, ref.id), ref.size)
        with self._register_lock:
            if ref.id in self._features:
                return ref
            meta = self.metadata
            features = None
            path = None
            if self._cache is not None and scope is None:
                path = self._cache.path(meta.backend, meta.model, ref.id, images.meta)
                cached = self._cache.load(path)
                if cached is not None and cached.shape[0] == ref.size:
                    features = torch.from_numpy(cached)
            if features is None:
                # A lazy set is decoded batch by batch inside the backend's encoder; a
                # cache hit above never decodes it (its hash came from its fingerprint).
                features = self._encode_images(images.pixels).float().cpu().contiguous()
                if self._cache is not None and path is not None:  # never for a scoped set
                    self._cache.store(path, features.numpy())
            self._features[ref.id] = features
        return ref

    def forget_image_set(self, image_set: ImageSetRef | str) -> bool:
        """Drop a set's features from memory (its disk-cache entry stays); whether it was held."""
        with self._register_lock:
            return self._features.pop(image_set_id(image_set), None) is not None

    def image_features(self, image_set: ImageSetRef | str) -> torch.Tensor:
        """Cached features of a registered set (white-box methods train on them)."""
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
        request = LogitsRequest(contexts, class_names, image_set, indices, budget_key)
        return self.logits_many([request])[0]

    def logits_many(self, requests: Sequence[LogitsRequest]) -> list[torch.Tensor]:
        """The logits of several calls, their text passes stacked: what a replica does
        with concurrent requests of several trials (``vlmlab.pool`` batching).

        Each request is checked and metered as its own ``logits`` call (all are
        reserved before any work; a failure releases them all). Requests with the
        same class names and context length share one text-tower pass over their
        candidates stacked along the population axis, which is exact in
        principle (candidates never attend to each other) and equal within float
        tolerance in practice: a larger matrix product may sum in another order
        (``tests/pool/test_batching.py`` states the bound).
        """
        prepared: list[_Prepared] = []
        for request in requests:
            contexts = validate_contexts(request.contexts, self.metadata)
            names = self.check_class_names(request.class_names, n_context=contexts.shape[1])
            features = self._features[self._resolve_image_set(request.image_set)]
            index = validate_indices(request.indices, len(features))
            image = features if index is None else features[index]
            prepared.append(_Prepared(contexts, names, image, request.budget_key))
        reservations: list[Reservation] = []
        try:
            for call in prepared:
                reservations.append(self._ledger.reserve(call.budget_key, call.charges["queries"]))
            started = time.perf_counter()
            outputs = self._compute_many(prepared)
        except BaseException:
            for reservation in reservations:
                self._ledger.release(reservation)
            raise
        share = (time.perf_counter() - started) / max(1, len(prepared))
        for call, reservation in zip(prepared, reservations, strict=True):
            self._ledger.commit(
                reservation,
                images_scored=call.charges["images_scored"],
                prompts_encoded=call.charges["prompts_encoded"],
                wall_seconds=share,
            )
        return outputs

    def _compute_many(self, prepared: Sequence[_Prepared]) -> list[torch.Tensor]:
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, call in enumerate(prepared):
            groups.setdefault((tuple(call.names), call.contexts.shape[1]), []).append(i)
        texts: list[torch.Tensor | None] = [None] * len(prepared)
        with torch.inference_mode():
            for (names, _), members in groups.items():
                parts = [prepared[i].contexts for i in members]
                stacked = parts[0] if len(parts) == 1 else torch.cat(parts)  # alone: no copy
                text = self._encode_population(stacked, list(names))
                sizes = [prepared[i].contexts.shape[0] for i in members]
                for i, part in zip(members, torch.split(text, sizes), strict=True):
                    texts[i] = part
            outputs = []
            for call, computed in zip(prepared, texts, strict=True):
                assert computed is not None
                scores = torch.einsum("ne,pce->pnc", call.image, computed) * self.logit_scale
                outputs.append(scores + self.logit_bias)
        return outputs

    # ------------------------------------------------------------ validation
    def check_class_names(self, class_names: Sequence[str], *, n_context: int) -> list[str]:
        """The names as a list, if each is a non-blank string whose prompt fits the text tower.

        ``logits`` runs this first; a served oracle runs it alone, before a call
        is split into chunks, so a name that cannot fit refuses the whole call.
        """
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
