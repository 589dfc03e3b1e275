"""What a developmental-safety run trains on: the splits' features and labels, which classes
are the target and which are protected, and the augmented views of the training images.

``control_cap`` is the official ``--control-size``: at most that many training images
of each protected class (all of a shorter class) and every remaining target image,
drawn by a fixed ``control_seed`` (official 2024) or the trial seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmlab.data import (
    ImageDataset,
    augmented_view,
    class_indices,
    sample_per_class,
    sample_up_to_per_class,
)
from vlmlab.methods._finetune import FineTunableModel

VAL_SHARE = 0.2
"""With ``control_cap``: validation takes at most this share of each class's images."""
VIEW_CHUNK = 4096
"""Augmented views are made and encoded this many images at a time (bounded memory)."""


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
