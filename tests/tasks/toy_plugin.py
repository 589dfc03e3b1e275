"""A toy plugin: a task with its own method and metric, a backend and a dataset.

The toy task (random search over soft prompts, on the ``latency:0`` backend:
no model, instant). ``tests/tasks/test_toy_task.py`` registers it in-process,
and ``tests/tasks/test_plugins.py`` installs this module as a distribution
whose entry points (``vlmlab.tasks``, ``vlmlab.backends``, ``vlmlab.datasets``)
name the ``register_*`` functions below, then runs vlmlab's commands on it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from vlmlab.data import ImageDataset, register_dataset, stratified_subset
from vlmlab.methods import MethodConfig, Metrics, StepRecord
from vlmlab.oracle import create_oracle, register_backend
from vlmlab.tasks import Task, register_task


class ToyConfig(MethodConfig):
    """The toy method's settings, declared once: the spec's ``method`` section is validated
    by this class and the method reads it as it is."""

    name: Literal["toy"] = "toy"
    popsize: int = Field(4, ge=1)
    iterations: int = Field(3, ge=1)
    spread: float = Field(1.0, gt=0)
    """The toy's own setting: how far from the table's mean its random prompts reach."""


class ToyMethod:
    """Random search: each generation scores ``popsize`` random prompts in one call."""

    def __init__(self, oracle, data, config: ToyConfig, seed: int, budget_key, eval_key):
        self.oracle, self.config, self.budget_key, self.eval_key = (
            oracle,
            config,
            budget_key,
            eval_key,
        )
        train = data.train.subset(stratified_subset(data.train.labels, 20, seed=seed))
        self.names = list(train.class_names)
        self.sets = {
            "train": (oracle.register_images(train.image_set()), train.labels),
            "val": (oracle.register_images(train.image_set()), train.labels),
            "test": (oracle.register_images(data.test.image_set()), data.test.labels),
        }
        self.generator = torch.Generator().manual_seed(seed)
        self.generation, self.generations = 0, config.iterations
        self.queries_used = self.images_scored = 0
        self.best: torch.Tensor | None = None
        self.best_score = -1.0

    done = property(lambda self: self.generation >= self.generations)
    best_generation = None

    def _score(self, contexts, split, key):
        image_set, labels = self.sets[split]
        logits = self.oracle.logits(contexts, self.names, image_set, budget_key=key)
        return (logits.argmax(-1).numpy() == labels[None]).mean(1)

    def step(self) -> StepRecord:
        meta = self.oracle.metadata
        noise = torch.randn(self.config.popsize, 2, meta.token_dim, generator=self.generator)
        contexts = meta.embedding_mean + self.config.spread * meta.embedding_std * noise
        scores = self._score(contexts, "train", self.budget_key)
        if scores.max() > self.best_score:
            self.best_score, self.best = float(scores.max()), contexts[int(scores.argmax())][None]
        self.generation += 1
        self.queries_used += len(contexts)
        self.images_scored += len(contexts) * len(self.sets["train"][1])
        return StepRecord(
            self.generation,
            self.queries_used,
            self.images_scored,
            {"train": {"best_score": self.best_score}},
            f"best {self.best_score:.2f}",
        )

    def evaluate(self, split: str) -> Metrics:
        return {"toy_score": float(self._score(self.best, split, self.eval_key)[0])}

    def reference(self, split: str, prompt: str) -> Metrics:
        contexts = self.oracle.phrase_embeddings(prompt)[None]
        return {"toy_score": float(self._score(contexts, split, self.eval_key)[0])}

    def state_dict(self) -> dict[str, Any]:
        keys = ("generation", "queries_used", "images_scored", "best", "best_score")
        return {**{k: getattr(self, k) for k in keys}, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key != "rng":
                setattr(self, key, value)
        self.generator.set_state(state["rng"])


class Toy(Task):
    name, title = "toy", "Toy task"
    method_spec = ToyConfig
    metrics = (("toy_score", "toy score"),)
    sweep_metrics = ("val_toy_score",)

    def build(self, spec, seed, oracle, data, *, budget_key, eval_key):
        return ToyMethod(oracle, data, spec.method, seed, budget_key, eval_key)

    def artifact(self, method):
        return {"contexts": method.best}, {"class_names": method.names}


def toy_shapes(split: str = "test", **options: Any) -> ImageDataset:
    """Four classes of flat 8 x 8 squares, one brightness each: 12 train, 6 test a class."""
    per_class = 12 if split == "train" else 6
    labels = np.repeat(np.arange(4), per_class)
    images = np.repeat((labels * 60 + 20).astype(np.uint8), 8 * 8 * 3).reshape(-1, 8, 8, 3)
    return ImageDataset("toy-shapes", split, images, labels, ["dark", "dim", "light", "bright"])


def toy_latency(model: str | None, **kwargs: Any):
    """The latency oracle under a plugin's name: no model, instant."""
    return create_oracle("latency:0", **kwargs)


def register_toy_task() -> None:
    register_task(Toy(), replace=True)


def register_toy_backend() -> None:
    register_backend("toy-latency", toy_latency, "a plugin's backend (no model)", replace=True)


def register_toy_dataset() -> None:
    register_dataset(
        "toy-shapes", toy_shapes, "a plugin's dataset: 4 classes of squares", replace=True
    )
