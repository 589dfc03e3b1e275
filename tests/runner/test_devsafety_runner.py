"""Model Developmental Safety through `vlmlab run`, `vlmlab report` and `vlmlab sweep`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.results import ResultsStore, load_artifact
from vlmlab.runner import load_data, run_experiment
from vlmlab.specs import validate_spec
from vlmlab.tasks import get_task

pytestmark = pytest.mark.slow

# The quickstart's recipe, scaled down (tests/methods/test_devsafety.py measures it).
TREE = {
    "name": "dev",
    "task": "devsafety",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 60, "val_shots": 20, "test_size": 500},
    "method": {
        "trainable": "target_heads",
        "base_epochs": 25,
        "beta": 1000.0,
        "epochs": 6,
        # vlmlab's CPU recipe, as the quickstart pins it (the defaults are the official GPU one)
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_steps": None,
        "negative_head": False,
        "weight": 1.0,
        "weight_reduction": "sum",
    },
    "variants": [{"name": "constrained"}, {"name": "finetune"}],
    "seeds": [1],
    "eval_every": 3,
}


@pytest.fixture(scope="module")
def devsafety_run(conse, tmp_path_factory):
    results = tmp_path_factory.mktemp("devsafety")
    spec = validate_spec(TREE, "test")
    return spec, results, run_experiment(spec, results, oracle=conse)


def test_rows_hold_target_gain_devsafety_and_w_old(devsafety_run):
    _, results, outcomes = devsafety_run
    runs = ResultsStore(results).runs().sort_values("run_id").reset_index(drop=True)
    assert runs.run_id.tolist() == ["dev-constrained-s1", "dev-finetune-s1"]
    assert (runs.status == "completed").all() and (runs.task == "devsafety").all()
    assert runs.generations.tolist() == [6, 6] and (runs.queries_used == 0).all()
    # 6 epochs x 3 steps (600 images / 256) x (256 target-batch rows + 9 x 10 control
    # rows); plain fine-tuning draws no control batch.
    assert runs.images_scored.tolist() == [6 * 3 * (256 + 90), 6 * 3 * 256]
    for split in ("test", "val"):
        gain = runs[f"{split}_target_acc"] - runs[f"zeroshot_{split}_target_acc"]
        assert (gain - runs[f"{split}_target_gain"]).abs().max() < 1e-9
        assert runs[f"{split}_devsafety"].between(-1, 1).all()
        assert (runs[f"zeroshot_{split}_devsafety"] == 0).all()  # w_old against itself
    assert runs.test_acc.notna().all() and "test_H" not in runs  # its task's columns only
    constrained, finetune = runs.iloc[0], runs.iloc[1]
    assert finetune.test_devsafety <= -0.5 < constrained.test_devsafety
    # safe_gain ranks a safe run by its gain, an unsafe one below every safe run.
    assert finetune.test_safe_gain == pytest.approx(-1 + finetune.test_devsafety)
    assert outcomes[0].test["devsafety"] == constrained.test_devsafety


def test_steps_hold_per_epoch_held_out_metrics(devsafety_run):
    _, results, _ = devsafety_run
    steps = ResultsStore(results).steps()
    mine = steps[steps.run_id == "dev-constrained-s1"]
    val = mine[mine.split == "val"]
    for metric in (
        "target_acc",
        "target_gain",
        "devsafety",
        *[f"acc_change_{c}" for c in range(1, 10)],
    ):
        assert sorted(val[val.metric == metric].step) == list(range(1, 7)), metric
    train = mine[mine.split == "train"]
    assert sorted(train[train.metric == "constraint_5"].step) == list(range(1, 7))
    tested = mine[(mine.split == "test") & (mine.metric == "devsafety")]
    assert sorted(tested.step) == [3, 6]  # every eval_every epochs
    # DevSafety each epoch is the minimum of the protected classes' changes.
    for _, rows in val.groupby("step"):
        changes = rows[rows.metric.str.startswith("acc_change_")].value
        assert rows[rows.metric == "devsafety"].value.iloc[0] == pytest.approx(changes.min())


def test_artifact_classifier_reproduces_test_metrics(devsafety_run, conse):
    spec, _, outcomes = devsafety_run
    artifact = load_artifact(outcomes[0].artifact)
    manifest = artifact.manifest
    assert manifest["kind"] == "devsafety" and manifest["target"] == [0]
    assert manifest["protected"] == list(range(1, 10))
    assert artifact.tensors["head_b"][1:].abs().max() == 0  # only the target's head trained
    test = load_data(spec.expand_trials()[0]).test
    features = conse.image_features(conse.register_images(test.image_set()))
    predictions = (features @ artifact.tensors["class_embeddings"].T).argmax(-1)
    labels = torch.as_tensor(test.labels)
    per_class = torch.stack([(predictions[labels == c] == c).float().mean() for c in range(10)])
    old = (features @ artifact.tensors["old_class_embeddings"].T).argmax(-1)
    old_per_class = torch.stack([(old[labels == c] == c).float().mean() for c in range(10)])
    change = per_class - old_per_class
    assert float(change[1:].min()) == pytest.approx(outcomes[0].test["devsafety"])
    assert float(per_class[0]) == pytest.approx(outcomes[0].test["target_acc"])


def test_report_shows_the_safety_ratio(devsafety_run):
    _, results, _ = devsafety_run
    runs = ResultsStore(results).runs()
    (table,) = get_task("devsafety").tables(runs, tolerance=0.02)
    assert "ConSE" in table.title and "fashion-mnist" in table.title
    rows = {row[0]: row for row in table.rows}
    finetune = runs[runs.method == "finetune"].iloc[0]
    assert rows["finetune"][7] == "0/1" and rows["finetune"][8] == "0/1"
    assert rows["finetune"][5] == f"{finetune.test_devsafety * 100:.2f}"
    out = CliRunner().invoke(app, ["report", str(results)])
    assert out.exit_code == 0, out.output
    assert "Model Developmental Safety" in out.output and "safety" in out.output
    assert "Model Developmental Safety" in (results / "report" / "report.md").read_text()
    assert (results / "report" / "devsafety_gain_vs_safety.png").stat().st_size > 1000


def test_safe_gain_counts_tolerance():
    from vlmlab.methods.devsafety import safe_gain

    assert safe_gain({"target_gain": 0.3, "devsafety": 0.0}) == 0.3
    assert safe_gain({"target_gain": 0.3, "devsafety": -0.02}) == pytest.approx(-1.02)
    assert safe_gain({"target_gain": 0.3, "devsafety": -0.02}, tolerance=0.02) == 0.3


def test_cli_run_in_process_prints_the_safety_headline(cache_dir, tmp_path):
    import yaml

    tree = {**TREE, "backend": {"name": "conse", "cache_dir": cache_dir}}
    spec_path = tmp_path / "dev.yaml"
    spec_path.write_text(yaml.safe_dump(tree))
    out = CliRunner().invoke(
        app, ["run", str(spec_path), "--in-process", "--results", str(tmp_path / "r")]
    )
    assert out.exit_code == 0, out.output
    assert "white-box, 6 epochs per trial" in out.output
    assert "constrained: target accuracy" in out.output and "safe (>= 0) in" in out.output
    assert "finetune: target accuracy" in out.output
    runs = ResultsStore(tmp_path / "r").runs()
    assert len(runs) == 2 and (runs.status == "completed").all()


def test_resume_after_interruption_matches(conse, tmp_path, devsafety_run):
    spec = validate_spec({**TREE, "variants": [{"name": "constrained"}]}, "test")
    run_experiment(spec, tmp_path, oracle=conse, stop_after=4)
    (resumed,) = run_experiment(spec, tmp_path, oracle=conse, resume=True)
    assert resumed.resumed_from == 3  # the last checkpoint
    assert resumed.test == devsafety_run[2][0].test


class _Finished:
    """A progress listener that records finished trials."""

    def __init__(self) -> None:
        self.finished: list[str] = []

    def trial_started(self, *args) -> None:
        pass

    def generation_done(self, *args) -> None:
        pass

    def trial_finished(self, outcome) -> None:
        self.finished.append(outcome.run_id)


def test_pool_actors_give_the_in_process_numbers(ray_session, cache_dir, devsafety_run, tmp_path):
    from vlmlab.drivers import run_experiment_on_pool

    threads = torch.get_num_threads()
    tree = {
        **TREE,
        "backend": {"name": "conse", "cache_dir": cache_dir},
        # Three actors of `threads` CPUs on the test's 4-CPU Ray: one must wait for a
        # finished trial's CPUs, while the driver keeps polling the others' progress.
        "pool": {"num_cpus": threads},
        "variants": [{"name": "constrained"}, {"name": "finetune"}, {"name": "weighted"}],
    }
    listener = _Finished()
    outcomes = run_experiment_on_pool(validate_spec(tree, "test"), tmp_path, listener=listener)
    assert sorted(listener.finished) == sorted(o.run_id for o in outcomes)
    assert outcomes[2].run_id == "dev-weighted-s1"
    for a, b in zip(outcomes[:2], devsafety_run[2], strict=True):
        assert a.run_id == b.run_id and a.test == b.test and a.val == b.val


def test_sweep_searches_beta_and_lr(ray_session, cache_dir, tmp_path):
    from vlmlab.drivers import run_sweep

    tree = {
        **TREE,
        "name": "dev-sweep",
        "backend": {"name": "conse", "cache_dir": cache_dir},
        "variants": None,
        "sweep": {
            "num_samples": 3,
            "max_concurrent": 2,
            "grace_epochs": 3,
            "trial_cpus": 1,
            "space": {
                "method.beta": {"type": "loguniform", "low": 100, "high": 3000},
                "method.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3},
            },
        },
    }
    spec = validate_spec(tree, "test")
    assert spec.sweep.metric == "val_safe_gain"
    grid = run_sweep(spec, tmp_path)
    assert len(grid) == 3 and not grid.errors
    runs = pd.read_parquet(tmp_path / "runs")
    assert len(runs) == 3 and set(runs.status) <= {"completed", "stopped"}
    assert (runs.task == "devsafety").all() and runs.val_safe_gain.notna().all()
    searched = {(m["beta"], m["lr"]) for m in (json.loads(c)["method"] for c in runs.config)}
    assert len(searched) == 3  # every trial ran its own hyperparameters
