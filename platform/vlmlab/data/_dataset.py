"""The in-memory dataset type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmlab.data._lazy import LazyImages, OriginalImages
from vlmlab.oracle import ImageSet, PixelSource


@dataclass(frozen=True)
class ImageDataset:
    """Images (uint8 ``N x H x W x 3``), integer labels and prompt-ready class names.

    ``images`` is a NumPy array, or for large sets (torchvision's, a user's
    folder) a lazy array (``LazyImages``) that decodes only the rows a subset
    takes; an image set made of it stays lazy, and an oracle decodes it batch
    by batch.

    ``meta["files"]``, where a loader gives it, lists the file of each row; a
    subset keeps the files of its rows.

    ``indices`` records which rows of the full split this is (None: all of it),
    so image sets made from subsets are named precisely in caches and reports.

    ``originals``, where a loader keeps them, reads the full-resolution image
    each stored row was cut from (a lazy loader's ``LazyImages(original=...)``
    gives it; a subset keeps its rows'). None: the stored pixels are the
    originals, as for the sets held in memory at their own size (Fashion-MNIST
    28 px, CIFAR 32 px).
    """

    name: str
    split: str
    images: Any
    labels: np.ndarray
    class_names: list[str]
    indices: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    originals: OriginalImages | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.originals is None and isinstance(self.images, LazyImages):
            object.__setattr__(self, "originals", self.images.originals())
        if self.originals is not None and len(self.originals) != len(self.images):
            raise ValueError(
                f"{self.name}: {len(self.originals)} originals but {len(self.images)} images"
            )
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: images must be uint8 (N, H, W, 3), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray | list[int]) -> ImageDataset:
        """Rows ``indices`` of this dataset (indices into this dataset, not the split)."""
        index = np.asarray(indices, dtype=np.int64)
        if index.ndim != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {index.shape}")
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise ValueError(
                f"subset indices out of range for {self.name}/{self.split} of {len(self)} images"
            )
        base = self.indices[index] if self.indices is not None else index
        meta = self.meta
        files = meta.get("files")
        if isinstance(files, list) and len(files) == len(self):
            meta = {**meta, "files": [files[i] for i in index.tolist()]}
        return ImageDataset(
            self.name,
            self.split,
            self.images[index],
            self.labels[index],
            self.class_names,
            base,
            meta,
            None if self.originals is None else self.originals.take(index),
        )

    def image_set(self) -> ImageSet:
        """The pixels as an oracle image set, named by dataset, split and indices."""
        meta: dict[str, Any] = {"dataset": self.name, "split": self.split}
        if self.indices is not None:
            meta["indices"] = self.indices.tolist()
        if "augmentation" in self.meta:
            meta["augmentation"] = self.meta["augmentation"]
        images = self.images
        if not isinstance(images, np.ndarray) and not isinstance(images, PixelSource):
            images = np.asarray(images)
        return ImageSet(images, meta)  # lazy images stay lazy: the oracle decodes in batches
