"""Model Developmental Safety (Li et al., 2024): improve a target task, keep every protected one.

The problem (Li et al. 2024, "Model Developmental Safety")::

    minimize F(w)   subject to   L_k(w) - L_k(w_old) <= 0   for every protected class k

Each step draws a **target batch** (``batch_size``: half target images, half
negatives, the other classes' images) and a separate, class-balanced
**control batch** (``control_classes`` protected classes x
``control_per_class`` images), as the official ``train.py`` does. Defaults
are the official scripts' values (``GangLii/DevSafety``, ``train_foggy.sh``,
``loss.py`` / ``train.py``: 40 epochs, AdamW at 1e-6 for everything, weight
decay 0.1, 500 warm-up steps, beta 100, tau 0.05; ``trainable`` aside, below):

- ``L_k`` is class k's cross-entropy on the control batch with logits
  ``cos / tau`` over all classes (``constraint_logits="tau"``); the w_old
  losses are per sample, computed once before development, and paired with
  the same samples: the constraint value is ``mean_i (l_i(w) - l_i(w_old))``
  over class k's rows;
- the estimates start at the first value, then move:
  ``u_k <- (1 - gamma) u_k + gamma c_k`` (classes present in the batch);
- the penalty (``penalty="official"``) adds
  ``mean_k max(beta u_k, 0).detach() * L_k * tau`` over the protected classes
  present: zero at ``u_k <= 0`` and ``beta u_k tau`` above.
  ``penalty="smoothed"`` is vlmlab's earlier reading, kept as an option: the
  derivative of ``beta/2 [u]_+^2`` with the hinge smoothed at temperature tau,
  ``beta tau softplus(u/tau) sigmoid(u/tau)``, summed over the classes (it
  pushes back slightly before a constraint is violated);
- ``F`` (``objective``): ``contrastive`` is the official SogCLR-style loss
  (temperature ``contrastive_t``, moving average ``contrastive_gamma``): each
  target image against the negatives' captions and each negative image
  against the target's caption. With no captions offline, a negative's caption
  is its class prompt through the extra **negative head** (``negative_head``,
  official: ``cls_ids = -1`` in ``train.py`` L176-180, so the protected heads
  get gradient from the constraints only); ``negative_head=False`` is vlmlab's
  earlier reading, through the negative's own class head. ``ce`` is the
  cross-entropy of the target images over all classes;
- **augmented batches** (``augment_views`` > 0): target, negative and control
  rows are scored on augmented images (official ``clip.py`` L70-78: random
  resized crop 0.7-1, rotation +-15 degrees, flip), with a frozen image tower
  one of ``augment_views`` fixed, cached views of each training image drawn
  per row and step, while
  ``w_old``'s per-sample losses use the clean images (the official evaluation
  preprocessing), so a constraint is usually nonzero from the first step. 0
  (the default) trains on the clean features;
- AdamW with a linear warm-up (``warmup_steps``, or the ``warmup`` share of
  all steps) and a cosine decay to zero.

Baselines in this module: ``finetune`` (minimize F alone) and ``weighted``
(official ``SogCLR_RM``, ``loss.py`` L513-534: F plus ``beta tau`` times the
mean of the protected losses in the control batch; ``weight`` replaces
``beta tau``, ``weight_reduction="sum"`` sums them, vlmlab's earlier reading).

The data (:func:`make_devsafety_data`): ``control_cap`` is the official
``--control-size``: at most that many training images of each protected class
(all of a shorter class), every remaining target image, drawn by a fixed
``control_seed`` (official 2024) or the trial seed.

The model is a :class:`~vlmlab.methods.FineTunableModel` with per-class
low-rank heads on the text projection (the official "LoRA" heads). The image
tower stays frozen (its features are cached) unless ``trainable="full"``: then
it trains too, as in the official runs (every parameter of CLIP), and each
batch's pixels go through it every step, freshly augmented when
``augment_views`` > 0 (a new draw per step, not cached views); validation,
test and constraint figures are re-encoded by the current tower. ``full`` is
the official setting, but the default is ``all`` (frozen image tower: any
backend, cached features). ``base_epochs > 0`` first develops ``w_old``
itself: the shared projection fitted to the protected classes' images (the
official BDD runs start from a BDD-fine-tuned checkpoint instead). Metrics (held-out): target
accuracy and its gain over ``w_old``, each protected class's accuracy change,
and DevSafety(acc) = the minimum of those changes (safe when >= 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from vlmlab.data import (
    ImageDataset,
    augmented_view,
    class_indices,
    sample_per_class,
    sample_up_to_per_class,
)
from vlmlab.methods._finetune import TRAINABLE, FineTunableModel, Trainable
from vlmlab.methods._protocol import Metrics, StepRecord

Variant = Literal["constrained", "finetune", "weighted"]
VARIANTS: tuple[str, ...] = ("constrained", "finetune", "weighted")
Penalty = Literal["official", "smoothed"]
Objective = Literal["contrastive", "ce"]
ConstraintLogits = Literal["tau", "model"]
WeightReduction = Literal["mean", "sum"]

VAL_SHARE = 0.2
"""With ``control_cap``: validation takes at most this share of each class's images."""
VIEW_CHUNK = 4096
"""Augmented views are made and encoded this many images at a time (bounded memory)."""


