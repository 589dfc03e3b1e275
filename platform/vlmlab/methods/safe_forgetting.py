"""Safe forgetting: Black-Box Forgetting that may not cost any kept class.

Forgetting exists to remove what a model must not recognize without harming
anything else, yet BBF optimizes the harmonic mean H: a prompt can raise H
while one kept class loses accuracy. Model Developmental Safety (Li et al.,
2024) forbids exactly that with one constraint per protected class, but only
for white-box training. This brings the constraints to the black-box search:

- **Constraints**, one per kept class k, on the training images:
  ``g_k(prompt) = L_k(prompt) - L_k(reference) - tolerance <= 0``, ``L_k`` the mean
  cross-entropy of class k's images and ``reference`` the zero-shot prompt. They
  come from the logits the generation's one oracle call already returns, so a
  run spends exactly plain BBF's queries (the reference is scored once, on the
  evaluation key, like any zero-shot row).
- **Constraint handling** (``constraint``): ``"al"`` (default), pycma's augmented
  Lagrangian (Atamna et al. 2017: ``f + sum_k lam_k g_k + mu_k g_k^2 / 2``, the
  coefficients adapted every generation from the population's mean f and g:
  the mean is not queried, to keep the query count); ``"penalty"``, MDS's
  moving-average form, ``f + mean_k max(beta u_k, 0) g_k`` with ``u_k`` the moving
  average (rate ``gamma``) of the population's mean ``g_k``.
- **Start** (``start``): ``"prompt"`` (default) centres the latent search on the
  reference prompt's token embeddings, so the search starts from a prompt that
  is feasible by definition (rounded to fp16 under BBF's default
  ``context_rounding="fp16"``, which an fp16 oracle does anyway; ``"none"`` starts
  at it exactly); ``"table_mean"`` is BBF's centre.
- **Prompted classes** (``prompted``): ``"forget"`` (default) puts the searched
  prompt on the forget classes' names only; the kept classes keep the
  reference prompt. A class's logit depends on its own text embedding alone,
  so the kept classes' logits are the reference's (computed once per image
  set, on the evaluation key) and a kept class can lose accuracy only to a
  forget class that grows more like its images, which its constraint sees. The
  generation's one oracle call scores the forget classes' names, so a run still
  spends P queries a generation. ``"all"`` is BBF's one prompt for every class:
  its search moves the kept classes against each other (measured on the tiny
  CLIP: sandal, sneaker and ankle boot traded up to 2 points among
  themselves, unseen by 132 images a class, and no setting of the constraints
  kept every seed within 1 point on the test split).
- **Selection**: the result is the best validation H among candidates whose
  kept classes all stay within ``selection_tolerance`` of the reference's
  accuracy on the training and validation images together
  (``selection_images="train_val"``; ``"val"``: validation alone). The reference counts as such a candidate, so when no
  searched prompt is both safe and better, the run returns the zero-shot
  prompt (stated in the steps table: ``best_generation`` 0).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from vlmlab.methods.forgetting import (
    BlackBoxForgetting,
    ForgettingData,
    LatentSearchConfig,
    Variant,
    forgetting_metrics,
    per_class_accuracy,
)
from vlmlab.oracle import ImageSetRef, Oracle

SAFE_BBF: Literal["safe_bbf"] = "safe_bbf"
"""The variant that searches under the constraints (the others run as plain BBF)."""


class SafeForgettingConfig(LatentSearchConfig):
    """BBF's settings plus the constraints' (see the module docstring). ``safe_bbf``
    searches with Latent Context Sharing under the constraints; the task's other
    variants (``bbf``, ``bbt``, ``wo_lcs``, ``coop``) run as in the forgetting task, on
    the same images, for the table beside it."""

    name: Literal["safe_bbf", Variant, "coop"] = SAFE_BBF
    constraint: Literal["al", "penalty"] = "al"
    """al: pycma's augmented Lagrangian; penalty: MDS's moving-average penalty."""
    tolerance: float = 0.0
    """epsilon: how much each kept class's training loss may rise over the reference's
    (negative: a margin, the loss must fall by at least that much)."""
    selection_tolerance: float = Field(0.0, gt=-1, lt=1)
    """How much accuracy a kept class may lose and the prompt still be the result
    (negative: a margin, every kept class must gain at least that much)."""
    beta: float = Field(100.0, gt=0)
    """``penalty``: the penalty's scale."""
    gamma: float = Field(0.8, gt=0, le=1)
    """``penalty``: the moving average's rate (MDS's gamma)."""
    start: Literal["prompt", "table_mean"] = "prompt"
    """prompt: search around the zero-shot prompt (feasible at the start); table_mean: BBF's."""
    prompted: Literal["forget", "all"] = "forget"
    """Whose names the searched prompt is put on: the forget classes' (the kept ones keep
    the reference prompt) or ``all`` classes' (BBF's one prompt)."""
    selection_images: Literal["val", "train_val"] = "train_val"
    """Whose accuracy decides a candidate's safety: ``val`` alone, or ``train_val``, the
    training and validation images together (more images: a test estimate less noisy)."""

    @model_validator(mode="after")
    def _whole_training_set(self) -> SafeForgettingConfig:
        if self.name == SAFE_BBF and self.fitness != "full":
            raise ValueError(
                "safe_bbf needs fitness='full': a constraint compares each kept class's "
                "loss on the whole training set with the reference's"
            )
        return self

    @property
    def search_variant(self) -> Variant:
        return "bbf" if self.name == SAFE_BBF else super().search_variant

    def record(self) -> dict[str, Any]:
        """The search's settings; a plain variant's leaves out the constraints it never reads."""
        record = super().record()
        if self.name != SAFE_BBF:
            for field in set(SafeForgettingConfig.model_fields) - set(
                LatentSearchConfig.model_fields
            ):
                record.pop(field)
        return record


