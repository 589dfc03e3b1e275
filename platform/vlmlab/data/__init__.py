"""Datasets, few-shot splits and forget/memorize partitions.

>>> from vlmlab.data import load_dataset, few_shot_split
>>> train = load_dataset("fashion-mnist", "train")
>>> split = few_shot_split(train.labels, shots=16, seed=1)
"""

from __future__ import annotations

from vlmlab.data._augment import augmented_view
from vlmlab.data._catalog import DatasetCatalog, inspect_dataset
from vlmlab.data._common import OFFLINE_DATASET
from vlmlab.data._dataset import ImageDataset
from vlmlab.data._imagefolder import imagefolder_split_manifest
from vlmlab.data._lazy import LazyImages, OriginalImages
from vlmlab.data._loaders import (
    FASHION_MNIST_CLASSES,
    list_datasets,
    load_dataset,
    register_dataset,
)
from vlmlab.data._names import (
    ClassNames,
    prompt_name,
    read_class_names,
    rename_classes,
    renamed,
)
from vlmlab.data._splits import (
    ClassPartition,
    FewShotSplit,
    class_indices,
    few_shot_split,
    partition_classes,
    sample_per_class,
    sample_up_to_per_class,
    stratified_subset,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "OFFLINE_DATASET",
    "ClassNames",
    "ClassPartition",
    "DatasetCatalog",
    "FewShotSplit",
    "ImageDataset",
    "LazyImages",
    "OriginalImages",
    "augmented_view",
    "class_indices",
    "few_shot_split",
    "imagefolder_split_manifest",
    "inspect_dataset",
    "list_datasets",
    "load_dataset",
    "partition_classes",
    "prompt_name",
    "read_class_names",
    "register_dataset",
    "rename_classes",
    "renamed",
    "sample_per_class",
    "sample_up_to_per_class",
    "stratified_subset",
]
