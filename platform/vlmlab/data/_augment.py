"""Augmented views of a few-shot set: random resized crops and flips, seeded.

The official CraFT code trains its refinement head on freshly augmented images
every epoch (``RandomResizedCrop(scale=(0.5, 1))`` + horizontal flip) and scores
CMA-ES candidates on one fixed augmented view. A black-box oracle sees pixels
only once they are registered, so a view here is a whole new image set, drawn
deterministically from ``(seed, view)`` so that a resumed run (or another
worker) registers the very same pixels and hits the feature cache.
"""

from __future__ import annotations

import math

import numpy as np

from vlmlab.data._dataset import ImageDataset

_RATIO = (3 / 4, 4 / 3)


def _crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box rule: 10 tries, then the centre crop."""
    area = height * width
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        h, w = height, round(height * _RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augmented_view(
    dataset: ImageDataset,
    *,
    seed: int,
    view: int,
    scale: tuple[float, float] = (0.5, 1.0),
    flip: bool = True,
) -> ImageDataset:
    """One augmented copy of every image: a random resized crop back to the
    image's own size (bicubic) and, with ``flip``, a horizontal flip with p = 0.5.

    The same ``(seed, view, scale, flip)`` gives the same pixels on any machine.
    """
    from PIL import Image

    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"augmentation scale must satisfy 0 < low <= high <= 1, got {scale}")
    if seed < 0 or view < 0:
        raise ValueError(f"seed and view must be >= 0, got {seed} and {view}")
    rng = np.random.default_rng([seed, view])
    pixels = np.asarray(dataset.images)
    height, width = pixels.shape[1:3]
    out = np.empty_like(pixels)
    for row, image in enumerate(pixels):
        top, left, h, w = _crop_box(rng, height, width, (low, high))
        crop = Image.fromarray(image[top : top + h, left : left + w])
        resized = np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC))
        out[row] = resized[:, ::-1] if flip and rng.random() < 0.5 else resized
    augmentation = {"seed": seed, "view": view, "scale": [low, high], "flip": flip}
    return ImageDataset(
        dataset.name,
        dataset.split,
        out,
        dataset.labels,
        dataset.class_names,
        dataset.indices,
        dataset.meta | {"augmentation": augmentation},
    )
