"""The forgetting task: Black-Box Forgetting and its baselines, in one place.

Spec section ``method`` (:class:`~vlmlab.methods.forgetting.ForgettingConfig`), metrics H, Err_fgt and
Acc_mem (``runs`` columns ``test_H`` ...), sweepable ``val_H`` / ``test_H``;
the result is the best-validation-H prompt (its artifact: ``contexts`` and the
forget set); the report is the paper's table plus H against queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from vlmlab.data import class_indices, partition_classes
from vlmlab.methods import Method, MethodConfig, Metrics
from vlmlab.methods.coop import CoOpForgetting
from vlmlab.methods.forgetting import (
    DROP_CLASSES,
    BlackBoxForgetting,
    ForgettingConfig,
    LatentSearchConfig,
    make_forgetting_data,
)
from vlmlab.oracle import Oracle
from vlmlab.results import (
    ReportTable,
    finish_panel,
    mean_std,
    panels,
    save_figure,
)
from vlmlab.tasks._base import Task, TrialData
from vlmlab.tasks._coop import is_coop

DROP_CLASSES_LABEL = "drop forget classes (0 queries)"
"""The zero-query reference's name in tables and figures."""

if TYPE_CHECKING:
    from vlmlab.specs import RunSpec


ForgettingMethodSpec = ForgettingConfig
"""The spec's ``method`` section is the method's own config (the name of earlier versions)."""


