"""The forgetting task: Black-Box Forgetting and its baselines, in one place.

Spec section ``method`` (:class:`ForgettingMethodSpec`), metrics H, Err_fgt and
Acc_mem (``runs`` columns ``test_H`` ...), sweepable ``val_H`` / ``test_H``;
the result is the best-validation-H prompt (its artifact: ``contexts`` and the
forget set); the report is the paper's table plus H against queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from vlmlab.data import class_indices, partition_classes
from vlmlab.methods import Method, Metrics
from vlmlab.methods.forgetting import BlackBoxForgetting, ForgettingConfig, make_forgetting_data
from vlmlab.oracle import Oracle
from vlmlab.results import completed, finish_panel, panels, save_figure
from vlmlab.tasks._base import MethodSpec, Task, TrialData

if TYPE_CHECKING:
    from vlmlab.specs import RunSpec


class ForgettingMethodSpec(MethodSpec):
    """Black-Box Forgetting and its baselines (see ``vlmlab.methods.forgetting``)."""

    name: Literal["bbf", "bbt", "wo_lcs"] = "bbf"
    n_context: int = Field(4, ge=1, le=64)
    shared_dim: int = Field(20, ge=1)
    unique_dim: int = Field(5, ge=1)
    popsize: int = Field(20, ge=2)
    sigma: float = Field(1.0, gt=0)
    sep_cma: bool = False
    batch_size: int = Field(160, ge=1)
    fitness: Literal["full", "minibatch"] = "full"
    """``full``: each candidate on the whole k-shot training set, the mean of its batch
    losses (the official protocol); ``minibatch``: one random ``batch_size`` subset a
    generation (vlmlab's earlier default: cheaper on large sets, noisier)."""
    baseline_dim: int | None = Field(None, ge=1)
    """BBT / w/o LCS: each token's latent size; default ``(ds + m du) / m`` (official)."""
    iterations: int = Field(400, ge=1)
    projection_std: float | None = Field(None, gt=0)

    def to_config(self) -> ForgettingConfig:
        return ForgettingConfig(variant=self.name, **self.model_dump(exclude={"name"}))


class ForgettingTask(Task):
    """Forget the chosen classes, keep the rest: the best-validation-H prompt is the result."""

    name = "forgetting"
    title = "Black-Box Forgetting"
    method_spec = ForgettingMethodSpec
    metrics = (("H", "H"), ("err_fgt", "Err_fgt"), ("acc_mem", "Acc_mem"))
    sweep_metrics = ("val_H", "test_H")
    evaluation_splits = ("test",)  # validation H is scored every generation

    def build(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        data: TrialData,
        *,
        budget_key: str,
        eval_key: str,
    ) -> BlackBoxForgetting:
        assert isinstance(spec.method, ForgettingMethodSpec)
        forget = spec.data.forget
        partition = partition_classes(
            data.train.num_classes,
            forget=None
            if forget is None
            else class_indices(forget, data.train.class_names, field="data.forget"),
            forget_fraction=spec.data.forget_fraction,
        )
        task = make_forgetting_data(
            oracle,
            data.train,
            data.test,
            shots=spec.shots,
            val_shots=spec.data.val_shots,
            seed=seed,
            partition=partition,
        )
        return BlackBoxForgetting(
            oracle,
            task,
            spec.method.to_config(),
            seed=seed,
            max_queries=spec.query_budget(),
            budget_key=budget_key,
            eval_key=eval_key,
        )

    def final_val(self, method: Method, evaluations: dict[str, Metrics]) -> Metrics:
        assert isinstance(method, BlackBoxForgetting)
        return method.best_val

    def artifact(self, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert isinstance(method, BlackBoxForgetting)
        task = method.task
        return {"contexts": method.best_contexts}, {
            "class_names": task.class_names,
            "forget": list(task.partition.forget),
            "memorize": list(task.partition.memorize),
        }

    def figures(self, runs: pd.DataFrame, steps: pd.DataFrame, folder: Path) -> list[Path]:
        """Validation and test H against queries used, one line per run."""
        done = completed(runs, self.name)
        if done.empty:
            return []
        fig, grid = panels(done, width=6.5)
        import matplotlib.pyplot as plt  # after panels() chose the headless backend

        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, key, group in grid:
            for i, (method, of_method) in enumerate(group.groupby("method", sort=True)):
                color = colors[i % len(colors)]
                for j, run in enumerate(of_method.itertuples()):
                    mine = steps[steps.run_id == run.run_id].sort_values("step")
                    val = mine[(mine.split == "val") & (mine.metric == "best_H")]
                    test = mine[(mine.split == "test") & (mine.metric == "H")]
                    label = method if j == 0 else None
                    ax.plot(val.queries_used, val.value, color=color, alpha=0.35, lw=1)
                    ax.plot(
                        test.queries_used,
                        test.value,
                        color=color,
                        marker="o",
                        ms=3,
                        lw=1.5,
                        label=label,
                    )
            finish_panel(
                ax,
                key,
                float(np.nanmean(group.zeroshot_test_H)),
                "zero-shot (test)",
                "queries used",
                "H (faint: best validation H; markers: test H)",
            )
        path = folder / "forgetting_H_vs_queries.png"
        return [save_figure(fig, "Black-Box Forgetting: H against queries", path)]