@dataclass(frozen=True)
class DevSafetyConfig:
    """Hyperparameters; defaults are the official scripts' values (``train_foggy.sh``)."""

    variant: Variant = "constrained"
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-6
    tower_lr: float | None = None
    """Learning rate of the text tower when it trains (``trainable: all``); None: ``lr``
    (official: one AdamW group for every parameter, ``train.py`` L143)."""
    weight_decay: float = 0.1
    warmup: float = 0.1
    """Share of all steps spent warming the learning rate up from zero (``warmup_steps`` None)."""
    warmup_steps: int | None = 500
    """Warm-up length in steps (official ``--warmup_length`` 500); None: ``warmup``."""
    steps_per_epoch: int | None = None
    """Steps an epoch (official: 600 BDD, 1600 Places); None: training images / batch_size."""
    control_per_class: int = 10
    control_classes: int | None = None
    """Protected classes in each control batch (None: all of them)."""
    objective: Objective = "contrastive"
    contrastive_t: float = 0.05
    contrastive_gamma: float = 0.8
    penalty: Penalty = "official"
    constraint_logits: ConstraintLogits = "tau"
    """tau: constraint losses at logit scale 1/tau (official); model: the backend's scale."""
    rank: int = 32
    trainable: Trainable = "all"
    """Official: ``full`` (all of CLIP); ``all`` by default (any backend, cached features)."""
    negative_head: bool = True
    """Negative captions through an extra head (official); False: through their own class's."""
    augment_views: int = 0
    """Augmented views of each training image that batches are scored on (0: clean images);
    with ``trainable="full"``, any number > 0 augments every batch afresh."""
    augment_scale: tuple[float, float] = (0.7, 1.0)
    """Random resized crop's area range (official ``clip.py`` L72)."""
    augment_rotation: float = 15.0
    """Random rotation's largest angle in degrees (official L73)."""
    augment_flip: bool = True
    """Random horizontal flip (official L74)."""
    beta: float = 100.0
    gamma: float = 0.8
    tau: float = 0.05
    weight: float | None = None
    """The weighted baseline's weight on the protected losses; None: ``beta * tau`` (official)."""
    weight_reduction: WeightReduction = "mean"
    """mean (official) or sum of the protected classes' losses in the weighted baseline."""
    base_epochs: int = 0
    base_lr: float = 1e-3
    prompt: str = "a photo of a {}."
    safety_tolerance: float = 0.0
    """What ``safe_gain`` counts as safe: DevSafety(acc) >= -tolerance. Never used in training."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.rank < 1 or self.base_epochs < 0:
            raise ValueError("epochs, batch_size and rank must be >= 1, base_epochs >= 0")
        if not 0 < self.gamma <= 1 or self.tau < 0 or self.beta < 0 or not 0 <= self.warmup < 1:
            raise ValueError("need 0 < gamma <= 1, tau >= 0, beta >= 0 and 0 <= warmup < 1")
        if self.tau == 0 and (self.penalty == "official" or self.constraint_logits == "tau"):
            raise ValueError(
                "tau must be > 0: the official penalty and constraint logits use 1/tau"
            )
        if self.batch_size < 2 or self.control_per_class < 1:
            raise ValueError(
                "batch_size must be >= 2 (half target, half negatives), control_per_class >= 1"
            )
        if self.control_classes is not None and self.control_classes < 1:
            raise ValueError("control_classes must be >= 1 (or None for all protected classes)")
        if (self.steps_per_epoch is not None and self.steps_per_epoch < 1) or (
            self.warmup_steps is not None and self.warmup_steps < 0
        ):
            raise ValueError("steps_per_epoch must be >= 1 and warmup_steps >= 0")
        if self.contrastive_t <= 0 or not 0 < self.contrastive_gamma <= 1:
            raise ValueError("need contrastive_t > 0 and 0 < contrastive_gamma <= 1")
        if self.tower_lr is not None and self.tower_lr <= 0:
            raise ValueError(f"tower_lr must be > 0 (or None for lr), got {self.tower_lr}")
        if self.weight is not None and self.weight < 0:
            raise ValueError(f"weight must be >= 0 (or None for beta * tau), got {self.weight}")
        if self.weight_reduction not in ("mean", "sum"):
            raise ValueError(f"weight_reduction must be mean or sum, got {self.weight_reduction!r}")
        low, high = self.augment_scale
        if self.augment_views < 0 or self.augment_rotation < 0 or not 0 < low <= high <= 1:
            raise ValueError(
                "need augment_views >= 0, augment_rotation >= 0 and 0 < augment_scale[0] <= "
                f"augment_scale[1] <= 1, got {self.augment_views}, {self.augment_rotation}, "
                f"{self.augment_scale}"
            )

    @property
    def protected_weight(self) -> float:
        """The weighted baseline's weight: ``weight``, or ``beta * tau`` (official ``SogCLR_RM``)."""
        return self.beta * self.tau if self.weight is None else self.weight


