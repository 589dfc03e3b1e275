"""A stand-in backend with no model: every call takes a fixed time, like a remote API.

``create_oracle("latency:50")`` answers each call after sleeping 50 ms, with
cheap deterministic logits that depend on the contexts. It isolates what the
platform adds — routing, the ledger, Serve's queues — from model compute, so
the scaling benchmark can measure orchestration efficiency on any machine.
Never a model: its results mean nothing.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlmlab.oracle._base import LocalOracle
from vlmlab.oracle._protocol import OracleMetadata, PixelSource, pixel_batches

TOKEN_DIM = 16
VOCABULARY = 4096


class LatencyOracle(LocalOracle):
    """Sleeps ``latency_ms`` per call; token embeddings and features are seeded noise."""

    def __init__(self, latency_ms: float = 50.0, **kwargs: Any) -> None:
        if not latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        kwargs.setdefault("disk_cache", False)
        super().__init__(**kwargs)
        self.latency = latency_ms / 1000.0
        generator = torch.Generator().manual_seed(0)
        self._table = torch.randn(VOCABULARY + 1, TOKEN_DIM, generator=generator)
        self._metadata = OracleMetadata(
            backend="latency",
            model=f"sleep-{latency_ms:g}ms",
            token_dim=TOKEN_DIM,
            context_length=77,
            embedding_mean=self._table.mean(0),
            embedding_std=float(self._table.std()),
        )

    @property
    def metadata(self) -> OracleMetadata:
        return self._metadata

    @property
    def logit_scale(self) -> float:
        return 10.0

    def _token_ids(self, text: str) -> list[int]:
        return [zlib.crc32(word.encode()) % VOCABULARY for word in text.split()]

    @property
    def _end_token(self) -> int:
        return VOCABULARY

    def _embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self._table[ids]

    def _encode_images(
        self, pixels: np.ndarray | PixelSource, batch_size: int = 256
    ) -> torch.Tensor:
        if isinstance(pixels, np.ndarray):  # in memory already: one pass, as it always was
            row_means = pixels.reshape(len(pixels), -1).mean(1, dtype=np.float64)
        else:  # a lazy set: decoded batch by batch
            row_means = np.concatenate(
                [
                    b.reshape(len(b), -1).mean(1, dtype=np.float64)
                    for b in pixel_batches(pixels, batch_size)
                ]
            )
        means = torch.from_numpy(row_means)
        phases = torch.arange(1, TOKEN_DIM + 1, dtype=torch.float64)
        return F.normalize(torch.sin(means[:, None] * phases).float(), dim=-1)

    def _encode_population(
        self, contexts: torch.Tensor, class_names: Sequence[str]
    ) -> torch.Tensor:
        time.sleep(self.latency)  # the whole cost of a call, as a remote model's would be
        names = torch.stack([self._table[self._suffix(name)].mean(0) for name in class_names])
        return F.normalize(contexts.mean(1)[:, None, :] + names[None], dim=-1)
