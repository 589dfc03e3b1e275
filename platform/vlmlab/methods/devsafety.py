"""Model Developmental Safety (Li et al., 2024): improve a target task, keep every protected one.

The problem (Li et al. 2024, "Model Developmental Safety")::

    minimize F(w)   subject to   L_k(w) - L_k(w_old) <= 0   for every protected class k

Each step draws a **target batch** (half target images, half negatives, the
other classes' images) and a separate, class-balanced **control batch** of
protected classes, as the official ``train.py`` does. Every option named below
is a field of :class:`DevSafetyConfig`, whose defaults are the official
scripts' values (``GangLii/DevSafety`` ``train_foggy.sh``, ``loss.py`` /
``train.py``) and whose field docs say which line each follows.

- ``L_k`` is class k's cross-entropy on the control batch (logits ``cos / tau``);
  the w_old losses are per sample, computed once before development and paired
  with the same samples: the constraint value is ``mean_i (l_i(w) - l_i(w_old))``
  over class k's rows. The estimates start at the first value, then move:
  ``u_k <- (1 - gamma) u_k + gamma c_k`` (classes present in the batch).
- The penalty adds ``mean_k max(beta u_k, 0).detach() * L_k * tau`` over the
  protected classes present: zero at ``u_k <= 0``, ``beta u_k tau`` above
  (``penalty="smoothed"``: vlmlab's earlier smoothed hinge, an option).
- ``F`` is the official SogCLR-style contrastive loss: each target image against
  the negatives' captions and each negative against the target's. Offline there
  are no captions: a negative's caption is its class prompt through the extra
  **negative head** (official ``cls_ids = -1``), so the protected heads learn from
  the constraints only.
- **Augmented batches** (``augment_views`` > 0): rows are scored on augmented
  images while ``w_old``'s losses stay on the clean ones (the official
  evaluation preprocessing), so a constraint is usually nonzero from the start.
- AdamW with a linear warm-up and a cosine decay to zero.

Baselines: ``finetune`` (F alone) and ``weighted`` (official ``SogCLR_RM``: F plus
``beta tau`` times the mean of the protected losses in the control batch). The
data: :func:`make_devsafety_data`.

The model is a :class:`~vlmlab.methods.FineTunableModel` with per-class
low-rank heads on the text projection (the official "LoRA" heads). The image
tower stays frozen (its features cached) unless ``trainable="full"``, the
official setting: then it trains too and each batch's pixels go through it
every step. ``base_epochs > 0`` first develops ``w_old`` itself (the official
BDD runs start from a BDD-fine-tuned checkpoint instead). Metrics (held-out):
target accuracy and its gain over ``w_old``, each protected class's accuracy
change, and DevSafety(acc) = the minimum of those changes (safe when >= 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlmlab.data import (
    augmented_view,
)
from vlmlab.methods._devsafety_config import VARIANTS, DevSafetyConfig, Variant
from vlmlab.methods._devsafety_data import (
    VAL_SHARE,
    VIEW_CHUNK,
    DevSafetyData,
    make_devsafety_data,
    per_class_accuracy,
    per_class_mean,
)
from vlmlab.methods._finetune import FineTunableModel, warmup_cosine
from vlmlab.methods._protocol import Metrics, StepRecord

__all__ = [
    "VAL_SHARE",
    "VARIANTS",
    "VIEW_CHUNK",
    "DevSafety",
    "DevSafetyConfig",
    "DevSafetyData",
    "Variant",
    "make_devsafety_data",
    "per_class_accuracy",
    "per_class_mean",
    "safe_gain",
]


def safe_gain(metrics: Metrics, tolerance: float = 0.0) -> float:
    """One number for a sweep to maximize: the target gain of a safe run
    (DevSafety >= -tolerance), else ``-1 + DevSafety`` (below every safe run,
    closer to safe scores higher)."""
    devsafety = metrics["devsafety"]
    return metrics["target_gain"] if devsafety >= -tolerance else -1.0 + devsafety


class DevSafety:
    """One developmental fine-tuning run; :meth:`step` is one epoch.

    Same seed, same numbers: batches are drawn by a seeded generator and the
    state (model, optimizer, schedule, estimates, generator) is checkpointed.
    """

    def __init__(
        self, model: FineTunableModel, task: DevSafetyData, config: DevSafetyConfig, *, seed: int
    ) -> None:
        self.model, self.task, self.config, self.seed = model, task, config, seed
        self.epoch = 0
        self.images_seen = 0
        self._generator = torch.Generator().manual_seed(seed)
        n_classes = len(task.class_names)
        self._protected = torch.tensor(task.protected, device=model.device)
        self._is_target = torch.zeros(n_classes, dtype=torch.bool, device=model.device)
        self._is_target[list(task.target)] = True
        if config.negative_head and config.objective == "contrastive" and not model.negative_head:
            raise ValueError(
                "negative_head=True needs a model built with FineTunableModel(..., "
                "negative_head=True)"
            )
        if config.base_epochs:
            self._develop_base()
        with torch.no_grad():
            self.old_embeddings = model.class_embeddings().detach().clone()
            # w_old's loss on every training image, once: constraints pair them per sample.
            self.old_sample_losses = F.cross_entropy(
                self._constraint_logits(task.train_features), task.train_labels, reduction="none"
            )
            self.old_accuracy = {
                split: per_class_accuracy(
                    model.logits(task.split(split)[0]), task.split(split)[1], n_classes
                )
                for split in ("train", "val", "test")
            }
        params = model.set_trainable(config.trainable, task.target)
        tower = {id(p) for p in [*model.tower_parameters(), *model.image_tower_parameters()]}
        groups = [{"params": [p for p in params if id(p) not in tower], "lr": config.lr}]
        if config.trainable in ("all", "full"):
            tower_lr = config.lr if config.tower_lr is None else config.tower_lr
            groups.append({"params": [p for p in params if id(p) in tower], "lr": tower_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        steps = config.epochs * self.steps_per_epoch
        warm = (
            config.warmup_steps if config.warmup_steps is not None else round(config.warmup * steps)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(steps, warm)
        )
        labels = task.train_labels
        self._positives = torch.nonzero(self._is_target[labels]).flatten()
        self._negatives = torch.nonzero(~self._is_target[labels]).flatten()
        self._control_pools = [torch.nonzero(labels == k).flatten() for k in task.protected]
        # class label -> its index among the protected classes (-1: the target)
        self._protected_slot = torch.full((n_classes,), -1, dtype=torch.long, device=model.device)
        self._protected_slot[self._protected] = torch.arange(
            len(task.protected), device=model.device
        )
        # Constraint estimates u_k (started at their first value) and the contrastive
        # objective's per-image moving averages (s_I, s_T).
        self.estimates = torch.zeros(len(task.protected), device=model.device)
        self.estimated = torch.zeros(len(task.protected), dtype=torch.bool, device=model.device)
        self.image_averages = torch.zeros(len(labels), device=model.device)
        self.text_averages = torch.zeros(len(labels), device=model.device)

    # ---------------------------------------------------------------- state
    @property
    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        return math.ceil(len(self.task.train_labels) / self.config.batch_size)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    # The counters every method exposes to the runner (a white-box method spends no queries).
    @property
    def generation(self) -> int:
        return self.epoch

    @property
    def generations(self) -> int:
        return self.config.epochs

    @property
    def queries_used(self) -> int:
        return 0

    @property
    def images_scored(self) -> int:
        return self.images_seen

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "images_seen": self.images_seen,
            "model": self.model.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimates": self.estimates.cpu().clone(),
            "estimated": self.estimated.cpu().clone(),
            "image_averages": self.image_averages.cpu().clone(),
            "text_averages": self.text_averages.cpu().clone(),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.images_seen = state["epoch"], state["images_seen"]
        self.model.load_trainable_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        device = self.model.device
        self.estimates = state["estimates"].to(device)
        self.estimated = state["estimated"].to(device)
        self.image_averages = state["image_averages"].to(device)
        self.text_averages = state["text_averages"].to(device)
        self._generator.set_state(state["generator"])

    # ------------------------------------------------------------- training
    def _constraint_logits(
        self, features: torch.Tensor, class_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits the constraints are scored with: ``cos / tau`` (official) or the model's."""
        if self.config.constraint_logits == "model":
            return self.model.logits(features, class_embeddings)
        text = self.model.class_embeddings() if class_embeddings is None else class_embeddings
        return features @ text.T / self.config.tau

    def _develop_base(self) -> None:
        """``w_old``: the projection fitted to the protected classes (the released model)."""
        model, task, config = self.model, self.task, self.config
        keep = ~self._is_target[task.train_labels]
        features, labels = task.train_features[keep], task.train_labels[keep]
        model.set_trainable("projection")
        optimizer = torch.optim.AdamW([model.projection], lr=config.base_lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(self.seed + 7919)
        for _ in range(config.base_epochs):
            for rows in torch.randperm(len(labels), generator=generator).split(config.batch_size):
                rows = rows.to(model.device)
                loss = F.cross_entropy(model.logits(features[rows]), labels[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.requires_grad_(False)

    def penalty_weights(self) -> torch.Tensor:
        """What multiplies each protected loss L_k at the current estimates.

        official: ``max(beta u_k, 0) * tau`` (averaged over the classes present);
        smoothed: ``beta tau softplus(u_k / tau) sigmoid(u_k / tau)`` (summed).
        """
        beta, tau, u = self.config.beta, self.config.tau, self.estimates
        if self.config.penalty == "official":
            return (beta * u).clamp_min(0.0) * tau
        if tau == 0:
            return (beta * u).clamp_min(0.0)
        return beta * tau * F.softplus(u / tau) * torch.sigmoid(u / tau)

    @property
    def best_generation(self) -> None:
        return None  # the final model is the result

    def step(self) -> StepRecord:
        """One epoch of mini-batches, then the validation metrics (no queries: white-box)."""
        record = self._train_epoch()
        val, changes = self.evaluate_with_changes("val")
        return StepRecord(
            generation=self.epoch,
            queries_used=0,
            images_scored=self.images_seen,
            metrics={
                "train": record,  # every constraint value is among them
                "val": {
                    **{name: val[name] for name in ("target_acc", "target_gain", "devsafety")},
                    **{f"acc_change_{c}": change for c, change in changes.items()},
                },
            },
            summary=(
                f"val gain {val['target_gain'] * 100:+.2f} DevSafety {val['devsafety'] * 100:+.2f} "
                "points"
            ),
        )

    def _draw(self, pool: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` rows of ``pool``: without replacement, reshuffled whenever it runs out."""
        rows = [pool[torch.randperm(len(pool), generator=self._generator)]]
        while sum(map(len, rows)) < count:
            rows.append(pool[torch.randperm(len(pool), generator=self._generator)])
        return torch.cat(rows)[:count]

    def _control_rows(self) -> torch.Tensor:
        """A class-balanced control batch: ``control_classes`` protected classes drawn
        afresh, ``control_per_class`` images of each."""
        config, pools = self.config, self._control_pools
        n = (
            len(pools)
            if config.control_classes is None
            else min(config.control_classes, len(pools))
        )
        chosen = torch.randperm(len(pools), generator=self._generator)[:n].sort().values
        return torch.cat([self._draw(pools[int(k)], config.control_per_class) for k in chosen])

    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        """The features batch ``rows`` are scored on: clean, or each row's view drawn
        afresh; with the image tower training, its encoding of the rows' pixels now."""
        if self.model.visual is not None:
            return self.model.encode_pixels(self._pixels(rows))
        views = self.task.train_views
        if views is None:
            return self.task.train_features[rows]
        view = torch.randint(len(views), (len(rows),), generator=self._generator)
        return views[view.to(rows.device), rows]

    def _pixels(self, rows: torch.Tensor) -> Any:
        """The training pixels of ``rows``: augmented afresh (seeded by the run's
        generator) when ``augment_views`` > 0, else as they are."""
        images, config = self.task.train_images, self.config
        if images is None:
            raise ValueError("training the image tower needs the training images (DevSafetyData)")
        batch = images.subset(rows.cpu().numpy())
        if config.augment_views:
            seed = int(torch.randint(2**31 - 1, (1,), generator=self._generator))
            batch = augmented_view(
                batch,
                seed=seed,
                view=0,
                scale=config.augment_scale,
                rotation=config.augment_rotation,
                flip=config.augment_flip,
            )
        return batch.images

    def _split_features(self, split: str) -> torch.Tensor:
        """A split's clean features under the current model (re-encoded when the image
        tower trains; the cached ones otherwise)."""
        if self.model.visual is None:
            return self.task.split(split)[0]
        images = getattr(self.task, f"{split}_images")
        if images is None:
            raise ValueError(f"training the image tower needs the {split} images (DevSafetyData)")
        return self.model.image_features(images)

    def _objective(
        self,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        text: torch.Tensor,
        pos_x: torch.Tensor,
        neg_x: torch.Tensor,
    ) -> torch.Tensor:
        """F on a target batch (rows ``positives`` / ``negatives`` with features ``pos_x`` /
        ``neg_x``): the target images' CE, or the SogCLR-style contrastive loss."""
        task, config = self.task, self.config
        labels = task.train_labels
        if config.objective == "ce":
            return F.cross_entropy(self.model.logits(pos_x, text), labels[positives])
        t, gamma = config.contrastive_t, config.contrastive_gamma
        n_classes = len(task.class_names)
        # One-hot products instead of indexing by label: repeated rows must not make the
        # backward pass depend on thread timing (index backward accumulates).
        pos_onehot = F.one_hot(labels[positives], n_classes).to(text.dtype)
        neg_onehot = F.one_hot(labels[negatives], n_classes).to(text.dtype)
        pos_sims = pos_x @ text.T  # target images vs every class caption
        neg_sims = neg_x @ text.T
        anchor = (pos_sims * pos_onehot).sum(-1, keepdim=True)  # sim(img_i, txt_i)
        # The negatives' captions: through the negative head (official), or their own heads.
        caption_sims = (
            pos_x @ self.model.negative_embeddings().T if config.negative_head else pos_sims
        )
        image_diffs = caption_sims @ neg_onehot.T - anchor  # vs the negatives' captions
        text_diffs = pos_onehot @ neg_sims.T - anchor  # target caption vs negative images
        losses = []
        for diffs, averages in (
            (image_diffs, self.image_averages),
            (text_diffs, self.text_averages),
        ):
            weights = torch.exp(diffs.detach() / t)
            estimate = weights.mean(1)
            if self.epoch > 0:  # the first epoch uses the batch's own estimate
                estimate = (1 - gamma) * averages[positives] + gamma * estimate
            averages[positives] = estimate
            losses.append((weights / estimate[:, None] * diffs).mean())
        return losses[0] + losses[1]

    def _train_epoch(self) -> dict[str, float]:
        """One epoch of steps: a target batch and a control batch each; the training record."""
        if self.done:
            raise RuntimeError("this run has finished all its epochs")
        model, task, config = self.model, self.task, self.config
        labels = task.train_labels
        n_protected, slot = len(task.protected), self._protected_slot
        half = config.batch_size // 2
        target_losses = []
        for _ in range(self.steps_per_epoch):
            positives = self._draw(self._positives, config.batch_size - half).to(model.device)
            negatives = self._draw(self._negatives, half).to(model.device)
            text = model.class_embeddings()
            pos_x, neg_x = self._features(positives), self._features(negatives)
            objective = self._objective(positives, negatives, text, pos_x, neg_x)
            loss = objective
            seen = len(positives) + len(negatives)
            if config.name != "finetune":
                control = self._control_rows().to(model.device)
                seen += len(control)
                control_labels = labels[control]
                sample_losses = F.cross_entropy(
                    self._constraint_logits(self._features(control), text),
                    control_labels,
                    reduction="none",
                )
                classes = slot[control_labels]
                class_losses = per_class_mean(sample_losses, classes, n_protected)
                present = ~class_losses.isnan()
                current = class_losses[present]
                if config.name == "weighted":
                    reduced = current.mean() if config.weight_reduction == "mean" else current.sum()
                    loss = loss + config.protected_weight * reduced
                else:
                    paired = sample_losses.detach() - self.old_sample_losses[control]
                    change = per_class_mean(paired, classes, n_protected)
                    first = present & ~self.estimated
                    moved = (1 - config.gamma) * self.estimates + config.gamma * change
                    self.estimates = torch.where(
                        first, change, torch.where(present, moved, self.estimates)
                    )
                    self.estimated = self.estimated | present
                    terms = self.penalty_weights()[present] * current
                    penalty = terms.mean() if config.penalty == "official" else terms.sum()
                    loss = loss + penalty
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            target_losses.append(float(objective.detach()))
            self.images_seen += seen
        self.epoch += 1
        constraints = self.constraint_values()
        return {
            "target_loss": float(np.mean(target_losses)),
            "constraint_max": float(constraints.max()),
            "estimate_max": float(self.estimates.max()),
            "penalty_sum": float(self.penalty_weights().sum()),
            "lr": float(self.scheduler.get_last_lr()[0]),
            # Every protected class's constraint value on the whole training set.
            **{
                f"constraint_{c}": float(value)
                for c, value in zip(task.protected, constraints, strict=True)
            },
        }

    # ------------------------------------------------------------- metrics
    def constraint_values(self) -> torch.Tensor:
        """``L_k(w) - L_k(w_old)`` for each protected class, on all its training images."""
        task = self.task
        with torch.no_grad():
            features = self._split_features("train")
            losses = F.cross_entropy(
                self._constraint_logits(features), task.train_labels, reduction="none"
            )
            change = per_class_mean(
                losses - self.old_sample_losses, task.train_labels, len(task.class_names)
            )
            return change[self._protected]

    def class_accuracy(self, split: str) -> torch.Tensor:
        labels = self.task.split(split)[1]
        with torch.no_grad():
            features = self._split_features(split)
            return per_class_accuracy(
                self.model.logits(features), labels, len(self.task.class_names)
            )

    def evaluate(self, split: str) -> Metrics:
        """Target accuracy and gain, DevSafety(acc), overall accuracy and ``safe_gain`` on ``split``."""
        return self._scored(self._metrics(self.class_accuracy(split), self.old_accuracy[split]))

    def reference(self, split: str, prompt: str = "") -> Metrics:
        """The same metrics for ``w_old`` (gains of zero by definition); ``prompt`` is unused."""
        return self._scored(self._metrics(self.old_accuracy[split], self.old_accuracy[split]))

    def _scored(self, metrics: Metrics) -> Metrics:
        return {**metrics, "safe_gain": safe_gain(metrics, self.config.safety_tolerance)}

    def evaluate_with_changes(self, split: str) -> tuple[dict[str, float], dict[int, float]]:
        """:meth:`evaluate` and each protected class's accuracy change, from one scoring."""
        accuracy, old = self.class_accuracy(split), self.old_accuracy[split]
        change = accuracy - old
        return self._metrics(accuracy, old), {c: float(change[c]) for c in self.task.protected}

    def _metrics(self, accuracy: torch.Tensor, old: torch.Tensor) -> dict[str, float]:
        target = list(self.task.target)
        protected = list(self.task.protected)
        change = accuracy - old
        return {
            "target_acc": float(accuracy[target].nanmean()),
            "target_gain": float(change[target].nanmean()),
            "devsafety": float(change[protected].nan_to_num(0.0).min()),
            "protected_acc": float(accuracy[protected].nanmean()),
            "acc": float(accuracy.nanmean()),
        }