@dataclass
class DevSafetyData:
    """Features and labels of the three splits, and which classes are target / protected.

    ``train_views`` (``V x N x E``), where batches are augmented, holds the
    features of ``V`` augmented views of every training image; ``train_features``
    are always the clean ones. ``train_images`` / ``val_images`` / ``test_images``
    are the images themselves (a tower that trains encodes them again).
    """

    class_names: list[str]
    target: tuple[int, ...]
    protected: tuple[int, ...]
    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    train_views: torch.Tensor | None = None
    train_images: ImageDataset | None = None
    val_images: ImageDataset | None = None
    test_images: ImageDataset | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; allowed: train, val, test")
        return getattr(self, f"{name}_features"), getattr(self, f"{name}_labels")


def per_class_mean(values: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of ``values`` over each class's images (NaN for a class with none); differentiable."""
    sums = torch.zeros(n_classes, device=values.device, dtype=values.dtype).index_add(
        0, labels, values
    )
    counts = torch.bincount(labels, minlength=n_classes).to(values.dtype)
    return sums / counts.where(counts > 0, torch.tensor(float("nan"), device=counts.device))


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class with no images)."""
    return per_class_mean((logits.argmax(-1) == labels).float(), labels, n_classes)


def make_devsafety_data(
    model: FineTunableModel,
    train: ImageDataset,
    test: ImageDataset,
    *,
    per_class: int | None,
    val_per_class: int,
    seed: int,
    target: Sequence[int | str] | None = None,
    control_cap: int | None = None,
    control_seed: int | None = None,
    views: int = 0,
    view_scale: tuple[float, float] = (0.7, 1.0),
    view_rotation: float = 15.0,
    view_flip: bool = True,
) -> DevSafetyData:
    """The training, validation and test features of a development run.

    Two ways to draw the training images:

    - ``per_class`` (vlmlab's few-shot protocol): that many training images of
      every class, target included, then ``val_per_class`` disjoint validation
      images of every class (each class must have enough);
    - ``control_cap`` (the official ``--control-size``, ``bdd100k.py`` L96-103):
      validation first, ``min(val_per_class, share)`` images of each class, where
      the share is ``VAL_SHARE`` of the class (vlmlab's choice: the official runs
      read a separate ``train_val`` list); then the control set, at most
      ``control_cap`` of each *protected* class's remaining images (all of a
      shorter class, never an error); and every remaining target image (the
      official target data are their own, uncapped source). The split is drawn by
      ``control_seed`` (official: ``np.random.seed(2024)``, one control set for
      every run) or, when None, by ``seed``.

    ``target`` names classes by index or by name; None picks the weakest class
    of the model as given (before any development) on the validation images.
    Every other class is protected. ``views`` > 0 also encodes that many
    augmented views of every training image (``augmented_view`` with
    ``view_scale``, ``view_rotation`` and ``view_flip``, seeded by ``seed``;
    cached by the backend like any image set).

    Raises:
        ValueError: neither or both of ``per_class`` and ``control_cap``; a class
            without images; bad target classes.
    """
    if (per_class is None) == (control_cap is None):
        raise ValueError(
            "give per_class (images of every class) or control_cap (the official cap on "
            f"each protected class), not both or neither; got {per_class} and {control_cap}"
        )
    n_classes = train.num_classes
    targets = (
        None if target is None else class_indices(target, train.class_names, field="data.target")
    )
    split_seed = seed if control_seed is None else control_seed
    if per_class is not None:
        train_rows: np.ndarray | None = sample_per_class(train.labels, per_class, seed)
        val_rows = sample_per_class(
            train.labels, val_per_class, seed + 1_000_003, exclude=train_rows
        )
    else:
        train_rows = None
        val_rows = sample_up_to_per_class(
            train.labels, val_per_class, split_seed + 1_000_003, share=VAL_SHARE
        )

    def features(data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
        return model.image_features(data), torch.as_tensor(data.labels, device=model.device).long()

    val_set = train.subset(val_rows)
    val_x, val_y = features(val_set)
    test_x, test_y = features(test)
    if targets is None:
        with torch.no_grad():
            accuracy = per_class_accuracy(model.logits(val_x), val_y, n_classes)
        targets = [int(torch.nan_to_num(accuracy, nan=2.0).argmin())]
    bad = [c for c in targets if not 0 <= c < n_classes]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ValueError(
            f"target classes must be distinct indices in [0, {n_classes}); got {targets}"
        )
    if len(targets) == n_classes:
        raise ValueError("every class is a target: nothing is left to protect")
    protected = tuple(c for c in range(n_classes) if c not in targets)
    if train_rows is None:
        left = np.ones(len(train.labels), dtype=bool)
        left[val_rows] = False
        target_rows = np.flatnonzero(np.isin(train.labels, targets) & left)
        control_rows = sample_up_to_per_class(
            train.labels, control_cap, split_seed, exclude=val_rows, classes=protected
        )
        train_rows = np.concatenate([target_rows, control_rows]).astype(np.int64)
    train_set = train.subset(train_rows)
    train_x, train_y = features(train_set)
    train_views = None
    if views:
        train_views = torch.stack(
            [
                _view_features(model, train_set, seed, view, view_scale, view_rotation, view_flip)
                for view in range(views)
            ]
        )
    return DevSafetyData(
        class_names=list(train.class_names),
        target=tuple(sorted(targets)),
        protected=protected,
        train_features=train_x,
        train_labels=train_y,
        val_features=val_x,
        val_labels=val_y,
        test_features=test_x,
        test_labels=test_y,
        train_views=train_views,
        train_images=train_set,
        val_images=val_set,
        test_images=test,
    )


def _view_features(
    model: FineTunableModel,
    images: ImageDataset,
    seed: int,
    view: int,
    scale: tuple[float, float],
    rotation: float,
    flip: bool,
) -> torch.Tensor:
    """Features of one augmented view of ``images``, made and encoded ``VIEW_CHUNK`` at a
    time (chunk ``i`` of view ``v`` is ``augmented_view``'s view ``v * chunks + i``)."""
    chunks = max(1, math.ceil(len(images) / VIEW_CHUNK))
    parts = []
    for i, rows in enumerate(np.array_split(np.arange(len(images)), chunks)):
        augmented = augmented_view(
            images.subset(rows),
            seed=seed,
            view=view * chunks + i,
            scale=scale,
            rotation=rotation,
            flip=flip,
        )
        parts.append(model.image_features(augmented))
    return torch.cat(parts)


def safe_gain(metrics: Metrics, tolerance: float = 0.0) -> float:
    """One number for a sweep to maximize: the target gain of a safe run
    (DevSafety >= -tolerance), else ``-1 + DevSafety`` (below every safe run,
    closer to safe scores higher)."""
    devsafety = metrics["devsafety"]
    return metrics["target_gain"] if devsafety >= -tolerance else -1.0 + devsafety


def _warmup_cosine(total_steps: int, warm: int) -> Callable[[int], float]:
    """Linear warm-up over ``warm`` steps, then a cosine decay to zero (official ``cosine_lr``)."""
    warm = max(1, warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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
            self.optimizer, _warmup_cosine(steps, warm)
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
            if config.variant != "finetune":
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
                if config.variant == "weighted":
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
