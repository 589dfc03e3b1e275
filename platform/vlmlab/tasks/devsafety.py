"""The devsafety task: Model Developmental Safety and its baselines, in one place.

A white-box task: it trains the model (a :class:`~vlmlab.methods.FineTunableModel`
over an in-process backend), never runs on the oracle pool, and spends no
queries; a generation is an epoch. ``data.shots`` is the training images per
class (target data and control set), ``data.val_shots`` the held-out
validation images per class; or ``data.control_cap`` (the official
``--control-size``) caps each protected class's training images instead, and
the target keeps all of its own (``data.control_seed``: one split for every
seed, official 2024). Metrics: target accuracy and gain, DevSafety(acc),
protected accuracy and ``safe_gain`` (the sweep's default); the reference
(``zeroshot_*`` columns) is ``w_old``, the model before development. The
artifact is a ready classifier (``class_embeddings``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from vlmlab.methods import FineTunableModel, Method
from vlmlab.methods.devsafety import DevSafety, DevSafetyConfig, make_devsafety_data
from vlmlab.oracle import LocalOracle, Oracle
from vlmlab.results import ReportTable, finish_panel, mean_std, panels, save_figure
from vlmlab.tasks._base import Task, TrialData

if TYPE_CHECKING:
    from vlmlab.results import Artifact
    from vlmlab.specs import RunSpec


DevSafetyMethodSpec = DevSafetyConfig
"""The spec's ``method`` section is the method's own config (the name of earlier versions)."""


class DevSafetyTask(Task):
    """Improve the target classes, keep every protected one: the final model is the result."""

    name = "devsafety"
    title = "Model Developmental Safety"
    method_spec = DevSafetyConfig
    metrics = (
        ("target_acc", "target acc"),
        ("target_gain", "target gain"),
        ("devsafety", "DevSafety(acc)"),
        ("protected_acc", "protected acc"),
        ("safe_gain", "safe gain"),
        ("acc", "accuracy (every class)"),
    )
    table_metrics = (
        ("target_gain", "target gain"),
        ("devsafety", "DevSafety(acc)"),
        ("target_acc", "target acc"),
        ("protected_acc", "protected acc"),
    )
    sweep_metrics = ("val_safe_gain", "val_target_gain", "val_devsafety")
    white_box = True
    artifact_tensor = "class_embeddings"

    def generations(self, spec: RunSpec) -> int:
        assert isinstance(spec.method, DevSafetyConfig)
        return spec.method.epochs

    def check(self, spec: RunSpec) -> list[str]:
        found = []
        if spec.budget.max_queries or spec.budget.by_shots:
            found.append(
                f"budget: the {self.name} task trains the model and spends no oracle queries; "
                "remove the budget section (method.epochs sets its length)"
            )
        if spec.data.control_cap is not None and len(spec.data.shot_ladder) > 1:
            found.append(
                "data.shots: data.control_cap sets the training images (at most that many of "
                "each protected class, every target image); a shot ladder does not apply"
            )
        assert isinstance(spec.method, DevSafetyConfig)
        if spec.method.trainable == "full" and not spec.backend.name.startswith("open_clip"):
            found.append(
                f"method.trainable: full trains the image tower, which only open_clip "
                f"backends offer; got backend {spec.backend.name!r}"
            )
        if spec.data.control_seed is not None and spec.data.control_cap is None:
            found.append("data.control_seed: draws the control_cap split; set data.control_cap")
        return found

    def build(
        self,
        spec: RunSpec,
        seed: int,
        oracle: Oracle,
        data: TrialData,
        *,
        budget_key: str,
        eval_key: str,
    ) -> DevSafety:
        if not isinstance(oracle, LocalOracle):
            raise TypeError(
                f"the {self.name} task trains the model: it needs an in-process backend, "
                f"not {type(oracle).__name__}"
            )
        assert isinstance(spec.method, DevSafetyConfig)
        config = spec.method
        model = FineTunableModel(
            oracle,
            data.train.class_names,
            rank=config.rank,
            prompt=spec.prompt,
            seed=seed,
            negative_head=config.negative_head,
        )
        cap = spec.data.control_cap
        task = make_devsafety_data(
            model,
            data.train,
            data.test,
            per_class=spec.shots if cap is None else None,
            val_per_class=spec.data.val_shots or spec.shots,
            seed=seed,
            target=spec.data.target,
            control_cap=cap,
            control_seed=spec.data.control_seed,
            # A training image tower augments each batch afresh: no cached views.
            views=0 if config.trainable == "full" else config.augment_views,
            view_scale=config.augment_scale,
            view_rotation=config.augment_rotation,
            view_flip=config.augment_flip,
        )
        return DevSafety(model, task, config, seed=seed)

    def artifact(self, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert isinstance(method, DevSafety)
        model = method.model
        with torch.no_grad():
            embeddings = model.class_embeddings().detach().cpu().clone()
        tensors = {
            **model.trainable_state(),
            "class_embeddings": embeddings,
            "old_class_embeddings": method.old_embeddings.detach().cpu().clone(),
        }
        config = method.config
        return tensors, {
            "class_names": method.task.class_names,
            "target": list(method.task.target),
            "protected": list(method.task.protected),
            "trainable": config.trainable,
            "rank": config.rank,
            "negative_head": config.negative_head,
            "prompt": model.prompt,
            "logit_scale": model.logit_scale,
            "logit_bias": model.logit_bias,
        }

    def classifier(
        self, artifact: Artifact, oracle: LocalOracle
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        """``class_embeddings`` over the backend's image features.

        Raises:
            ValueError: the artifact trained the image tower (``trainable: full``): its
                classes are scored on that tower's features, which serving does not run.
        """
        if artifact.manifest.get("trainable") == "full":
            raise ValueError(
                f"{artifact.path}: this devsafety model trained its image tower (trainable: "
                "full); serving scores images with the backend's own tower, so it cannot "
                "serve it (the artifact keeps the tower's weights as visual.*)"
            )
        return artifact.tensors["class_embeddings"].float(), None

    def tables(self, runs: pd.DataFrame, *, tolerance: float = 1.0) -> list[ReportTable]:
        """One table per experiment and setting of completed devsafety runs.

        Rows are methods; cells are test-split figures in percent, mean ± std over
        seeds. The safety ratio is the share of seeds with DevSafety(acc) >= 0 (the
        paper's definition); the next column allows ``tolerance`` points (a stated slack).
        """
        tables = []
        for group in self.table_groups(runs):
            slack = f"{tolerance:g}"
            columns = [
                "method",
                "seeds",
                "target acc (w_old)",
                "target acc",
                "target gain",
                "DevSafety(acc)",
                "worst DevSafety",
                "safety ratio",
                f"safe within {slack} pt",
            ]
            rows = []
            for row in group.rows(self.method_label):
                of_method = row.runs
                safety = of_method.test_devsafety.astype(float)
                rows.append(
                    [
                        row.label,
                        str(len(of_method)),
                        mean_std(of_method.zeroshot_test_target_acc),
                        mean_std(of_method.test_target_acc),
                        mean_std(of_method.test_target_gain),
                        mean_std(safety),
                        f"{safety.min() * 100:.2f}",
                        f"{int((safety >= 0).sum())}/{len(safety)}",
                        f"{int((safety * 100 >= -tolerance - 1e-9).sum())}/{len(safety)}",
                    ]
                )
            title = f"{self.title} — {group.where} (test, %)"
            tables.append(ReportTable(title, columns, rows))
        return tables

    def figures(self, runs: pd.DataFrame, steps: pd.DataFrame, folder: Path) -> list[Path]:
        """Each run's test target gain against its DevSafety(acc), by method.

        Safe runs sit on or above the dashed line; the best are far to the right.
        """
        groups = self.table_groups(runs)
        if not groups:
            return []
        fig, grid = panels(groups, width=6.0)
        for ax, group in grid:
            for row in group.rows(self.method_label):
                ax.scatter(
                    row.runs.test_target_gain * 100,
                    row.runs.test_devsafety * 100,
                    s=28,
                    label=f"{row.label} ({len(row.runs)} runs)",
                )
            finish_panel(
                ax,
                group.where,
                0.0,
                "DevSafety = 0 (safe above)",
                "target gain (points)",
                "DevSafety(acc) (points)",
            )
        path = folder / "devsafety_gain_vs_safety.png"
        return [
            save_figure(fig, "Model Developmental Safety: target gain vs DevSafety (test)", path)
        ]

    def headline(self, outcomes: list[Any], backend: str, dataset: str) -> list[str]:
        """Per method: target accuracy w_old -> adapted, DevSafety(acc) and the safety ratio."""
        lines = []
        finished = [o for o in outcomes if o.test]
        for method in dict.fromkeys(o.method for o in finished):
            group = [o for o in finished if o.method == method]
            old = statistics.mean(o.zeroshot_test["target_acc"] for o in group)
            new = statistics.mean(o.test["target_acc"] for o in group)
            safety = [o.test["devsafety"] for o in group]
            safe = sum(value >= 0 for value in safety)
            lines.append(
                f"{method}: target accuracy {old * 100:.2f} -> {new * 100:.2f} %, DevSafety(acc) "
                f"mean {statistics.mean(safety) * 100:+.2f} points (worst "
                f"{min(safety) * 100:+.2f}), safe (>= 0) in {safe}/{len(group)} seeds "
                f"(test split; {backend}, {dataset})"
            )
        return lines
