"""The craft task: CraFT and its ablations, in one place.

Spec section ``method`` (:class:`~vlmlab.methods.craft.CraftConfig`, the paper's defaults),
metric ``acc`` (``runs`` columns ``test_acc`` ...), sweepable ``val_acc`` /
``test_acc``; the budget defaults to the paper's by shots; one generation
costs ``popsize`` budget queries (``popsize + 1`` with ``head_data: prompts``,
which scores the ES mean too), so a budget B runs B // popsize generations as
the official maxiter; the result is the head prompt and the refinement head
at the final step; the report is accuracy by shots (K) and method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from vlmlab.methods import Method
from vlmlab.methods.coop import CoOpClassifier
from vlmlab.methods.craft import (
    Craft,
    CraftConfig,
    RefinementHead,
    make_craft_data,
)
from vlmlab.oracle import LocalOracle, Oracle
from vlmlab.results import (
    ReportTable,
    finish_panel,
    mean_curve,
    mean_std,
    panels,
    save_figure,
)
from vlmlab.tasks._base import Task, TrialData
from vlmlab.tasks._coop import is_coop

if TYPE_CHECKING:
    from vlmlab.results import Artifact
    from vlmlab.specs import RunSpec


CraftMethodSpec = CraftConfig
"""The spec's ``method`` section is the method's own config (the name of earlier versions)."""


def craft_budget(shots: int) -> int:
    """The paper's budget by shots (CraFT, Wang et al. 2024, section 4): 2,000 for 1 shot, 4,000 for 2-4, 8,000 above."""
    return 2000 if shots <= 1 else 4000 if shots <= 4 else 8000


class CraftTask(Task):
    """CraFT: the ES mean prompt and the refinement head at the final step are the result."""

    name = "craft"
    title = "CraFT"
    method_spec = CraftConfig
    metrics = (("acc", "accuracy"),)
    sweep_metrics = ("val_acc", "test_acc")
    validation_optional = True  # data.val_shots: 0, the official protocol (no validation)
    table_axes = ("data.shots", "budget.max_queries")

    def default_budget(self, shots: int) -> int:
        return craft_budget(shots)

    def is_white_box(self, method: Any) -> bool:
        return is_coop(method)

    def queries_per_generation(self, method: Any) -> int:
        if is_coop(method):
            return 0
        # The official budget pays for the population only; head_data=prompts also
        # scores the ES mean with it. The head's query (views) is counted apart.
        assert isinstance(method, CraftConfig)
        return method.queries_per_generation

    def generations(self, spec: RunSpec) -> int:
        assert isinstance(spec.method, CraftConfig)
        if is_coop(spec.method):
            return spec.method.coop.epochs
        return (spec.query_budget() or 0) // self.queries_per_generation(spec.method)

    def run_id(self, spec: RunSpec, seed: int) -> str:
        """``<name>-<method>-k<K>-s<seed>``: a CraFT spec is often a few-shot ladder."""
        return f"{spec.name}-{spec.method.name}-k{spec.shots}-s{seed}"

    def build(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        data: TrialData,
        *,
        budget_key: str,
        eval_key: str,
    ) -> Craft | CoOpClassifier:
        assert isinstance(spec.method, CraftConfig)
        coop = is_coop(spec.method)
        augmented = spec.method.fitness_images == "augmented" and not coop  # CoOp: plain images
        task = make_craft_data(
            oracle,
            data.train,
            data.test,
            shots=spec.shots,
            val_shots=spec.data.val_shots,
            seed=seed,
            fitness_view=spec.method.augment_scale if augmented else None,
            augment_source=spec.method.augment_source,
        )
        if coop:
            n_context = oracle.phrase_embeddings(spec.prompt_phrase).shape[0]
            return CoOpClassifier(
                oracle,
                task,
                spec.method.coop.with_context(n_context),
                seed=seed,
                eval_key=eval_key,
                init_phrase=spec.prompt_phrase,
            )
        budget = spec.query_budget()
        assert budget is not None  # craft specs always resolve a budget
        return Craft(
            oracle,
            task,
            spec.method,
            budget=budget,
            init_phrase=spec.prompt_phrase,
            seed=seed,
            budget_key=budget_key,
            eval_key=eval_key,
        )

    def artifact(self, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if isinstance(method, CoOpClassifier):
            return {"contexts": method.contexts()}, {
                "class_names": method.task.class_names,
                "mode": "coop",
                "refinement": False,
                "white_box": True,
                "train_images": len(method.task.train_labels),
            }
        assert isinstance(method, Craft)
        refinement = method.config.name != "prompt_only"
        tensors = {"contexts": method.mean_contexts()}
        if refinement:
            tensors.update(method.head_tensors())
        return tensors, {
            "class_names": method.task.class_names,
            "mode": method.config.name,
            "refinement": refinement,
            "train_images": len(method.task.train_labels),
            "head_data": method.config.head_data,
            "head_queries": method.head_queries,
        }

    def classifier(
        self, artifact: Artifact, oracle: LocalOracle
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        embeddings, _ = super().classifier(artifact, oracle)
        head = (
            RefinementHead.from_tensors(artifact.tensors)
            if artifact.manifest.get("refinement")
            else None
        )
        return embeddings, head

    def tables(self, runs: pd.DataFrame, *, tolerance: float = 1.0) -> list[ReportTable]:
        """One table per experiment and setting: accuracy by shots (K) and method."""
        tables = []
        for group in self.table_groups(runs):
            runs_of = group.runs
            ladder = sorted(int(k) for k in runs_of.shots.dropna().unique())
            columns = ["method", *[f"{k}-shot" for k in ladder], "seeds", "queries"]
            by_shots = {k: runs_of[runs_of.shots == k] for k in ladder}
            # The zero-shot prompt's test accuracy does not depend on K: one value per run.
            rows = [
                [
                    "zero-shot",
                    *[mean_std(by_shots[k].zeroshot_test_acc.drop_duplicates()) for k in ladder],
                    str(runs_of.seed.nunique()),
                    "0",
                ]
            ]
            for row in group.rows(self.method_label):
                of_method = row.runs
                cells = [mean_std(of_method[of_method.shots == k].test_acc) for k in ladder]
                queries = "/".join(
                    str(int(of_method[of_method.shots == k].queries_used.median()))
                    if (of_method.shots == k).any()
                    else "-"
                    for k in ladder
                )
                rows.append([row.label, *cells, str(of_method.seed.nunique()), queries])
            title = f"CraFT — {group.where} (test accuracy, %, by shots)"
            tables.append(ReportTable(title, columns, rows))
        return tables

    def figures(self, runs: pd.DataFrame, steps: pd.DataFrame, folder: Path) -> list[Path]:
        """Test accuracy against shots, one line per method (mean over seeds)."""
        groups = self.table_groups(runs)
        if not groups:
            return []
        fig, grid = panels(groups, width=6.0)
        for ax, group in grid:
            for row in group.rows(self.method_label):
                curve = row.runs.groupby("shots").test_acc.agg(["mean", "std"]).sort_index()
                mean_curve(ax, curve.index, curve["mean"], curve["std"], row.label)
            ax.set_xscale("log", base=2)
            zero_shot = float(np.nanmean(group.runs.zeroshot_test_acc)) * 100
            finish_panel(
                ax, group.where, zero_shot, "zero-shot", "shots per class", "test accuracy (%)"
            )
        path = folder / "craft_accuracy_vs_shots.png"
        return [save_figure(fig, "CraFT: accuracy by shots", path)]
