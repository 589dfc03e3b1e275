"""CoOp (Zhou et al., 2022): the white-box reference row for the prompt methods.

Every forgetting and CraFT paper sets its black-box result beside CoOp, which
learns the same ``m`` context vectors by gradient through the text tower: the
upper bound of what a prompt can do when the model's gradients are there. Here
it learns them with the loss of the task it sits in (BBF's forgetting loss,
cross-entropy for CraFT's few-shot classification) on the same k-shot images,
so the comparison isolates gradient access against queries.

- **White-box**: it needs an in-process backend (``LocalOracle``): gradients
  come from :meth:`~vlmlab.oracle.LocalOracle.differentiable_class_embeddings`
  (the oracle's own encoder, so at equal contexts its logits are the
  oracle's), image features from the backend's feature cache. No query is
  charged (``queries_used`` stays 0); it never runs on the oracle pool.
- **Optimizer** (CoOp's): SGD with momentum 0.9, learning rate 0.002, weight
  decay 5e-4, cosine decay over the epochs, batches of 32 images; the contexts
  start at the spec prompt's words (CoOp's "a photo of a" initialization), or
  at N(0, 0.02) with ``init="random"``.
- **Result**: the forgetting version keeps the best validation H of every
  epoch, as BBF keeps its best candidate; the CraFT version, the last epoch's
  prompt, as CoOp and CraFT report.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vlmlab.methods._config import config_changes
from vlmlab.methods._coop_config import CoOpConfig, CoOpSettings
from vlmlab.methods._protocol import Metrics, StepRecord
from vlmlab.methods.craft import CraftData
from vlmlab.methods.forgetting import (
    BlackBoxForgetting,
    ForgettingConfig,
    ForgettingData,
    forgetting_loss,
    forgetting_metrics,
)
from vlmlab.oracle import LocalOracle, Oracle

__all__ = [
    "CoOpClassifier",
    "CoOpConfig",
    "CoOpForgetting",
    "CoOpSettings",
    "ContextLearner",
    "white_box_backend",
]


def white_box_backend(oracle: Oracle) -> LocalOracle:
    """``oracle`` if gradients can be taken through it, else a clear error."""
    if not isinstance(oracle, LocalOracle):
        raise TypeError(
            f"CoOp is white-box: it needs an in-process backend, got {type(oracle).__name__} "
            "(the oracle pool and the HTTP oracle answer logits only)"
        )
    return oracle


class ContextLearner:
    """CoOp's loop over one set of image features: contexts, SGD, cosine schedule, shuffling.

    Knows nothing of tasks: each epoch minimizes ``loss(logits N x C, rows)`` over
    batches of the training features, ``rows`` the batch's positions.
    """

    def __init__(
        self,
        oracle: LocalOracle,
        class_names: list[str],
        features: torch.Tensor,
        config: CoOpConfig,
        *,
        seed: int,
        init_phrase: str,
    ) -> None:
        self.oracle = oracle
        self.class_names = class_names
        self.features = features.float()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        if config.init == "prompt":
            start = oracle.phrase_embeddings(init_phrase)
            if start.shape[0] != config.n_context:
                raise ValueError(
                    f"init='prompt' starts from {init_phrase!r}, {start.shape[0]} tokens, but "
                    f"n_context is {config.n_context}: make them agree or use init='random'"
                )
        else:
            start = 0.02 * torch.randn(
                config.n_context, oracle.metadata.token_dim, generator=generator
            )
        self.contexts = torch.nn.Parameter(start.float().clone())
        self.optimizer = torch.optim.SGD(
            [self.contexts],
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.epochs
        )
        self.generator = generator

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``N x C`` logits of ``features`` under the current contexts (differentiable)."""
        text = self.oracle.differentiable_class_embeddings(self.contexts[None], self.class_names)[0]
        return features @ text.T * self.oracle.logit_scale + self.oracle.logit_bias

    def epoch(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """One pass over the training features in a seeded random order; the mean batch loss."""
        order = torch.randperm(len(self.features), generator=self.generator)
        losses = []
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            self.optimizer.zero_grad(set_to_none=True)
            value = loss(self.logits(self.features[rows]), rows)
            value.backward()
            self.optimizer.step()
            losses.append(float(value.detach()))
        self.schedule.step()
        return float(np.mean(losses))

    def current(self) -> torch.Tensor:
        """The contexts now, ``1 x m x D`` (detached)."""
        return self.contexts.detach().clone()[None]

    def state_dict(self) -> dict[str, Any]:
        return {
            "contexts": self.contexts.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.contexts.copy_(state["contexts"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])


class CoOpForgetting(BlackBoxForgetting):
    """CoOp on the forgetting task: BBF's loss, data, selection and metrics, by gradient.

    It reuses :class:`BlackBoxForgetting`'s evaluation (H, DevSafety, per-class
    accuracy against the same reference) and its best-validation-H result; what
    differs is ``step``: one epoch of SGD instead of one CMA-ES generation.
    """

    def __init__(
        self,
        oracle: Oracle,
        task: ForgettingData,
        config: CoOpConfig,
        *,
        seed: int,
        eval_key: str = "eval",
        reference_prompt: str = "a photo of a",
        safety_tolerance: float = 0.01,
    ) -> None:
        backend = white_box_backend(oracle)
        # The parent's search is never asked: its config only has to be valid.
        super().__init__(
            backend,
            task,
            ForgettingConfig(n_context=config.n_context, iterations=config.epochs),
            seed=seed,
            eval_key=eval_key,
            reference_prompt=reference_prompt,
            safety_tolerance=safety_tolerance,
        )
        self.coop = config
        features = backend.image_features(task.pool)
        self._train_features = features[torch.from_numpy(task.train_index)]
        self._val_features = features[torch.from_numpy(task.val_index)]
        self.learner = ContextLearner(
            backend,
            task.class_names,
            self._train_features,
            config,
            seed=seed,
            init_phrase=reference_prompt,
        )

    def step(self) -> StepRecord:
        """One epoch of SGD on BBF's loss; the epoch's prompt is scored on validation (free)."""
        if self.done:
            raise RuntimeError(f"all {self.generations} epochs have run")

        def loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return forgetting_loss(
                logits[None], self._train_labels[rows], self._train_forget[rows]
            )[0]

        train_loss = self.learner.epoch(loss)
        with torch.no_grad():
            predictions = self.learner.logits(self._val_features).argmax(-1).numpy()
        val = forgetting_metrics(predictions[None], self.task.val_labels, self._val_forget)
        if float(val["H"][0]) > self._best.val["H"]:
            self._best.contexts = self.learner.current()
            self._best.val = {key: float(values[0]) for key, values in val.items()}
            self._best.generation = self.generation
        self.generation += 1
        self.images_scored += len(self.task.train_index)
        best = self._best.val
        return StepRecord(
            generation=self.generation,
            queries_used=0,
            images_scored=self.images_scored,
            metrics={
                "train": {"loss": train_loss, "lr": float(self.learner.schedule.get_last_lr()[0])},
                "val": {
                    "H": float(val["H"][0]),
                    "best_H": best["H"],
                    "best_err_fgt": best["err_fgt"],
                    "best_acc_mem": best["acc_mem"],
                },
            },
            summary=f"best val H {best['H'] * 100:.2f} % (white-box)",
        )

    def state_dict(self) -> dict[str, Any]:
        best = self._best
        return {
            "version": 1,
            "coop": self.coop.record(),
            "seed": self.seed,
            "generation": self.generation,
            "images_scored": self.images_scored,
            "learner": self.learner.state_dict(),
            "best": {
                "contexts": None if best.contexts is None else best.contexts.clone(),
                "val": dict(best.val),
                "generation": best.generation,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            config_changes(state.get("coop") or {}, self.coop.record())
            or state.get("seed") != self.seed
        ):
            raise ValueError("checkpoint was written by a run with another config or seed")
        self.generation = int(state["generation"])
        self.images_scored = int(state["images_scored"])
        self.learner.load_state_dict(state["learner"])
        best = state["best"]
        self._best.contexts = best["contexts"]
        self._best.val = dict(best["val"])
        self._best.generation = int(best["generation"])


class CoOpClassifier:
    """CoOp on CraFT's task: cross-entropy on the k-shot images; the last epoch's prompt."""

    def __init__(
        self,
        oracle: Oracle,
        task: CraftData,
        config: CoOpConfig,
        *,
        seed: int,
        eval_key: str = "eval",
        init_phrase: str = "a photo of a",
    ) -> None:
        backend = white_box_backend(oracle)
        self.oracle = backend
        self.task = task
        self.config = config
        self.seed = seed
        self.eval_key = eval_key
        self.generation = 0
        self.generations = config.epochs
        self.queries_used = 0
        self.images_scored = 0
        self._labels = torch.from_numpy(task.train_labels.astype(np.int64))
        self.learner = ContextLearner(
            backend,
            task.class_names,
            backend.image_features(task.train),
            config,
            seed=seed,
            init_phrase=init_phrase,
        )

    @property
    def done(self) -> bool:
        return self.generation >= self.generations

    @property
    def best_generation(self) -> int | None:
        return None  # the last epoch's prompt is the result

    def step(self) -> StepRecord:
        """One epoch of SGD on cross-entropy."""
        if self.done:
            raise RuntimeError(f"all {self.generations} epochs have run")

        def loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, self._labels[rows])

        train_loss = self.learner.epoch(loss)
        self.generation += 1
        self.images_scored += len(self._labels)
        return StepRecord(
            generation=self.generation,
            queries_used=0,
            images_scored=self.images_scored,
            metrics={
                "train": {"loss": train_loss, "lr": float(self.learner.schedule.get_last_lr()[0])}
            },
            summary=f"train loss {train_loss:.3f} (white-box)",
        )

    def run(self) -> list[StepRecord]:
        """Run the remaining epochs."""
        records = []
        while not self.done:
            records.append(self.step())
        return records

    def contexts(self) -> torch.Tensor:
        """The learned prompt, ``1 x m x D``."""
        return self.learner.current()

    def evaluate(self, split: str = "test") -> Metrics:
        """Accuracy of the learned prompt on ``split``: one evaluation query (none, and no
        metrics, for a validation split the task does not have: ``data.val_shots: 0``)."""
        if split == "val" and not self.task.has_split(split):
            return {}
        return {"acc": self._accuracy(self.contexts(), split)}

    def reference(self, split: str, prompt: str) -> Metrics:
        """Accuracy of the hand-written ``prompt``: one evaluation query (none for an
        absent validation split)."""
        if split == "val" and not self.task.has_split(split):
            return {}
        return {"acc": self._accuracy(self.oracle.phrase_embeddings(prompt)[None], split)}

    def _accuracy(self, contexts: torch.Tensor, split: str) -> float:
        images, labels = self.task.split(split)
        logits = self.oracle.logits(
            contexts, self.task.class_names, images, budget_key=self.eval_key
        )[0]
        return float((logits.argmax(-1).numpy() == labels).mean())

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "coop": self.config.record(),
            "seed": self.seed,
            "generation": self.generation,
            "images_scored": self.images_scored,
            "learner": self.learner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            config_changes(state.get("coop") or {}, self.config.record())
            or state.get("seed") != self.seed
        ):
            raise ValueError("checkpoint was written by a run with another config or seed")
        self.generation = int(state["generation"])
        self.images_scored = int(state["images_scored"])
        self.learner.load_state_dict(state["learner"])

    def state_bytes(self) -> bytes:
        return pickle.dumps(self.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)

    def load_state_bytes(self, blob: bytes) -> None:
        self.load_state_dict(pickle.loads(blob))
