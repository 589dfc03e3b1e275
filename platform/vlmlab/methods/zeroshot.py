"""Zero-shot evaluation: the hand-written prompt every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmlab.data import ImageDataset
from vlmlab.oracle import Oracle


@dataclass(frozen=True)
class ZeroShotResult:
    """Accuracy of one hand-written prompt, with what produced it."""

    backend: str
    model: str
    dataset: str
    split: str
    prompt: str
    n_images: int
    accuracy: float
    per_class_accuracy: dict[str, float]
    predictions: np.ndarray

    @property
    def chance(self) -> float:
        return 1.0 / len(self.per_class_accuracy)


def zero_shot(
    oracle: Oracle,
    dataset: ImageDataset,
    *,
    prompt: str = "a photo of a",
    budget_key: str = "zeroshot",
) -> ZeroShotResult:
    """Score ``"<prompt> <class>."`` on every image: one query.

    The prompt's own token embeddings are the (single-candidate) context, so
    this runs through the same soft-prompt path that the methods optimize.
    """
    contexts = oracle.phrase_embeddings(prompt).unsqueeze(0)
    image_set = oracle.register_images(dataset.image_set())
    logits = oracle.logits(contexts, dataset.class_names, image_set, budget_key=budget_key)
    predictions = logits[0].argmax(dim=-1).numpy()
    correct = predictions == dataset.labels
    per_class = {
        name: float(correct[dataset.labels == c].mean())
        if (dataset.labels == c).any()
        else float("nan")
        for c, name in enumerate(dataset.class_names)
    }
    meta = oracle.metadata
    return ZeroShotResult(
        backend=meta.backend,
        model=meta.model,
        dataset=dataset.name,
        split=dataset.split,
        prompt=prompt,
        n_images=len(dataset),
        accuracy=float(correct.mean()),
        per_class_accuracy=per_class,
        predictions=predictions,
    )
