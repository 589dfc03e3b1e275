"""Augmented views of a few-shot set: random resized crops and flips, seeded.

The official CraFT code trains its refinement head on freshly augmented images
every epoch (``RandomResizedCrop(scale=(0.5, 1))`` + horizontal flip) and scores
CMA-ES candidates on one fixed augmented view. A black-box oracle sees pixels
only once they are registered, so a view here is a whole new image set, drawn
deterministically from ``(seed, view)`` so that a resumed run (or another
worker) registers the very same pixels and hits the feature cache.

The official transform crops the full-resolution original (``datasets/utils.py``
L322-333: ``read_image`` then the transform); ``source="original"`` does the
same where the dataset keeps its originals (``ImageDataset.originals``: the lazy
loaders), ``"stored"`` crops the stored 224 px centre square.
"""

from __future__ import annotations

import math
from typing import Literal

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
    rotation: float = 0.0,
    source: Literal["original", "stored"] = "stored",
) -> ImageDataset:
    """One augmented copy of every image: a random resized crop back to the
    image's own size (bicubic); with ``rotation`` > 0, a rotation by a uniform angle
    in ``[-rotation, rotation]`` degrees (nearest, black corners: torchvision's
    ``RandomRotation``); with ``flip``, a horizontal flip with p = 0.5 (in that
    order, as torchvision composes them). No angle is drawn at ``rotation`` 0, so
    views without rotation stay what they were.

    ``source="original"`` cuts the crop from the image the stored pixels came
    from, where the dataset keeps it (``dataset.originals``: the box and its
    ``scale`` then refer to the original's own size, as torchvision's
    ``RandomResizedCrop`` on the photo), and resizes it to the stored size; a
    dataset without originals (held in memory at its own size: the stored pixels
    are the originals) is cropped from the stored pixels. ``"stored"`` always
    crops the stored pixels. Crops of originals record ``"source": "original"`` in
    ``meta["augmentation"]``.

    The same ``(seed, view, scale, flip, rotation, source)`` gives the same pixels on
    any machine.
    """
    from PIL import Image

    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"augmentation scale must satisfy 0 < low <= high <= 1, got {scale}")
    if seed < 0 or view < 0:
        raise ValueError(f"seed and view must be >= 0, got {seed} and {view}")
    if rotation < 0:
        raise ValueError(f"rotation must be >= 0 degrees, got {rotation}")
    if source not in ("original", "stored"):
        raise ValueError(f"source must be 'original' or 'stored', got {source!r}")
    rng = np.random.default_rng([seed, view])
    originals = dataset.originals if source == "original" else None
    shape = tuple(dataset.images.shape)
    height, width = shape[1:3]
    pixels = None if originals is not None else np.asarray(dataset.images)
    out = np.empty(shape, dtype=np.uint8)
    for row in range(len(out)):
        if originals is not None:  # the full-resolution photo, as the official transform
            original = originals[row]
            top, left, h, w = _crop_box(rng, original.height, original.width, (low, high))
            crop = original.crop((left, top, left + w, top + h))
        else:
            assert pixels is not None
            top, left, h, w = _crop_box(rng, height, width, (low, high))
            crop = Image.fromarray(pixels[row][top : top + h, left : left + w])
        resized = crop.resize((width, height), Image.Resampling.BICUBIC)
        if rotation > 0:
            angle = rng.uniform(-rotation, rotation)
            resized = resized.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=0)
        turned = np.asarray(resized)
        out[row] = turned[:, ::-1] if flip and rng.random() < 0.5 else turned
    augmentation: dict[str, object] = {
        "seed": seed,
        "view": view,
        "scale": [low, high],
        "flip": flip,
    }
    if rotation > 0:
        augmentation["rotation"] = rotation
    if originals is not None:  # stored-pixel views keep the record (and names) they had
        augmentation["source"] = "original"
    return ImageDataset(
        dataset.name,
        dataset.split,
        out,
        dataset.labels,
        dataset.class_names,
        dataset.indices,
        dataset.meta | {"augmentation": augmentation},
    )
