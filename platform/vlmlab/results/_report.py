"""Paper-style tables and plots from a results folder.

Forgetting tables follow the Black-Box Forgetting paper: H, Err_fgt and
Acc_mem in percent, mean ± std over seeds, with the zero-shot prompt as the
first row. CraFT tables follow CraFT's few-shot figure: test accuracy in
percent by shots (columns) and method (rows), zero-shot first. Developmental
safety tables give, per method, the target accuracy before and after, DevSafety(acc)
and the safety ratio over seeds. Every table and
figure is titled with its backend, model and dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlmlab._io import atomic_write_bytes

FORGETTING_COLUMNS = (("H", "H"), ("err_fgt", "Err_fgt"), ("acc_mem", "Acc_mem"))


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


def _completed(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    return runs[(runs.task == task) & (runs.status == "completed")]


def _mean_std(values: pd.Series) -> str:
    values = values.dropna().astype(float) * 100
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def forgetting_tables(runs: pd.DataFrame) -> list[ReportTable]:
    """One table per (dataset, backend, model) of completed forgetting runs."""
    done = _completed(runs, "forgetting")
    tables = []
    for (dataset, backend, model), group in done.groupby(
        ["dataset", "backend", "model"], sort=True
    ):
        columns = ["method", "seeds", *[label for _, label in FORGETTING_COLUMNS], "queries"]
        rows = [
            [
                "zero-shot",
                str(group.seed.nunique()),
                *[
                    _mean_std(group[f"zeroshot_test_{key}"].drop_duplicates())
                    for key, _ in FORGETTING_COLUMNS
                ],
                "0",
            ]
        ]
        for method, runs_of_method in group.groupby("method", sort=True):
            rows.append(
                [
                    str(method),
                    str(len(runs_of_method)),
                    *[_mean_std(runs_of_method[f"test_{key}"]) for key, _ in FORGETTING_COLUMNS],
                    f"{int(runs_of_method.queries_used.median())}",
                ]
            )
        title = f"Black-Box Forgetting — {backend} {model} on {dataset} (test, %)"
        tables.append(ReportTable(title, columns, rows))
    return tables


def craft_tables(runs: pd.DataFrame) -> list[ReportTable]:
    """One table per (dataset, backend, model) of completed CraFT runs: accuracy by K × method."""
    done = _completed(runs, "craft")
    tables = []
    for (dataset, backend, model), group in done.groupby(
        ["dataset", "backend", "model"], sort=True
    ):
        ladder = sorted(int(k) for k in group.shots.dropna().unique())
        columns = ["method", *[f"{k}-shot" for k in ladder], "seeds", "queries"]
        by_shots = {k: group[group.shots == k] for k in ladder}
        # The zero-shot prompt's test accuracy does not depend on K: one value per run.
        rows = [
            [
                "zero-shot",
                *[_mean_std(by_shots[k].zeroshot_test_acc.drop_duplicates()) for k in ladder],
                str(group.seed.nunique()),
                "0",
            ]
        ]
        for method, of_method in group.groupby("method", sort=True):
            cells = [_mean_std(of_method[of_method.shots == k].test_acc) for k in ladder]
            queries = "/".join(
                str(int(of_method[of_method.shots == k].queries_used.median()))
                if (of_method.shots == k).any()
                else "-"
                for k in ladder
            )
            rows.append([str(method), *cells, str(of_method.seed.nunique()), queries])
        title = f"CraFT — {backend} {model} on {dataset} (test accuracy, %, by shots)"
        tables.append(ReportTable(title, columns, rows))
    return tables


def devsafety_tables(runs: pd.DataFrame, tolerance: float = 0.01) -> list[ReportTable]:
    """One table per (experiment, dataset, backend, model) of completed devsafety runs.

    Rows are methods; cells are test-split figures in percent, mean ± std over
    seeds. The safety ratio is the share of seeds with DevSafety(acc) >= 0 (the
    paper's definition); the next column allows ``tolerance`` (a stated slack).
    """
    done = _completed(runs, "devsafety")
    tables = []
    for (experiment, dataset, backend, model), group in done.groupby(
        ["experiment", "dataset", "backend", "model"], sort=True
    ):
        slack = f"{tolerance * 100:g}"
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
        for method, of_method in group.groupby("method", sort=True):
            safety = of_method.test_devsafety.astype(float)
            rows.append(
                [
                    str(method),
                    str(len(of_method)),
                    _mean_std(of_method.zeroshot_test_target_acc),
                    _mean_std(of_method.test_target_acc),
                    _mean_std(of_method.test_target_gain),
                    _mean_std(safety),
                    f"{safety.min() * 100:.2f}",
                    f"{int((safety >= 0).sum())}/{len(safety)}",
                    f"{int((safety >= -tolerance - 1e-12).sum())}/{len(safety)}",
                ]
            )
        title = (
            f"Model Developmental Safety — {experiment}: {backend} {model} on {dataset} (test, %)"
        )
        tables.append(ReportTable(title, columns, rows))
    return tables


STUDY_METRICS = {
    "forgetting": (("H", "H"), ("err_fgt", "Err_fgt"), ("acc_mem", "Acc_mem")),
    "craft": (("acc", "accuracy"),),
}
"""The test metrics a budget study reports for each black-box task."""

_STUDY_GROUP = ["experiment", "task", "dataset", "backend", "model"]


def _study_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Completed black-box runs of experiments that ran at two or more budgets."""
    done = runs[runs.task.isin(list(STUDY_METRICS)) & (runs.status == "completed")]
    budgets = done.groupby(_STUDY_GROUP).budget.transform("nunique")
    return done[budgets >= 2]


def budget_tables(runs: pd.DataFrame) -> list[ReportTable]:
    """Per study and metric: method (rows) x query budget (columns), test %, mean ± std."""
    tables = []
    for (experiment, task, dataset, backend, model), group in _study_runs(runs).groupby(
        _STUDY_GROUP, sort=True
    ):
        budgets = sorted(int(b) for b in group.budget.dropna().unique())
        for key, label in STUDY_METRICS[str(task)]:
            columns = ["method", *[f"{b} queries" for b in budgets], "seeds"]
            zero_shot = _mean_std(group[f"zeroshot_test_{key}"].drop_duplicates())
            rows = [["zero-shot", *[zero_shot for _ in budgets], str(group.seed.nunique())]]
            for method, of_method in group.groupby("method", sort=True):
                cells = [
                    _mean_std(of_method[of_method.budget == b][f"test_{key}"]) for b in budgets
                ]
                rows.append([str(method), *cells, str(of_method.seed.nunique())])
            title = (
                f"Budget study — {experiment}: {label} by query budget "
                f"({backend} {model} on {dataset}, test, %)"
            )
            tables.append(ReportTable(title, columns, rows))
    return tables


def plot_budget(runs: pd.DataFrame, path: Path) -> Path | None:
    """Each test metric against queries used, one line per method (mean ± std over seeds)."""
    done = _study_runs(runs)
    if done.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(done.groupby(_STUDY_GROUP, sort=True))
    n_cols = max(len(STUDY_METRICS[str(key[1])]) for key, _ in groups)
    fig, axes = plt.subplots(
        len(groups), n_cols, figsize=(5.2 * n_cols, 4.0 * len(groups)), squeeze=False
    )
    for row, ((experiment, task, dataset, backend, model), group) in enumerate(groups):
        for col, (key, label) in enumerate(STUDY_METRICS[str(task)]):
            ax = axes[row][col]
            for method, of_method in group.groupby("method", sort=True):
                points = of_method.groupby("budget").agg(
                    queries=("queries_used", "mean"),
                    mean=(f"test_{key}", "mean"),
                    std=(f"test_{key}", "std"),
                )
                _mean_curve(ax, points.queries, points["mean"], points["std"], str(method))
            ax.set_xscale("log")
            zero_shot = float(np.nanmean(group[f"zeroshot_test_{key}"])) * 100
            _finish_panel(
                ax,
                (dataset, backend, model),
                zero_shot,
                "zero-shot",
                "queries used",
                f"test {label} (%)",
            )
            ax.set_title(f"{experiment}: {backend} {model}\n{dataset}", fontsize=9)
        for col in range(len(STUDY_METRICS[str(task)]), n_cols):
            axes[row][col].set_visible(False)
    return _save_figure(fig, "Query-budget study: test metrics against queries used", path)


def _mean_curve(ax, x, mean: pd.Series, std: pd.Series, label: str) -> None:
    """A mean-over-seeds line in percent, its std as error bars (none for one seed)."""
    ax.errorbar(x, mean * 100, yerr=std.fillna(0) * 100, marker="o", ms=4, capsize=3, label=label)


def _panels(done: pd.DataFrame, width: float):
    """One subplot per (dataset, backend, model) group of ``done``: (figure, [(axis, key, rows)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(done.groupby(["dataset", "backend", "model"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), 4.2), squeeze=False)
    return fig, [(ax, key, rows) for ax, (key, rows) in zip(axes[0], groups, strict=True)]


def _finish_panel(
    ax, key: tuple, zero_shot: float, zero_shot_label: str, xlabel: str, ylabel: str
) -> None:
    dataset, backend, model = key
    ax.axhline(zero_shot, color="gray", ls="--", lw=1, label=zero_shot_label)
    ax.set_title(f"{backend} {model}\n{dataset}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save_figure(fig, title: str, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_craft(runs: pd.DataFrame, path: Path) -> Path | None:
    """Test accuracy against shots, one line per method (mean over seeds); PNG at ``path``."""
    done = _completed(runs, "craft")
    if done.empty:
        return None
    fig, panels = _panels(done, width=6.0)
    for ax, key, group in panels:
        for method, of_method in group.groupby("method", sort=True):
            curve = of_method.groupby("shots").test_acc.agg(["mean", "std"]).sort_index()
            _mean_curve(ax, curve.index, curve["mean"], curve["std"], str(method))
        ax.set_xscale("log", base=2)
        zero_shot = float(np.nanmean(group.zeroshot_test_acc)) * 100
        _finish_panel(ax, key, zero_shot, "zero-shot", "shots per class", "test accuracy (%)")
    return _save_figure(fig, "CraFT: accuracy by shots", path)


def plot_devsafety(runs: pd.DataFrame, path: Path) -> Path | None:
    """Each run's test target gain against its DevSafety(acc), by method; PNG at ``path``.

    Safe runs sit on or above the dashed line; the best are far to the right.
    """
    done = _completed(runs, "devsafety")
    if done.empty:
        return None
    fig, panels = _panels(done, width=6.0)
    for ax, key, group in panels:
        for method, of_method in group.groupby("method", sort=True):
            ax.scatter(
                of_method.test_target_gain * 100,
                of_method.test_devsafety * 100,
                s=28,
                label=f"{method} ({len(of_method)} runs)",
            )
        _finish_panel(
            ax,
            key,
            0.0,
            "DevSafety = 0 (safe above)",
            "target gain (points)",
            "DevSafety(acc) (points)",
        )
    return _save_figure(fig, "Model Developmental Safety: target gain vs DevSafety (test)", path)


def plot_forgetting(runs: pd.DataFrame, steps: pd.DataFrame, path: Path) -> Path | None:
    """Validation and test H against queries used, one line per run; PNG at ``path``."""
    done = _completed(runs, "forgetting")
    if done.empty:
        return None
    fig, panels = _panels(done, width=6.5)
    import matplotlib.pyplot as plt  # after _panels chose the headless backend

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, group in panels:
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
        _finish_panel(
            ax,
            key,
            float(np.nanmean(group.zeroshot_test_H)),
            "zero-shot (test)",
            "queries used",
            "H (faint: best validation H; markers: test H)",
        )
    return _save_figure(fig, "Black-Box Forgetting: H against queries", path)
