"""Tracking (beside the runner): MLflow and TensorBoard, from ``tracking:`` in a spec.

``vlmlab run`` feeds :class:`Tracker` (a :class:`vlmlab.runner.ProgressListener`)
from the driver: one MLflow run per trial (its parameters are the spec's
fields, dotted; its metrics every generation's rows, ``<split>/<metric>`` at
step = generation, then the final test metrics), and one TensorBoard folder
per trial. A resumed trial continues its MLflow run (found by the
``vlmlab.run_id`` tag) instead of starting a second one.

``vlmlab sweep`` uses Ray Tune's own logger callbacks instead
(``vlmlab.drivers``: ``MLflowLoggerCallback``, a run per trial with its config
as parameters and every report as metrics, and ``TBXLoggerCallback``).

Both need the ``tracking`` extra (``mlflow-skinny``, ``sqlalchemy``,
``alembic``, ``tensorboardX``); without a ``tracking:`` section nothing is
imported or sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlmlab.specs import RunSpec, TrackingSpec
from vlmlab.storage import Location, locate

RUN_ID_TAG = "vlmlab.run_id"


def mlflow_uri(tracking: TrackingSpec, results: Location) -> str | None:
    """The tracking URI ``tracking`` asks for (see :class:`TrackingSpec`), or None."""
    if not tracking.mlflow:
        return None
    if isinstance(tracking.mlflow, str):
        return tracking.mlflow
    folder = results.local_path if results.is_local else Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def tensorboard_dir(tracking: TrackingSpec, results: Location) -> Path | None:
    if not tracking.tensorboard:
        return None
    return (results.local_path if results.is_local else Path.cwd()) / "tensorboard"


def spec_params(spec: RunSpec) -> dict[str, str]:
    """The spec's fields as MLflow parameters: dotted paths to values (lists as JSON)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, str) else json.dumps(value)

    tree = json.loads(spec.model_dump_json(exclude={"tracking", "sweep", "study", "expected"}))
    walk("", tree)
    return {key: value[:6000] for key, value in flat.items()}  # MLflow's value limit


def with_tracking(spec: RunSpec, results: str | Path | Location, listener: Any) -> Any:
    """``listener``, and a :class:`Tracker` beside it when the spec asks for tracking."""
    if spec.tracking is None or not spec.tracking.enabled:
        return listener
    return Listeners(listener, Tracker(spec, results))


class Tracker:
    """A progress listener that sends every trial's parameters and metrics on.

    Args:
        spec: the run's spec (its ``tracking`` section says where to).
        results: the results root (where the default stores live).
    """

    def __init__(self, spec: RunSpec, results: str | Path | Location) -> None:
        tracking = spec.tracking or TrackingSpec()
        location = locate(results)
        self.mlflow_uri = mlflow_uri(tracking, location)
        self.tensorboard_dir = tensorboard_dir(tracking, location)
        self.experiment = tracking.experiment or spec.name
        self._params = spec_params(spec)
        self._runs: dict[str, str] = {}  # vlmlab run id -> MLflow run id
        self._writers: dict[str, Any] = {}
        self._client: Any = None
        self._experiment_id = ""
        if self.mlflow_uri is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.mlflow_uri)
            found = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                found.experiment_id
                if found is not None
                else self._client.create_experiment(self.experiment)
            )

    def where(self) -> list[str]:
        """Human-readable destinations, for the CLI's first lines."""
        places = []
        if self.mlflow_uri is not None:
            places.append(f"MLflow {self.mlflow_uri} (experiment {self.experiment!r})")
        if self.tensorboard_dir is not None:
            places.append(f"TensorBoard {self.tensorboard_dir}")
        return places

    # ------------------------------------------------------------ listener
    def trial_started(self, run_id: str, generations: int, budget: int | None, start: int) -> None:
        if self._client is not None and run_id not in self._runs:
            self._runs[run_id] = self._mlflow_run(run_id, budget)
        if self.tensorboard_dir is not None and run_id not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[run_id] = SummaryWriter(str(self.tensorboard_dir / run_id))

    def _mlflow_run(self, run_id: str, budget: int | None) -> str:
        from mlflow.entities import Param

        client = self._client
        earlier = client.search_runs(
            [self._experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'"
        )
        if earlier:  # a resumed trial continues its run
            mlflow_id: str = earlier[0].info.run_id
            client.update_run(mlflow_id, status="RUNNING")
            return mlflow_id
        run = client.create_run(self._experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id})
        params = [Param(key, value) for key, value in self._params.items()]
        params.append(Param("budget", json.dumps(budget)))
        for first in range(0, len(params), 100):  # MLflow takes 100 parameters a batch
            client.log_batch(run.info.run_id, params=params[first : first + 100])
        return str(run.info.run_id)

    def generation_done(self, run_id: str, progress: Any) -> None:
        values = {f"{split}/{name}": value for split, name, value in progress.rows()}
        values["queries_used"] = float(progress.queries_used)
        self._log(run_id, values, progress.generation)

    def trial_finished(self, outcome: Any) -> None:
        values = {f"final/test/{name}": value for name, value in outcome.test.items()}
        values |= {f"final/val/{name}": value for name, value in outcome.val.items()}
        values |= {f"final/zeroshot_test/{name}": v for name, v in outcome.zeroshot_test.items()}
        values["queries_used"] = float(outcome.queries_used)
        self._log(outcome.run_id, values, outcome.generations)
        run = self._runs.pop(outcome.run_id, None)
        if run is not None:  # an interrupted trial never gets here: its run stays RUNNING
            self._client.set_terminated(run, status="FINISHED")
        writer = self._writers.pop(outcome.run_id, None)
        if writer is not None:
            writer.close()

    def _log(self, run_id: str, values: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None and v == v}
        run = self._runs.get(run_id)
        if run is not None and finite:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k.replace("@", "_"), v, now, step) for k, v in finite.items()]
            self._client.log_batch(run, metrics=metrics)
        writer = self._writers.get(run_id)
        if writer is not None:
            for key, value in finite.items():
                writer.add_scalar(key, value, step)
            writer.flush()


class Listeners:
    """Several progress listeners as one (the CLI's progress bars and a tracker)."""

    def __init__(self, *listeners: Any) -> None:
        self.listeners = [listener for listener in listeners if listener is not None]

    def trial_started(self, run_id: str, generations: int, budget: int | None, start: int) -> None:
        for listener in self.listeners:
            listener.trial_started(run_id, generations, budget, start)

    def generation_done(self, run_id: str, progress: Any) -> None:
        for listener in self.listeners:
            listener.generation_done(run_id, progress)

    def trial_finished(self, outcome: Any) -> None:
        for listener in self.listeners:
            listener.trial_finished(outcome)
