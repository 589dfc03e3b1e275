"""Datasets, few-shot splits and forget/memorize partitions.

>>> from vlmlab.data import load_dataset, few_shot_split
>>> train = load_dataset("fashion-mnist", "train")
>>> split = few_shot_split(train.labels, shots=16, seed=1)
"""

from __future__ import annotations

from vlmlab.data._augment import augmented_view
from vlmlab.data._common import OFFLINE_DATASET
from vlmlab.data._dataset import ImageDataset
from vlmlab.data._loaders import FASHION_MNIST_CLASSES, list_datasets, load_dataset
from vlmlab.data._names import ClassNames, prompt_name, read_class_names, rename_classes
from vlmlab.data._splits import (
    ClassPartition,
    FewShotSplit,
    class_indices,
    few_shot_split,
    partition_classes,
    sample_per_class,
    stratified_subset,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "OFFLINE_DATASET",
    "ClassNames",
    "ClassPartition",
    "FewShotSplit",
    "ImageDataset",
    "augmented_view",
    "class_indices",
    "few_shot_split",
    "list_datasets",
    "load_dataset",
    "partition_classes",
    "prompt_name",
    "read_class_names",
    "rename_classes",
    "sample_per_class",
    "stratified_subset",
]
