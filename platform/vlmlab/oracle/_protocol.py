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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from vlmlab.ledger import Ledger


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


@runtime_checkable
class PixelSource(Protocol):
    """Pixels that need not be in memory: a lazy ``N x H x W x 3`` uint8 array.

    What :class:`ImageSet` takes besides a NumPy array, so a large folder of
    photos is decoded batch by batch while an oracle encodes it (peak memory
    grows with the batch, not the set). ``source[i:j]`` and ``source[rows]``
    (an integer array) return the rows as a uint8 NumPy array.

    A source may also offer ``fingerprint() -> str | None``: a string that
    identifies its pixels cheaply (for image files: a digest of each file's
    bytes and the crop size). The set's content hash is then taken over it and
    the shape, so registering the same folder again finds its cached features
    without decoding an image. Without one (or when it returns None) the
    pixels are hashed chunk by chunk, which gives the hash the same pixels
    have as a NumPy array.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> np.ndarray: ...


HASH_CHUNK_BYTES = 64 << 20
"""A lazy source without a fingerprint is hashed in chunks of about this many bytes."""


def pixel_batches(pixels: np.ndarray | PixelSource, batch_size: int) -> Iterator[np.ndarray]:
    """``pixels`` as consecutive uint8 NumPy batches of at most ``batch_size`` rows.

    An array is sliced (views, no copy); a lazy source decodes one batch at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(pixels), batch_size):
        yield np.asarray(pixels[start : start + batch_size])


def _shape(pixels: np.ndarray | PixelSource) -> tuple[int, ...]:
    return tuple(int(side) for side in pixels.shape)


@dataclass(frozen=True)
class ImageSet:
    """Pixels to register with an oracle, plus where they came from.

    ``pixels`` is a uint8 array ``N x H x W x 3``, or a lazy
    :class:`PixelSource` of that shape that in-process oracles decode batch by
    batch. ``meta`` (dataset, split, indices, ...) names the set in cache files
    and reports; the content hash alone identifies it.
    """

    pixels: np.ndarray | PixelSource
    meta: dict[str, Any] = field(default_factory=dict)
    _lazy_hash: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) and not isinstance(pixels, PixelSource):
            raise TypeError(
                "ImageSet.pixels must be a numpy array or a vlmlab.oracle.PixelSource, "
                f"got {type(pixels).__name__}"
            )
        shape = _shape(pixels)
        if np.dtype(pixels.dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                "ImageSet.pixels must be uint8 with shape (N, H, W, 3); "
                f"got dtype {pixels.dtype} and shape {shape}"
            )
        if len(pixels) == 0:
            raise ValueError("ImageSet.pixels holds no images")
        if len(pixels) != shape[0]:
            raise ValueError(f"ImageSet.pixels: length {len(pixels)} but shape {shape}")

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def is_lazy(self) -> bool:
        """Whether the pixels are a lazy source (decoded on demand), not an array."""
        return not isinstance(self.pixels, np.ndarray)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The pixels in consecutive NumPy batches (a lazy source decodes one at a time)."""
        return pixel_batches(self.pixels, batch_size)

    def materialized(self) -> ImageSet:
        """This set with its pixels in one NumPy array (itself when they already are).

        Its content hash is the pixels' own, which for a fingerprinted lazy
        source differs from the lazy set's: clients that ship pixels to a server
        that hashes them (the Serve pool, the HTTP client) register this.
        """
        if isinstance(self.pixels, np.ndarray):
            return self
        return ImageSet(np.asarray(self.pixels[0 : len(self.pixels)]), self.meta)

    @property
    def content_hash(self) -> str:
        pixels = self.pixels
        if isinstance(pixels, np.ndarray):  # unchanged: existing feature caches stay valid
            digest = hashlib.sha256()
            digest.update(str(pixels.shape).encode())
            digest.update(np.ascontiguousarray(pixels).data)
            return digest.hexdigest()[:32]
        if self._lazy_hash is None:  # a lazy source is hashed once (it may read many files)
            object.__setattr__(self, "_lazy_hash", _lazy_content_hash(pixels))
        assert self._lazy_hash is not None
        return self._lazy_hash

    @property
    def ref(self) -> ImageSetRef:
        return ImageSetRef(self.content_hash, len(self))


def _lazy_content_hash(pixels: PixelSource) -> str:
    shape = _shape(pixels)
    fingerprint = getattr(pixels, "fingerprint", None)
    identity = fingerprint() if callable(fingerprint) else None
    digest = hashlib.sha256()
    if identity is not None:
        # Prefixed, so it can never collide with an array's hash (which starts with the shape).
        digest.update(f"fingerprint{shape}".encode())
        digest.update(str(identity).encode())
        return digest.hexdigest()[:32]
    # Streamed: the same bytes in the same order as an array's hash, so the same value.
    digest.update(str(shape).encode())
    row_bytes = max(1, int(np.prod(shape[1:])))
    for batch in pixel_batches(pixels, max(1, HASH_CHUNK_BYTES // row_bytes)):
        digest.update(np.ascontiguousarray(batch, dtype=np.uint8).data)
    return digest.hexdigest()[:32]


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
