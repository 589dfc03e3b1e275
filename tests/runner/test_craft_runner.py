"""CraFT through `vlmlab run`: the few-shot ladder, its report, artifacts, ledger and resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.methods.craft import RefinementHead
from vlmlab.results import ResultsStore, load_artifact
from vlmlab.runner import load_data, run_experiment
from vlmlab.specs import validate_spec
from vlmlab.tasks import get_task

pytestmark = pytest.mark.slow

LADDER = {
    "name": "ladder",
    "task": "craft",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": [1, 2], "test_size": 200},
    "method": {"name": "craft"},
    # popsize 40 = 40 budget queries a generation (official): 2 and 3 generations.
    "budget": {"by_shots": {1: 100, 2: 130}},
    "variants": [{"name": "craft"}, {"name": "prompt_only"}],
    "seeds": [1],
    "eval_every": 2,
}


@pytest.fixture(scope="module")
def ladder(conse, tmp_path_factory):
    results = tmp_path_factory.mktemp("ladder")
    spec = validate_spec(LADDER, "test")
    outcomes = run_experiment(spec, results, oracle=conse)
    return spec, results, outcomes


def test_ladder_writes_one_row_per_shots_and_method(conse, ladder):
    _, results, _ = ladder
    runs = ResultsStore(results).runs().sort_values("run_id").reset_index(drop=True)
    assert runs.run_id.tolist() == [
        "ladder-craft-k1-s1",
        "ladder-craft-k2-s1",
        "ladder-prompt_only-k1-s1",
        "ladder-prompt_only-k2-s1",
    ]
    assert (runs.status == "completed").all() and (runs.task == "craft").all()
    assert runs.shots.tolist() == [1, 2, 1, 2]
    assert runs.budget.tolist() == [100, 130, 100, 130]
    assert runs.generations.tolist() == [2, 3, 2, 3]
    assert runs.queries_used.tolist() == [80, 120, 80, 120]
    for column in ("test_acc", "val_acc", "zeroshot_test_acc", "zeroshot_val_acc"):
        assert runs[column].between(0, 1).all(), column
    assert "test_H" not in runs  # a CraFT run file holds no forgetting column
    assert runs.zeroshot_test_acc.nunique() == 1  # the same prompt on the same test subset
    # The ledger saw exactly the queries each trial recorded, and none past its budget;
    # the head's one query a generation is counted apart (the official code does not
    # charge it), prompt-only has none.
    for row in runs.itertuples():
        keys = [key for key in list(conse.ledger.keys()) if key.startswith(f"{row.run_id}@")]
        spent = sum(
            conse.ledger.usage(key).queries for key in keys if not key.endswith((":eval", ":head"))
        )
        head = sum(conse.ledger.usage(key).queries for key in keys if key.endswith(":head"))
        assert spent == row.queries_used <= row.budget
        assert head == (row.generations if row.method == "craft" else 0)
    steps = ResultsStore(results).steps()
    craft_k2 = steps[steps.run_id == "ladder-craft-k2-s1"]
    assert sorted(craft_k2.step.unique()) == [1, 2, 3]
    assert set(craft_k2[craft_k2.split == "test"].step) == {2, 3}
    assert {"train_acc", "refine_loss", "fitness_best"} <= set(craft_k2.metric)
    assert "refine_loss" not in set(steps[steps.run_id == "ladder-prompt_only-k2-s1"].metric)


def test_report_table_by_shots_and_method(ladder, tmp_path):
    _, results, _ = ladder
    runs = ResultsStore(results).runs()
    (table,) = get_task("craft").tables(runs)
    assert "ConSE" in table.title and "fashion-mnist" in table.title
    assert table.columns == ["method", "1-shot", "2-shot", "seeds", "queries"]
    assert [row[0] for row in table.rows] == ["zero-shot", "craft", "prompt_only"]
    craft_row = table.rows[1]
    k1 = runs[(runs.method == "craft") & (runs.shots == 1)].test_acc.iloc[0]
    assert craft_row[1] == f"{k1 * 100:.2f}" and craft_row[4] == "80/120"

    output = CliRunner().invoke(app, ["report", str(results)])
    assert output.exit_code == 0, output.output
    assert "CraFT" in output.output and "2-shot" in output.output
    assert (results / "report" / "craft_accuracy_vs_shots.png").stat().st_size > 0
    assert "| craft |" in (results / "report" / "report.md").read_text()


def test_artifact_reproduces_the_test_accuracy(conse, ladder):
    spec, results, _ = ladder
    runs = ResultsStore(results).runs().set_index("run_id")
    test = load_data(spec).test
    test_ref = conse.register_images(test.image_set())

    craft = load_artifact(runs.loc["ladder-craft-k2-s1", "artifact"])
    assert craft.manifest["kind"] == "craft" and craft.manifest["shots"] == 2
    head = RefinementHead.from_tensors(craft.tensors)
    logits = conse.logits(craft.contexts, craft.manifest["class_names"], test_ref)[0]
    predictions = head(logits).argmax(-1).numpy()  # a loaded head is for inference only
    accuracy = float(np.mean(predictions == test.labels))
    assert accuracy == runs.loc["ladder-craft-k2-s1", "test_acc"]

    prompt_only = load_artifact(runs.loc["ladder-prompt_only-k2-s1", "artifact"])
    assert not any(name.startswith("refinement.") for name in prompt_only.tensors)
    with pytest.raises(ValueError, match="no refinement head"):
        RefinementHead.from_tensors(prompt_only.tensors)


def test_resume_equals_uninterrupted(conse, tmp_path):
    tree = {**LADDER, "data": {**LADDER["data"], "shots": 2}, "variants": None}
    tree["budget"] = {"max_queries": 160}  # 4 generations
    spec = validate_spec(tree, "test")
    run_experiment(spec, tmp_path / "straight", oracle=conse)
    (cut,) = run_experiment(spec, tmp_path / "cut", oracle=conse, stop_after=2)
    assert cut.extra.get("interrupted") and cut.generations == 2
    (resumed,) = run_experiment(spec, tmp_path / "cut", oracle=conse, resume=True)
    assert resumed.resumed_from == 2 and resumed.queries_used == 160

    def steps(folder):
        table = ResultsStore(folder).steps().drop(columns=["wall_seconds"])
        return table.sort_values(["step", "split", "metric"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(steps(tmp_path / "straight"), steps(tmp_path / "cut"))


def test_the_papers_backend_runs_craft(clip_factory, tmp_path):
    """open_clip RN50 (random init here: no weights offline) through the same runner."""
    tree = {
        **LADDER,
        "backend": {"name": "open_clip:RN50", "pretrained": "random-init"},
        "data": {"dataset": "fashion-mnist", "shots": 1, "test_size": 20},
        "method": {"name": "craft", "popsize": 4},
        "budget": {"max_queries": 8},  # 2 generations of 4 candidates
        "variants": None,
    }
    (outcome,) = run_experiment(validate_spec(tree, "test"), tmp_path, oracle=clip_factory("RN50"))
    assert outcome.backend == "open_clip" and outcome.model.startswith("RN50")
    assert outcome.queries_used == 8 and 0 <= outcome.test["acc"] <= 1
    artifact = load_artifact(outcome.artifact)
    assert artifact.contexts.shape == (1, 4, 512)  # RN50's text width
    assert RefinementHead.from_tensors(artifact.tensors).mlp[0].in_features == 10


def test_no_validation_split_reports_no_val_acc(conse, tmp_path):
    """``data.val_shots: 0`` (the paper configs: the official code has no validation
    split): the run evaluates the test split only; val columns stay empty."""
    tree = {**LADDER, "data": {**LADDER["data"], "shots": 1, "val_shots": 0}}
    tree["budget"] = {"max_queries": 80}  # 2 generations
    tree["variants"] = [{"name": "craft"}, {"name": "coop", "coop": {"epochs": 2}}]
    outcomes = run_experiment(validate_spec(tree, "test"), tmp_path, oracle=conse)
    assert [o.method for o in outcomes] == ["craft", "coop"]
    runs = ResultsStore(tmp_path).runs()
    assert (runs.status == "completed").all()
    assert runs.test_acc.between(0, 1).all() and runs.zeroshot_test_acc.between(0, 1).all()
    assert runs.val_acc.isna().all() and runs.zeroshot_val_acc.isna().all()
    assert all(o.val == {} for o in outcomes)
    steps = ResultsStore(tmp_path).steps()
    assert "val" not in set(steps.split) and "test" in set(steps.split)
