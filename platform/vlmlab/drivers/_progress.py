"""A live table of a sweep's trials: status, hyperparameters, queries and metric."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ray.tune import Callback

from vlmlab.specs import RunSpec


class _SweepTable(Callback):
    def __init__(self, live: Any, spec: RunSpec) -> None:
        self.live = live
        self.spec = spec
        self.rows: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its RunConfig; the screen stays here
        return {"spec": self.spec, "rows": {}, "live": None}

    @property
    def _metric(self) -> str:
        sweep = self.spec.sweep
        return sweep.metric if sweep else self.spec.task_entry.sweep_metrics[0]

    def _update(
        self, trial: Any, result: dict[str, Any] | None = None, status: str | None = None
    ) -> None:
        row = self.rows.setdefault(trial.trial_id, {"config": dict(trial.config)})
        row["status"] = status or trial.status
        if result:
            row["queries"] = result.get("queries_used")
            row["metric"] = result.get(self._metric)
        if self.live is not None:
            self.live.update(self.render())

    def render(self):
        from rich.table import Table

        metric = self._metric
        table = Table(title=f"sweep {self.spec.name}", expand=False)
        for column in ("trial", "status", "params", "queries", f"{metric} (%)"):
            table.add_column(column)
        for trial_id, row in sorted(self.rows.items()):
            params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in row["config"].items())
            value = row.get("metric")
            table.add_row(
                trial_id,
                row["status"],
                params,
                str(row.get("queries", "")),
                "" if value is None else f"{value * 100:.2f}",
            )
        return table

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trial, status="TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, status="ERROR")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def sweep_progress(console: Any, spec: RunSpec) -> Iterator[Callback]:
    from rich.live import Live

    with Live(console=console, refresh_per_second=2, transient=False) as live:
        table = _SweepTable(live, spec)
        live.update(table.render())
        yield table
