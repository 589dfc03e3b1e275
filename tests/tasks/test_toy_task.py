"""A task is one module: a toy task registered here runs through every command unchanged.

The toy task (random search over soft prompts, on the ``latency:0`` backend:
no model, instant) is defined in a few lines of this file and registered with
``register_task``; ``vlmlab run``, ``vlmlab sweep``, ``vlmlab report`` and the
artifact loader then serve it without any other module knowing it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.data import stratified_subset
from vlmlab.methods import Metrics, StepRecord
from vlmlab.results import ResultsStore
from vlmlab.serving import AdaptedModel, AdapterStore
from vlmlab.tasks import MethodSpec, Task, register_task, unregister_task


class ToyMethodSpec(MethodSpec):
    name: Literal["toy"] = "toy"
    popsize: int = 4
    iterations: int = 3
    spread: float = 1.0


class ToyMethod:
    """Random search: each generation scores ``popsize`` random prompts in one call."""

    def __init__(self, oracle, data, config: ToyMethodSpec, seed: int, budget_key, eval_key):
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
    method_spec = ToyMethodSpec
    metrics = (("toy_score", "toy score"),)
    sweep_metrics = ("val_toy_score",)

    def build(self, spec, seed, oracle, data, *, budget_key, eval_key):
        return ToyMethod(oracle, data, spec.method, seed, budget_key, eval_key)

    def artifact(self, method):
        return {"contexts": method.best}, {"class_names": method.names}


@pytest.fixture
def toy_task():
    register_task(Toy())
    yield
    unregister_task("toy")


def _spec(tmp_path, **extra) -> str:
    tree = {
        "name": "toy",
        "task": "toy",
        "backend": {"name": "latency:0"},
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 30},
        "method": {"popsize": 4, "iterations": 3},
        "seeds": [1, 2],
        "eval_every": 2,
        "pool": {"num_cpus": 0.25},
        **extra,
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_toy_task_runs_reports_and_serves(toy_task, tmp_path):
    results = tmp_path / "results"
    runner = CliRunner()
    run = runner.invoke(app, ["run", _spec(tmp_path), "--in-process", "--results", str(results)])
    assert run.exit_code == 0, run.output
    assert "Toy task" in run.output and "toy score on the test split" in run.output

    runs = ResultsStore(results).runs().set_index("run_id")
    assert set(runs.index) == {"toy-toy-s1", "toy-toy-s2"}
    row = runs.loc["toy-toy-s1"]
    # The task's metric became runs columns, beside every other task's (the schema is shared).
    assert 0 <= row.test_toy_score <= 1 and 0 <= row.zeroshot_test_toy_score <= 1
    assert "test_H" in runs.columns and np.isnan(row.test_H)
    assert row.queries_used == 12 and row.status == "completed" and row.generations == 3

    report = runner.invoke(app, ["report", str(results)])
    assert report.exit_code == 0, report.output
    assert "Toy task — toy: latency sleep-0ms on fashion-mnist" in report.output

    from vlmlab.oracle import create_oracle

    oracle = create_oracle("latency:0")
    model = AdaptedModel.load(AdapterStore(results / "artifacts"), "toy-toy-s1", oracle)
    pixels = np.zeros((28, 28, 3), dtype=np.uint8)
    top = model.classify(pixels, top_k=3)
    assert len(top) == 3 and top[0]["label"] in model.manifest["class_names"]
    assert model.manifest["kind"] == "toy"


@pytest.mark.slow
def test_toy_task_sweeps_on_ray(toy_task, tmp_path, ray_session):
    import sys

    from ray import cloudpickle

    # Ray workers cannot import this test module: its classes travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    space = {"method.spread": {"type": "uniform", "low": 0.5, "high": 2.0}}
    spec = _spec(
        tmp_path,
        seeds=[1],
        sweep={"space": space, "num_samples": 2, "scheduler": "fifo", "trial_cpus": 0.25},
    )
    results = tmp_path / "sweep"
    out = CliRunner().invoke(app, ["sweep", spec, "--results", str(results)])
    assert out.exit_code == 0, out.output
    assert "optimizing val_toy_score" in out.output
    runs = ResultsStore(results).runs()
    assert len(runs) == 2 and set(runs.status) == {"completed"}
    assert runs.val_toy_score.notna().all() and (runs.queries_used == 12).all()