def class_losses(logits: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Mean cross-entropy of each class's images, per candidate: ``P x K`` (float64)."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    picked = log_probs.gather(-1, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1))[..., 0]
    return np.stack([(-picked[:, labels == k]).mean(dim=1).numpy() for k in classes], axis=1)


class SafeBlackBoxForgetting(BlackBoxForgetting):
    """Black-Box Forgetting under one constraint per kept class (see the module docstring)."""

    config: SafeForgettingConfig

    def __init__(
        self, oracle: Oracle, task: ForgettingData, config: SafeForgettingConfig, **options: Any
    ) -> None:
        """``options``: :class:`BlackBoxForgetting`'s keyword arguments, as they are."""
        self._kept_logits: dict[tuple[str, bytes | None], torch.Tensor] = {}
        super().__init__(oracle, task, config, **options)
        self.kept = [int(k) for k in task.partition.memorize]
        self.forget = [int(c) for c in task.partition.forget]
        reference_prompt = self.reference_prompt
        reference = oracle.phrase_embeddings(reference_prompt)
        self.reference_contexts = reference.unsqueeze(0)
        if config.start == "prompt":
            if reference.shape[0] != config.n_context:
                raise ValueError(
                    f"start='prompt' centres the search on the reference prompt "
                    f"{reference_prompt!r}, {reference.shape[0]} tokens, but n_context is "
                    f"{config.n_context}: make them agree or use start='table_mean'"
                )
            self.search.center = reference.numpy().astype(np.float32)
        # The reference on the training and validation images: one evaluation call.
        indices = np.concatenate([task.train_index, task.val_index])
        logits = oracle.logits(
            reference.unsqueeze(0),
            task.class_names,
            task.pool,
            indices=indices,
            budget_key=self.eval_key,
        )
        n_train = len(task.train_index)
        labels = torch.from_numpy(task.train_labels.astype(np.int64))
        self.reference_losses = class_losses(logits[:, :n_train], labels, self.kept)[0]
        val_predictions = logits[0, n_train:].argmax(-1).numpy()
        self.reference_val_accuracy = per_class_accuracy(
            val_predictions, task.val_labels, len(task.class_names)
        )[0]
        self.reference_train_val_accuracy = per_class_accuracy(
            logits[0].argmax(-1).numpy(),
            np.concatenate([task.train_labels, task.val_labels]),
            len(task.class_names),
        )[0]
        # The reference is the result until a safe, better prompt is found.
        reference_val = forgetting_metrics(val_predictions[None], task.val_labels, self._val_forget)
        self._best.contexts = reference.unsqueeze(0).clone()
        self._best.val = {key: float(values[0]) for key, values in reference_val.items()}
        self._lagrangian = self._new_lagrangian() if config.constraint == "al" else None
        self._moving = np.zeros(len(self.kept))

    def _new_lagrangian(self) -> Any:
        from cma.constraints_handler import AugmentedLagrangian

        dimension = sum(strategy.dim for strategy in self.search.strategies)
        lagrangian = AugmentedLagrangian(dimension)
        lagrangian.logging = False
        return lagrangian

    # ------------------------------------------------------------ the hooks
    def _class_logits(
        self,
        contexts: torch.Tensor,
        image_set: ImageSetRef,
        indices: np.ndarray | None,
        budget_key: str,
    ) -> torch.Tensor:
        if self.config.prompted == "all":
            return super()._class_logits(contexts, image_set, indices, budget_key)
        names = self.task.class_names
        forget_logits = self.oracle.logits(
            contexts,
            [names[c] for c in self.forget],
            image_set,
            indices=indices,
            budget_key=budget_key,
        )
        logits = torch.empty((*forget_logits.shape[:2], len(names)), dtype=forget_logits.dtype)
        logits[:, :, self.forget] = forget_logits
        logits[:, :, self.kept] = self._reference_kept_logits(image_set, indices).to(
            forget_logits.dtype
        )
        return logits

    def _reference_kept_logits(
        self, image_set: ImageSetRef, indices: np.ndarray | None
    ) -> torch.Tensor:
        """The kept classes' logits ``N x K`` under the reference prompt (once per image subset)."""
        key = (image_set.id, None if indices is None else np.asarray(indices).tobytes())
        if key not in self._kept_logits:
            names = self.task.class_names
            self._kept_logits[key] = self.oracle.logits(
                self.reference_contexts,
                [names[k] for k in self.kept],
                image_set,
                indices=indices,
                budget_key=self.eval_key,
            )[0]
        return self._kept_logits[key]

    def _fitness(
        self, losses: np.ndarray, train_logits: torch.Tensor, batch: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float]]:
        labels = self._train_labels[torch.from_numpy(batch)]
        violations = (
            class_losses(train_logits, labels, self.kept)
            - self.reference_losses[None, :]
            - self.config.tolerance
        )
        if self._lagrangian is not None:
            al = self._lagrangian
            al.set_coefficients(losses, violations)  # initializes once, from the first data
            al.update(float(losses.mean()), violations.mean(axis=0))
            penalties = np.array([float(np.sum(al(g))) for g in violations])
        else:
            gamma = self.config.gamma
            self._moving = (1 - gamma) * self._moving + gamma * violations.mean(axis=0)
            weights = np.maximum(self.config.beta * self._moving, 0.0)
            penalties = (violations * weights[None, :]).mean(axis=1)
        feasible = (violations <= 0).all(axis=1)
        return losses + penalties, {
            "feasible": float(feasible.mean()),
            "worst_violation": float(violations.max()),
        }

    def _eligible(
        self, val_predictions: np.ndarray, train_logits: torch.Tensor, batch: np.ndarray
    ) -> np.ndarray:
        task, n_classes = self.task, len(self.task.class_names)
        if self.config.selection_images == "val":
            predictions, labels = val_predictions, task.val_labels
            reference = self.reference_val_accuracy
        else:
            train_predictions = train_logits.argmax(-1).numpy()
            predictions = np.concatenate([train_predictions, val_predictions], axis=1)
            labels = np.concatenate([task.train_labels[batch], task.val_labels])
            reference = self.reference_train_val_accuracy
        accuracy = per_class_accuracy(predictions, labels, n_classes)
        drop = accuracy[:, self.kept] - reference[None, self.kept]
        return np.asarray(
            (np.nan_to_num(drop) >= -self.config.selection_tolerance - 1e-12).all(axis=1)
        )

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        import pickle

        state = super().state_dict()
        state["safe"] = {
            "lagrangian": None if self._lagrangian is None else pickle.dumps(self._lagrangian),
            "moving": self._moving.copy(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import pickle

        super().load_state_dict(state)
        safe = state["safe"]
        self._lagrangian = None if safe["lagrangian"] is None else pickle.loads(safe["lagrangian"])
        self._moving = np.array(safe["moving"])