class ForgettingTask(Task):
    """Forget the chosen classes, keep the rest: the best-validation-H prompt is the result."""

    name = "forgetting"
    title = "Black-Box Forgetting"
    method_spec: ClassVar[type[MethodConfig]] = ForgettingConfig
    metrics = (
        ("H", "H"),
        ("err_fgt", "Err_fgt"),
        ("acc_mem", "Acc_mem"),
        ("devsafety", "DevSafety"),
        ("safe_H", "safe H"),
    )
    table_metrics = metrics[:4]
    sweep_metrics = ("val_H", "test_H", "val_safe_H")
    extra_references = (DROP_CLASSES,)
    evaluation_splits = ("test",)  # validation H is scored every generation

    def is_white_box(self, method: Any) -> bool:
        return is_coop(method)

    def reference_label(self, reference: str) -> str:
        return DROP_CLASSES_LABEL if reference == DROP_CLASSES else reference

    def generations(self, spec: RunSpec) -> int:
        if isinstance(spec.method, LatentSearchConfig) and is_coop(spec.method):
            return spec.method.coop.epochs
        return super().generations(spec)

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
        assert isinstance(spec.method, LatentSearchConfig)
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
        if is_coop(spec.method):
            return CoOpForgetting(
                oracle,
                task,
                spec.method.coop.with_context(spec.method.n_context),
                seed=seed,
                eval_key=eval_key,
                reference_prompt=spec.prompt_phrase,
                safety_tolerance=spec.method.safety_tolerance,
            )
        return self.method_class(spec.method)(
            oracle,
            task,
            spec.method,
            seed=seed,
            max_queries=spec.query_budget(),
            budget_key=budget_key,
            eval_key=eval_key,
            reference_prompt=spec.prompt_phrase,
            safety_tolerance=spec.method.safety_tolerance,
        )

    def method_class(self, method: LatentSearchConfig) -> type[BlackBoxForgetting]:
        """The method a spec's variant runs (a subclass task adds its own)."""
        return BlackBoxForgetting

    def final_val(self, method: Method, evaluations: dict[str, Metrics]) -> Metrics:
        """The result's validation H (tracked every generation) and its DevSafety."""
        assert isinstance(method, BlackBoxForgetting)
        val = method.evaluate("val")
        return {**method.best_val, "devsafety": val["devsafety"], "safe_H": val["safe_H"]}

    def artifact(self, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert isinstance(method, BlackBoxForgetting)
        task = method.task
        return {"contexts": method.best_contexts}, {
            "class_names": task.class_names,
            "forget": list(task.partition.forget),
            "memorize": list(task.partition.memorize),
            "white_box": isinstance(method, CoOpForgetting),
        }

    def tables(self, runs: pd.DataFrame, *, tolerance: float = 1.0) -> list[ReportTable]:
        """H, Err_fgt, Acc_mem and DevSafety by method; the worst DevSafety of any seed and
        how many seeds kept every kept class within ``tolerance`` points of zero-shot.

        Two references come first, both spending no query: the zero-shot prompt, and
        the zero-shot prompt with the forget classes dropped from the candidate list
        (what a prompt on the forget classes alone can at best reach).
        """
        tables = []
        for group in self.table_groups(runs):
            runs_of = group.runs
            columns = [
                "method",
                "seeds",
                "H",
                "Err_fgt",
                "Acc_mem",
                "DevSafety",
                "worst",
                f"safe (≥ −{tolerance:g})",
                "queries",
            ]
            seeds = str(runs_of.seed.nunique())
            rows = [
                ["zero-shot", seeds]
                + [
                    mean_std(runs_of[f"zeroshot_test_{key}"].drop_duplicates())
                    for key in ("H", "err_fgt", "acc_mem")
                ]
                + ["0.00", "0.00", "-", "0"]
            ]
            drop = self._drop_classes_row(runs_of, seeds, tolerance)
            rows += [drop] if drop else []
            for row in group.rows(self.method_label):
                of_method = row.runs
                safety = of_method.test_devsafety.astype(float)
                known = safety.dropna()
                rows.append(
                    [
                        row.label,
                        str(len(of_method)),
                        *[
                            mean_std(of_method[f"test_{key}"])
                            for key in ("H", "err_fgt", "acc_mem")
                        ],
                        mean_std(safety),
                        f"{known.min() * 100:.2f}" if len(known) else "-",
                        f"{int((known * 100 >= -tolerance - 1e-9).sum())}/{len(known)}"
                        if len(known)
                        else "-",
                        f"{int(of_method.queries_used.median())}",
                    ]
                )
            title = f"{self.title} — {group.where} (test, %)"
            tables.append(ReportTable(title, columns, rows))
        return tables

    @staticmethod
    def _drop_classes_row(runs: pd.DataFrame, seeds: str, tolerance: float) -> list[str] | None:
        """The zero-query reference row, or None for runs written before it was measured."""
        prefix = f"{DROP_CLASSES}_test_"
        if f"{prefix}H" not in runs or runs[f"{prefix}H"].isna().all():
            return None
        safety = runs[f"{prefix}devsafety"].astype(float).dropna()
        return (
            [DROP_CLASSES_LABEL, seeds]
            + [
                mean_std(runs[f"{prefix}{key}"].drop_duplicates())
                for key in ("H", "err_fgt", "acc_mem")
            ]
            + [
                mean_std(safety.drop_duplicates()),
                f"{safety.min() * 100:.2f}" if len(safety) else "-",
                f"{int((safety * 100 >= -tolerance - 1e-9).sum())}/{len(safety)}"
                if len(safety)
                else "-",
                "0",
            ]
        )

    def figures(self, runs: pd.DataFrame, steps: pd.DataFrame, folder: Path) -> list[Path]:
        """H against queries (one line per run) and H against DevSafety (a point per run),
        in percent, with the zero-shot and drop-classes references marked."""
        paths = self._h_against_queries(runs, steps, folder)
        groups = [g for g in self.table_groups(runs) if not g.runs.test_devsafety.isna().all()]
        if not groups:
            return paths
        fig, grid = panels(groups, width=6.5)
        import matplotlib.pyplot as plt

        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, group in grid:
            for i, row in enumerate(group.rows(self.method_label)):
                ax.scatter(
                    row.runs.test_devsafety * 100,
                    row.runs.test_H * 100,
                    color=colors[i % len(colors)],
                    label=row.label,
                    s=28,
                )
            runs_of = group.runs
            zero_h = float(np.nanmean(runs_of.zeroshot_test_H)) * 100
            ax.scatter([0.0], [zero_h], color="black", marker="x", label="zero-shot")
            drop_h = f"{DROP_CLASSES}_test_H"
            if drop_h in runs_of and not runs_of[drop_h].isna().all():
                ax.scatter(
                    [float(np.nanmean(runs_of[f"{DROP_CLASSES}_test_devsafety"])) * 100],
                    [float(np.nanmean(runs_of[drop_h])) * 100],
                    color="black",
                    marker="*",
                    s=80,
                    label=DROP_CLASSES_LABEL,
                )
            ax.axvline(0.0, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("DevSafety: worst kept class vs zero-shot (test, points)")
            ax.set_ylabel("H (test, %)")
            ax.set_title(group.where, fontsize=9)
            ax.legend(fontsize=8)
        path = folder / "forgetting_H_vs_devsafety.png"
        return [*paths, save_figure(fig, "Forgetting: H against DevSafety, a point per seed", path)]

    def _h_against_queries(
        self, runs: pd.DataFrame, steps: pd.DataFrame, folder: Path
    ) -> list[Path]:
        """Validation and test H (%) against queries used, one line per run."""
        groups = self.table_groups(runs)
        if not groups:
            return []
        fig, grid = panels(groups, width=6.5)
        import matplotlib.pyplot as plt  # after panels() chose the headless backend

        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, group in grid:
            for i, row in enumerate(group.rows(self.method_label)):
                color = colors[i % len(colors)]
                for j, run in enumerate(row.runs.itertuples()):
                    mine = steps[steps.run_id == run.run_id].sort_values("step")
                    val = mine[(mine.split == "val") & (mine.metric == "best_H")]
                    test = mine[(mine.split == "test") & (mine.metric == "H")]
                    label = row.label if j == 0 else None
                    ax.plot(val.queries_used, val.value * 100, color=color, alpha=0.35, lw=1)
                    ax.plot(
                        test.queries_used,
                        test.value * 100,
                        color=color,
                        marker="o",
                        ms=3,
                        lw=1.5,
                        label=label,
                    )
            runs_of = group.runs
            drop_h = f"{DROP_CLASSES}_test_H"
            if drop_h in runs_of and not runs_of[drop_h].isna().all():
                ax.axhline(
                    float(np.nanmean(runs_of[drop_h])) * 100,
                    color="black",
                    ls=":",
                    lw=1,
                    label=f"{DROP_CLASSES_LABEL} (test)",
                )
            finish_panel(
                ax,
                group.where,
                float(np.nanmean(runs_of.zeroshot_test_H)) * 100,
                "zero-shot (test)",
                "queries used",
                "H, % (faint: best validation H; markers: test H)",
            )
        path = folder / "forgetting_H_vs_queries.png"
        return [save_figure(fig, "Black-Box Forgetting: H against queries", path)]
