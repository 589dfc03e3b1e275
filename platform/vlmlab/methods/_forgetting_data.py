"""What a forgetting run works on: the k-shot images registered with the oracle, and labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmlab.data import ClassPartition, ImageDataset, few_shot_split
from vlmlab.oracle import ImageSetRef, Oracle


@dataclass(frozen=True)
class ForgettingData:
    """What a forgetting run works on: images registered with the oracle, and labels.

    ``pool`` holds the k-shot training and validation images together, so one
    oracle call per generation scores both; ``train_index`` and ``val_index``
    are positions in it.
    """

    dataset: str
    class_names: list[str]
    partition: ClassPartition
    pool: ImageSetRef
    train_index: np.ndarray
    train_labels: np.ndarray
    val_index: np.ndarray
    val_labels: np.ndarray
    test: ImageSetRef
    test_labels: np.ndarray


def make_forgetting_data(
    oracle: Oracle,
    train: ImageDataset,
    test: ImageDataset,
    *,
    shots: int,
    seed: int,
    partition: ClassPartition,
    val_shots: int | None = None,
) -> ForgettingData:
    """Sample k-shot train/validation sets from ``train`` and register images with ``oracle``.

    ``test`` is used as given (pass a subset for quick runs).
    """
    if train.class_names != test.class_names:
        raise ValueError("train and test splits disagree on class names")
    split = few_shot_split(train.labels, shots, seed, val_shots=val_shots)
    pool_rows = np.concatenate([split.train, split.val])
    pool = train.subset(pool_rows)
    n_train = len(split.train)
    return ForgettingData(
        dataset=train.name,
        class_names=list(train.class_names),
        partition=partition,
        pool=oracle.register_images(pool.image_set()),
        train_index=np.arange(n_train),
        train_labels=pool.labels[:n_train],
        val_index=np.arange(n_train, len(pool)),
        val_labels=pool.labels[n_train:],
        test=oracle.register_images(test.image_set()),
        test_labels=test.labels,
    )
