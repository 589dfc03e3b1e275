"""`tracking:` sends each trial's parameters and metrics to MLflow and TensorBoard."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboardX.proto import event_pb2
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.runner import run_experiment
from vlmlab.specs import validate_spec

TINY = {
    "name": "tracked",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 60, "forget": [0, 1]},
    "method": {"name": "bbf", "popsize": 6, "iterations": 6, "batch_size": 12},
    "budget": {"max_queries": 36},
    "seeds": [3],
    "eval_every": 2,
}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard folder's event files (TFRecord framing, read by hand)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_vlmlab_run_tracks_to_mlflow_and_tensorboard(conse, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE_DIR", cache_dir)
    spec_file = tmp_path / "tracked.yaml"
    spec_file.write_text(yaml.safe_dump(TINY))
    results = tmp_path / "results"
    command = ["run", str(spec_file), "--results", str(results), "--in-process"]
    out = CliRunner().invoke(app, [*command, "--track", "mlflow", "--track", "tensorboard"])
    assert out.exit_code == 0, out.output
    assert f"tracking: MLflow sqlite:///{results}/mlflow.db" in out.output

    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked-bbf-s3" and run.info.status == "FINISHED"
    assert run.data.params["method.popsize"] == "6" and run.data.params["budget"] == "36"
    used = client.get_metric_history(run.info.run_id, "queries_used")
    assert [m.step for m in used][:6] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in used][:6] == [6, 12, 18, 24, 30, 36]
    assert 0 <= run.data.metrics["final/test/H"] <= 1

    scalars = _scalars(results / "tensorboard" / "tracked-bbf-s3")
    assert [step for step, _ in scalars["queries_used"]][:6] == [1, 2, 3, 4, 5, 6]
    assert scalars["final/test/H"][0][1] == pytest.approx(
        run.data.metrics["final/test/H"], rel=1e-6
    )

    bad = CliRunner().invoke(app, [*command, "--track", "wandb"])
    assert bad.exit_code != 0 and "--track 'wandb': choose mlflow or tensorboard" in bad.output


def test_a_resumed_trial_continues_its_mlflow_run(conse, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = validate_spec({**TINY, "tracking": {"mlflow": uri, "experiment": "resumed"}}, "t")
    run_experiment(spec, tmp_path / "r", oracle=conse, stop_after=3)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resumed")
    (cut,) = client.search_runs([experiment.experiment_id])
    assert cut.info.status == "RUNNING"  # what a killed driver leaves too
    # Tracking is not part of the trial's identity: resuming without it is allowed too.
    run_experiment(spec, tmp_path / "r", oracle=conse, resume=True)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == cut.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "queries_used")]
    # Generation 3 ran after the last checkpoint (2), so the resumed trial ran it again.
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6]  # the last: the final metrics' step
