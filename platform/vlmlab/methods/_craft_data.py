"""What a CraFT run works on: the registered k-shot training images, an optional validation
set, the test set, and the pixels its augmented views are cut from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmlab.data import ImageDataset, augmented_view, few_shot_split
from vlmlab.methods._craft_config import AugmentSource
from vlmlab.oracle import ImageSetRef, Oracle

FITNESS_VIEW = 2**31 - 1
"""The view index of the fixed augmented view candidates are scored on (head views count from 0)."""


@dataclass(frozen=True)
class CraftData:
    """Registered k-shot training images, an optional k-shot validation set and the test set.

    Validation images never train anything: they score a run for sweeps (tuning on
    the test split would leak), at evaluation queries outside the budget. The
    official code has none (``main_craft.py`` L53-55 never reads its ``val_loader``):
    ``val`` is then None, and the methods report no validation metrics.
    """

    class_names: list[str]
    train: ImageSetRef
    train_labels: np.ndarray
    test: ImageSetRef
    test_labels: np.ndarray
    val: ImageSetRef | None = None
    val_labels: np.ndarray | None = None
    train_images: ImageDataset | None = None
    """The k-shot pixels, for augmented views of the refinement head (None: no views)."""

    def has_split(self, name: str) -> bool:
        """Whether ``name`` (train, test, val) is a split of this task."""
        return name in ("train", "test") or (
            name == "val" and self.val is not None and self.val_labels is not None
        )

    def split(self, name: str) -> tuple[ImageSetRef, np.ndarray]:
        if name == "test":
            return self.test, self.test_labels
        if name == "val" and self.val is not None and self.val_labels is not None:
            return self.val, self.val_labels
        if name == "train":
            return self.train, self.train_labels
        raise ValueError(
            f"no {name!r} split in this task (train, test{', val' if self.val else ''})"
        )


def make_craft_data(
    oracle: Oracle,
    train: ImageDataset,
    test: ImageDataset,
    *,
    shots: int,
    seed: int,
    val_shots: int | None = None,
    fitness_view: tuple[float, float] | None = None,
    augment_source: AugmentSource = "original",
) -> CraftData:
    """Sample k-shot train and validation sets from ``train``; register every split.

    The training shots are drawn as CoOp's loaders draw them (which the official
    code uses): a class with fewer than ``shots`` images is filled with repeats
    (``datasets/utils.py`` L237-245, ``random.choices``).

    Args:
        val_shots: validation images per class (None: ``shots``); 0: no validation
            split, as the official code (``CraftData.val`` is None).
        fitness_view: an augmentation scale: candidates are then scored on one
            fixed augmented view of the training images (the official code's
            rule), else on the images as they are.
        augment_source: what that view crops (``vlmlab.data.augmented_view``).
    """
    if train.class_names != test.class_names:
        raise ValueError("train and test splits disagree on class names")
    split = few_shot_split(train.labels, shots, seed, val_shots=val_shots, repeat=True)
    train_set = train.subset(split.train)
    scored = (
        train_set
        if fitness_view is None
        else augmented_view(
            train_set, seed=seed, view=FITNESS_VIEW, scale=fitness_view, source=augment_source
        )
    )
    val_set = train.subset(split.val) if len(split.val) else None
    return CraftData(
        class_names=list(train.class_names),
        train_images=train_set,
        train=oracle.register_images(scored.image_set()),
        train_labels=train_set.labels,
        test=oracle.register_images(test.image_set()),
        test_labels=test.labels,
        val=None if val_set is None else oracle.register_images(val_set.image_set()),
        val_labels=None if val_set is None else val_set.labels,
    )
