"""The pieces of paper-style tables and plots, and the budget study's (every black-box task).

Each task's own tables and figures live in its module (``vlmlab.tasks``) and
are built from these pieces: :class:`ReportTable`, :func:`mean_std` (percent,
mean ± std over seeds), :func:`panels` (one subplot per dataset, backend and
model) with :func:`finish_panel` and :func:`save_figure` (an atomic PNG).
Every table and figure is titled with its backend, model and dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmlab._io import atomic_write_bytes
from vlmlab.results._identity import TableGroup


@dataclass(frozen=True)
class ReportTable:
    """One table: a title naming backend, model and dataset, and its rows."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def completed(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """The completed runs of one task."""
    return runs[(runs.task == task) & (runs.status == "completed")]


def mean_std(values: pd.Series) -> str:
    """Percent, ``mean ± std`` over seeds (one value as it is; ``-`` for none)."""
    values = values.dropna().astype(float) * 100
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


StudyMetrics = Mapping[str, Sequence[tuple[str, str]]]
"""Per task, the test metrics a budget study reports: ``(metric, label)`` pairs
(``vlmlab.tasks.study_metrics()`` gives every black-box task's)."""

_STUDY_GROUP = ["experiment", "task", "dataset", "backend", "model"]


def _study_runs(runs: pd.DataFrame, metrics: StudyMetrics) -> pd.DataFrame:
    """Completed black-box runs of experiments that ran at two or more budgets."""
    done = runs[runs.task.isin(list(metrics)) & (runs.status == "completed")]
    budgets = done.groupby(_STUDY_GROUP).budget.transform("nunique")
    return done[budgets >= 2]


def budget_tables(
    runs: pd.DataFrame, metrics: StudyMetrics, references: Mapping[str, str] | None = None
) -> list[ReportTable]:
    """Per study and metric: method (rows) x query budget (columns), test %, mean ± std.

    Args:
        references: further zero-query references (``dropclasses``) and their row labels:
            a row each, after zero-shot, where the runs measured it.
    """
    tables = []
    for (experiment, task, dataset, backend, model), group in _study_runs(runs, metrics).groupby(
        _STUDY_GROUP, sort=True
    ):
        budgets = sorted(int(b) for b in group.budget.dropna().unique())
        for key, label in metrics[str(task)]:
            if f"test_{key}" not in group or group[f"test_{key}"].isna().all():
                continue  # results written before the task had this metric
            columns = ["method", *[f"{b} queries" for b in budgets], "seeds"]
            zero_shot = mean_std(group[f"zeroshot_test_{key}"].drop_duplicates())
            rows = [["zero-shot", *[zero_shot for _ in budgets], str(group.seed.nunique())]]
            for reference, reference_label in (references or {}).items():
                column = f"{reference}_test_{key}"
                if column in group and not group[column].isna().all():
                    value = mean_std(group[column].drop_duplicates())
                    rows.append([reference_label, *[value for _ in budgets], rows[0][-1]])
            for method, of_method in group.groupby("method", sort=True):
                cells = [mean_std(of_method[of_method.budget == b][f"test_{key}"]) for b in budgets]
                rows.append([str(method), *cells, str(of_method.seed.nunique())])
            title = (
                f"Budget study — {experiment}: {label} by query budget "
                f"({backend} {model} on {dataset}, test, %)"
            )
            tables.append(ReportTable(title, columns, rows))
    return tables


def plot_budget(runs: pd.DataFrame, metrics: StudyMetrics, path: Path) -> Path | None:
    """Each test metric against queries used, one line per method (mean ± std over seeds)."""
    done = _study_runs(runs, metrics)
    if done.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(done.groupby(_STUDY_GROUP, sort=True))
    n_cols = max(len(metrics[str(key[1])]) for key, _ in groups)
    fig, axes = plt.subplots(
        len(groups), n_cols, figsize=(5.2 * n_cols, 4.0 * len(groups)), squeeze=False
    )
    for row, ((experiment, task, dataset, backend, model), group) in enumerate(groups):
        for col, (key, label) in enumerate(metrics[str(task)]):
            ax = axes[row][col]
            if f"test_{key}" not in group:
                ax.set_visible(False)  # results written before the task had this metric
                continue
            for method, of_method in group.groupby("method", sort=True):
                points = of_method.groupby("budget").agg(
                    queries=("queries_used", "mean"),
                    mean=(f"test_{key}", "mean"),
                    std=(f"test_{key}", "std"),
                )
                mean_curve(ax, points.queries, points["mean"], points["std"], str(method))
            ax.set_xscale("log")
            zero_shot = float(np.nanmean(group[f"zeroshot_test_{key}"])) * 100
            finish_panel(
                ax,
                f"{experiment}: {backend} {model}\n{dataset}",
                zero_shot,
                "zero-shot",
                "queries used",
                f"test {label} (%)",
            )
        for col in range(len(metrics[str(task)]), n_cols):
            axes[row][col].set_visible(False)
    return save_figure(fig, "Query-budget study: test metrics against queries used", path)


def mean_curve(ax: Any, x: Any, mean: pd.Series, std: pd.Series, label: str) -> None:
    """A mean-over-seeds line in percent, its std as error bars (none for one seed)."""
    ax.errorbar(x, mean * 100, yerr=std.fillna(0) * 100, marker="o", ms=4, capsize=3, label=label)


def panels(groups: Sequence[TableGroup], width: float) -> tuple[Any, list[tuple[Any, TableGroup]]]:
    """One subplot per report table (``TableGroup``: one experiment in one setting):
    (figure, [(axis, group)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), 4.2), squeeze=False)
    return fig, list(zip(axes[0], groups, strict=True))


def finish_panel(
    ax: Any,
    title: str,
    zero_shot: float,
    zero_shot_label: str,
    xlabel: str,
    ylabel: str,
) -> None:
    ax.axhline(zero_shot, color="gray", ls="--", lw=1, label=zero_shot_label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig: Any, title: str, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
