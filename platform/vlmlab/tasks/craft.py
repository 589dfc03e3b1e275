"""The craft task: CraFT and its ablations, in one place.

Spec section ``method`` (:class:`CraftMethodSpec`, the paper's defaults),
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
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from vlmlab.methods import Method
from vlmlab.methods.coop import CoOpClassifier
from vlmlab.methods.craft import (
    Craft,
    CraftConfig,
    RefinementHead,
    make_craft_data,
    queries_per_generation,
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
from vlmlab.tasks._base import MethodSpec, Task, TrialData
from vlmlab.tasks._coop import COOP, CoOpSettings, is_coop

if TYPE_CHECKING:
    from vlmlab.results import Artifact
    from vlmlab.specs import RunSpec


class CraftMethodSpec(MethodSpec):
    """CraFT and its ablations (see ``vlmlab.methods.craft``); defaults are the paper's.
    ``coop``: CoOp, the white-box reference (its ``coop:`` settings; m = the prompt's words)."""

    name: Literal["craft", "prompt_only", "refine_only", "no_consistency", "coop"] = "craft"
    latent_dim: int = Field(512, ge=1)
    projection_std: float = Field(0.2, gt=0)
    projection_init: Literal["normal", "uniform"] = "normal"
    """normal: A ~ N(0, projection_std) (main_craft.py); uniform: torch's default Linear
    init (main_craft_imagenet.py, which ignores std)."""
    popsize: int = Field(40, ge=2)
    sigma: float = Field(1.0, gt=0)
    bounds: float | None = Field(5.0, gt=0)
    hidden: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    consistency_weight: float = Field(0.1, ge=0)
    consistency_cutoff: int = Field(1, ge=1)
    refine_batch: int = Field(256, ge=1)
    head_data: Literal["views", "prompts"] = "views"
    """views (official): the head learns from one prompt's logits on augmented images;
    prompts (vlmlab's earlier reading): from every prompt's logits on the plain images."""
    head_prompt: Literal["sample_mean", "xbest", "mean"] = "sample_mean"
    """views: the head's and the result's prompt: the mean of a fresh ask() sample
    (main_craft.py), the best candidate so far (the ImageNet script) or the ES mean."""
    views: int | None = Field(None, ge=1)
    """Augmented views registered (once each) and cycled; None: a new one every
    generation, as the official code (the most images to encode)."""
    augment_scale: tuple[float, float] = (0.5, 1.0)
    """RandomResizedCrop's area range (the ImageNet script uses 0.08-1)."""
    augment_source: Literal["original", "stored"] = "original"
    """What the crops cut: the full-resolution originals (official: the transform reads
    the photo), where the dataset keeps them (torchvision's CoOp sets, imagefolder); or
    the stored 224 px centre squares. Sets held in memory at their own size
    (Fashion-MNIST, CIFAR) have no other originals: both crop their stored pixels."""
    fitness_images: Literal["augmented", "plain"] = "augmented"
    """Candidates are scored on one fixed augmented view (official) or on the plain images."""
    coop: CoOpSettings = Field(default_factory=CoOpSettings)
    """``name: coop``'s settings (CoOp, the white-box reference)."""

    def to_config(self, budget: int, init_phrase: str = "a photo of a") -> CraftConfig:
        """The method's config; ``init_phrase`` is the spec prompt's words (the p0 context)."""
        if self.name == COOP:
            raise ValueError("coop is trained by gradient: its settings are method.coop")
        return CraftConfig(
            variant=self.name,  # type: ignore[arg-type]  # not coop: refused above
            budget=budget,
            init_phrase=init_phrase,
            **self.model_dump(exclude={"name", "coop"}),
        )


def craft_budget(shots: int) -> int:
    """The paper's budget by shots (CraFT, Wang et al. 2024, section 4): 2,000 for 1 shot, 4,000 for 2-4, 8,000 above."""
    return 2000 if shots <= 1 else 4000 if shots <= 4 else 8000


class CraftTask(Task):
    """CraFT: the ES mean prompt and the refinement head at the final step are the result."""

    name = "craft"
    title = "CraFT"
    method_spec = CraftMethodSpec
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
        return queries_per_generation(int(method.popsize), str(method.head_data))

    def generations(self, spec: RunSpec) -> int:
        if is_coop(spec.method):
            return int(spec.method.coop.epochs)  # type: ignore[attr-defined]
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
        assert isinstance(spec.method, CraftMethodSpec)
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
                spec.method.coop.config(n_context),
                seed=seed,
                eval_key=eval_key,
                init_phrase=spec.prompt_phrase,
            )
        budget = spec.query_budget()
        assert budget is not None  # craft specs always resolve a budget
        return Craft(
            oracle,
            task,
            spec.method.to_config(budget, spec.prompt_phrase),
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
        refinement = method.config.variant != "prompt_only"
        tensors = {"contexts": method.mean_contexts()}
        if refinement:
            tensors.update(method.head_tensors())
        return tensors, {
            "class_names": method.task.class_names,
            "mode": method.config.variant,
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
