"""Deterministic few-shot sampling and forget/memorize class partitions."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def _available(
    labels: np.ndarray, exclude: np.ndarray | None, classes: Sequence[int] | None
) -> Iterator[tuple[int, np.ndarray]]:
    """Each class (``classes``, default every label present) with its indices not in
    ``exclude``, in class order: what both samplers draw from."""
    labels = np.asarray(labels)
    blocked = np.zeros(len(labels), dtype=bool)
    if exclude is not None:
        blocked[np.asarray(exclude, dtype=np.int64)] = True
    for c in classes if classes is not None else np.unique(labels):
        yield int(c), np.flatnonzero((labels == c) & ~blocked)


def sample_per_class(
    labels: np.ndarray,
    shots: int,
    seed: int,
    *,
    exclude: np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    repeat: bool = False,
) -> np.ndarray:
    """``shots`` indices per class, drawn without replacement by ``seed``.

    The same (labels, shots, seed, exclude, repeat) always gives the same indices,
    sorted by class then draw order.

    Args:
        repeat: a class with fewer than ``shots`` images is filled by drawing with
            replacement (CoOp's ``generate_fewshot_dataset``, which CraFT's datasets
            use: ``random.choices(items, k=num_shots)``, ``datasets/utils.py`` L237-245);
            False refuses such a class.
    """
    if not isinstance(shots, int | np.integer) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c, pool in _available(labels, exclude, classes):
        if len(pool) < shots and not (repeat and len(pool)):
            raise ValueError(
                f"class {int(c)} has {len(pool)} images available, fewer than {shots} shots"
            )
        if len(pool) < shots:
            chosen.append(rng.choice(pool, shots, replace=True))
        else:
            chosen.append(rng.permutation(pool)[:shots])
    return np.concatenate(chosen).astype(np.int64)


def sample_up_to_per_class(
    labels: np.ndarray,
    cap: int | None,
    seed: int,
    *,
    exclude: np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    share: float = 1.0,
) -> np.ndarray:
    """At most ``cap`` indices per class, drawn without replacement by ``seed``: all of a
    class with fewer (the official DevSafety ``min(control_size, available)``).

    ``cap`` None takes every available index; ``share`` < 1 also caps each class at
    ``floor(share * available)`` (possibly 0). Same order as :func:`sample_per_class`:
    by class, then draw order.

    Raises:
        ValueError: a bad ``cap`` or ``share``, or a class with no index available.
    """
    if cap is not None and (not isinstance(cap, int | np.integer) or cap < 1):
        raise ValueError(f"cap must be a positive int or None, got {cap!r}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rng = np.random.default_rng(seed)
    chosen = [np.zeros(0, dtype=np.int64)]
    for c, pool in _available(labels, exclude, classes):
        if not len(pool):
            raise ValueError(f"class {int(c)} has no images available")
        count = len(pool) if cap is None else min(cap, len(pool))
        if share < 1:
            count = min(count, math.floor(share * len(pool)))
        chosen.append(rng.permutation(pool)[:count])
    return np.concatenate(chosen).astype(np.int64)


@dataclass(frozen=True)
class FewShotSplit:
    """Indices into a training split: k-shot train and a disjoint k-shot validation
    (empty when none was asked for)."""

    train: np.ndarray
    val: np.ndarray


def few_shot_split(
    labels: np.ndarray,
    shots: int,
    seed: int,
    *,
    val_shots: int | None = None,
    repeat: bool = False,
) -> FewShotSplit:
    """A k-shot training set and a disjoint k-shot validation set (the Black-Box Forgetting protocol: model selection on validation).

    Args:
        val_shots: validation images per class; None: ``shots``; 0: no validation
            split (``val`` is empty; CraFT's official protocol has none).
        repeat: draw a short class's training shots with replacement
            (:func:`sample_per_class`); the validation draw never repeats.
    """
    if val_shots is not None and val_shots < 0:
        raise ValueError(f"val_shots must be >= 0 (0: no validation split), got {val_shots}")
    train = sample_per_class(labels, shots, seed, repeat=repeat)
    if val_shots == 0:
        return FewShotSplit(train, np.zeros(0, dtype=np.int64))
    val = sample_per_class(labels, val_shots or shots, seed + 1_000_003, exclude=train)
    return FewShotSplit(train, val)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A class-balanced subset of about ``size`` indices (for quick test evaluations)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per_class = max(1, size // len(classes))
    available = min(int((labels == c).sum()) for c in classes)
    return np.sort(sample_per_class(labels, min(per_class, available), seed))


@dataclass(frozen=True)
class ClassPartition:
    """Which classes a forgetting run forgets and which it memorizes."""

    forget: tuple[int, ...]
    memorize: tuple[int, ...]

    def forget_mask(self, labels: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(labels), self.forget)


def partition_classes(
    num_classes: int, *, forget: Sequence[int] | None = None, forget_fraction: float = 0.4
) -> ClassPartition:
    """Forget the first ``forget_fraction`` of classes (the paper's 40 %), or ``forget``."""
    if num_classes < 2:
        raise ValueError(f"a forget/memorize partition needs at least 2 classes, got {num_classes}")
    if forget is None:
        if not 0 < forget_fraction < 1:
            raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
        forget = range(max(1, round(num_classes * forget_fraction)))
    chosen = sorted({int(c) for c in forget})
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"forget classes {bad} out of range for {num_classes} classes")
    if not chosen or len(chosen) == num_classes:
        raise ValueError(
            f"forget must name some but not all of the {num_classes} classes, got {chosen}"
        )
    memorize = [c for c in range(num_classes) if c not in set(chosen)]
    return ClassPartition(tuple(chosen), tuple(memorize))


def class_indices(
    classes: Sequence[int | str], class_names: Sequence[str], *, field: str = "classes"
) -> list[int]:
    """Class indices from indices or names (``[0, "dog"]``), each checked against ``class_names``.

    Raises:
        ValueError: a name that is not a class, or an index out of range; the message
            names ``field`` and lists the classes.
    """
    names = list(class_names)
    indices = []
    for item in classes:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(
                    f"{field}: {item!r} is not a class of this dataset; classes: {', '.join(names)}"
                )
            indices.append(names.index(item))
        elif not 0 <= int(item) < len(names):
            raise ValueError(f"{field}: class index {item} out of range for {len(names)} classes")
        else:
            indices.append(int(item))
    return indices
