"""The black-box oracle contract every method is written against.

Lifecycle, as a method sees it:

1. The caller builds an oracle (``create_oracle``) and reads its public
   :class:`OracleMetadata`: token-embedding dimension, context length, the
   mean and std of the token-embedding table, and, through
   ``phrase_embeddings``, the token embeddings of a phrase (BBT and CraFT
   start prompts from them).
2. The caller registers each image set once (``register_images``). The oracle
   keeps its image features under the set's content hash; later calls name
   the set by its :class:`ImageSetRef`.
3. Each optimizer step sends a whole population in one ``logits`` call:
   contexts ``P x m x D``, the class names and an image set (optionally an
   index subset). It receives logits ``P x N x C`` and nothing else: no
   gradients, weights or hidden states cross the boundary.

Invariants every implementation keeps:

- One query is one candidate scored on one batch: a call costs ``P`` queries.
- A call is validated, and checked against its budget key, before any work;
  a refused or invalid call does no work and counts nothing.
- The same inputs give the same logits, whichever process or replica serves
  them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from vlmlab.oracle._ledger import Ledger


@dataclass(frozen=True)
class OracleMetadata:
    """What a black-box user may know about the model behind an oracle."""

    backend: str
    """Backend family: ``"open_clip"`` or ``"ConSE"``; shown in every report."""
    model: str
    """Model identifier within the backend (architecture and weights)."""
    token_dim: int
    """D, the dimension of one soft context token."""
    context_length: int
    """Longest token sequence the text tower takes (start and end tokens included)."""
    embedding_mean: torch.Tensor
    """Mean vector (D,) of the token-embedding table; BBF centres contexts here."""
    embedding_std: float
    """Standard deviation of all token-embedding table entries."""

    @property
    def display_name(self) -> str:
        return f"{self.backend} {self.model}"


@dataclass(frozen=True)
class ImageSetRef:
    """How calls name a registered image set: its content hash plus its size."""

    id: str
    size: int


@dataclass(frozen=True)
class ImageSet:
    """Pixels to register with an oracle, plus where they came from.

    ``pixels`` is a uint8 array ``N x H x W x 3``. ``meta`` (dataset, split,
    indices, ...) names the set in cache files and reports; the content hash
    alone identifies it.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray):
            raise TypeError(f"ImageSet.pixels must be a numpy array, got {type(pixels).__name__}")
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                "ImageSet.pixels must be uint8 with shape (N, H, W, 3); "
                f"got dtype {pixels.dtype} and shape {tuple(pixels.shape)}"
            )
        if len(pixels) == 0:
            raise ValueError("ImageSet.pixels holds no images")

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        digest.update(str(self.pixels.shape).encode())
        digest.update(np.ascontiguousarray(self.pixels).data)
        return digest.hexdigest()[:32]

    @property
    def ref(self) -> ImageSetRef:
        return ImageSetRef(self.content_hash, len(self))


@runtime_checkable
class Oracle(Protocol):
    """A black-box vision-language model: soft prompts in, logits out.

    Implementations: the in-process backends (``open_clip``, ``ConSE``,
    ``latency``), the Ray Serve pool's client (``vlmlab.pool.PoolOracle``) and
    the HTTP client (``vlmlab.serving.HttpOracle``). Methods never know which
    one they hold.
    """

    @property
    def metadata(self) -> OracleMetadata:
        """Public facts about the model (see :class:`OracleMetadata`)."""
        ...

    @property
    def ledger(self) -> Ledger:
        """Per-budget-key counts of queries, images scored, prompts and time."""
        ...

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        """Token embeddings ``(n_tokens, D)`` of ``phrase``, without start/end tokens."""
        ...

    def register_images(self, images: ImageSet) -> ImageSetRef:
        """Upload an image set once; its features are computed and cached.

        Registering costs no queries. Registering the same pixels again is free.
        """
        ...

    def logits(
        self,
        contexts: torch.Tensor,
        class_names: Sequence[str],
        image_set: ImageSetRef | str,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        budget_key: str = "default",
    ) -> torch.Tensor:
        """Score a population of prompts on an image set.

        Args:
            contexts: ``P x m x D`` soft context tokens, one prompt per candidate,
                shared by all classes (CoOp form: ``[SOS] ctx_1..ctx_m <class> .``).
            class_names: the C class names, in label order.
            image_set: a reference returned by ``register_images`` (or its id).
            indices: optional subset of the image set (a mini-batch).
            budget_key: the ledger account this call is charged to.

        Returns:
            Float32 logits ``P x N x C`` on the CPU.

        Raises:
            ValueError / TypeError / KeyError: malformed input, before any work.
            BudgetExceededError: the call would exceed ``budget_key``'s budget.
        """
        ...
