"""Black-Box Forgetting's search: latent contexts ``A z + p0`` and the CMA-ES strategies over them.

One object per run: it asks a population of context prompts and is told their
losses, for every variant (LCS's shared and unique strategies, BBT's one, w/o LCS's
one per token); the loop around it (:class:`~vlmlab.methods.forgetting.BlackBoxForgetting`)
owns the data, the oracle and the selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmlab.methods._cma import CmaStrategy
from vlmlab.methods._forgetting_config import LatentSearchConfig
from vlmlab.oracle import OracleMetadata


class LatentContextSearch:
    """Ask/tell over context tokens: CMA-ES strategies + the fixed projection.

    Knows nothing of oracles or data: ``ask`` gives contexts ``P x m x D``,
    ``tell`` takes their losses.
    """

    def __init__(self, config: LatentSearchConfig, metadata: OracleMetadata, seed: int) -> None:
        self.config = config
        seeds = np.random.SeedSequence(seed).spawn(config.n_context + 2)
        projection_rng = np.random.default_rng(seeds[0])
        std = config.projection_std if config.projection_std is not None else metadata.embedding_std
        d, m = config.latent_dim, config.n_context
        # A: D x d, fixed for the whole run (no bias); p0: the table mean.
        self.projection = projection_rng.normal(0.0, std, size=(metadata.token_dim, d)).astype(
            np.float32
        )
        self.center = metadata.embedding_mean.numpy().astype(np.float32)
        common: dict[str, Any] = {
            "popsize": config.popsize,
            "sigma": config.sigma,
            "diagonal": config.sep_cma,
            "csa": config.csa,
        }
        if config.search_variant == "bbf":
            dims = [config.shared_dim] + [config.unique_dim] * m
        elif config.search_variant == "bbt":
            dims = [d * m]
        else:
            dims = [d] * m
        self.strategies = [
            CmaStrategy(dim, seed=s, **common) for dim, s in zip(dims, seeds[1:], strict=False)
        ]
        self._pending: list[np.ndarray] | None = None

    def latents(self, samples: Sequence[np.ndarray]) -> np.ndarray:
        """Per-strategy samples -> latents ``P x m x d``."""
        config = self.config
        if config.search_variant == "bbf":
            shared, uniques = samples[0], samples[1:]
            return np.stack(
                [np.concatenate([shared, unique], axis=1) for unique in uniques], axis=1
            )
        if config.search_variant == "bbt":
            return samples[0].reshape(config.popsize, config.n_context, config.latent_dim)
        return np.stack(samples, axis=1)

    def to_contexts(self, latents: np.ndarray) -> torch.Tensor:
        """``ctx_i = A z_i + p0`` for latents ``P x m x d`` (fp32; with ``context_rounding``
        ``fp16``, ``fp16(fp16(A z_i) + fp16(p0))``, the official ``train.py`` L154-165)."""
        projected = latents.astype(np.float32) @ self.projection.T
        if self.config.context_rounding == "fp16":
            rounded = torch.from_numpy(projected).half() + torch.from_numpy(self.center).half()
            return rounded.float()
        return torch.from_numpy(projected + self.center)

    def ask(self) -> torch.Tensor:
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell()")
        self._pending = [strategy.ask() for strategy in self.strategies]
        return self.to_contexts(self.latents(self._pending))

    def tell(self, losses: np.ndarray) -> None:
        if self._pending is None:
            raise RuntimeError("tell() called before ask()")
        # One fitness vector for every strategy, aligned by candidate index.
        for strategy, samples in zip(self.strategies, self._pending, strict=True):
            strategy.tell(samples, losses)
        self._pending = None

    def mean_contexts(self) -> torch.Tensor:
        """The contexts at the strategies' means (``1 x m x D``)."""
        means = [strategy.mean[None, :] for strategy in self.strategies]
        config = self.config
        if config.search_variant == "bbt":
            latents = means[0].reshape(1, config.n_context, config.latent_dim)
        elif config.search_variant == "bbf":
            latents = np.stack([np.concatenate([means[0], u], axis=1) for u in means[1:]], axis=1)
        else:
            latents = np.stack(means, axis=1)
        return self.to_contexts(latents)

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategies": [strategy.state_bytes() for strategy in self.strategies],
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for strategy, blob in zip(self.strategies, state["strategies"], strict=True):
            strategy.load_state_bytes(blob)
        self._pending = state["pending"]
