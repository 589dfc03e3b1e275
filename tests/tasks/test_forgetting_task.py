"""The forgetting task's spec rules: forget classes by name, the official defaults."""

from __future__ import annotations

import pytest

from vlmlab.errors import TrialsFailedError
from vlmlab.methods.forgetting import ForgettingConfig
from vlmlab.results import load_artifact
from vlmlab.runner import run_experiment
from vlmlab.specs import validate_spec

TREE = {
    "name": "by-name",
    "backend": {"name": "latency:0"},
    "data": {"dataset": "fashion-mnist", "shots": 1, "test_size": 20},
    "method": {"popsize": 4, "iterations": 1, "n_context": 2, "shared_dim": 2, "unique_dim": 1},
}


def test_forget_classes_by_name_or_index(tmp_path):
    tree = {**TREE, "data": {**TREE["data"], "forget": ["trousers", "T-shirt", 4]}}
    (outcome,) = run_experiment(validate_spec(tree, "t"), tmp_path)
    manifest = load_artifact(outcome.artifact).manifest
    assert manifest["forget"] == [0, 1, 4] and manifest["memorize"] == [2, 3, 5, 6, 7, 8, 9]


def test_a_class_name_file_renames_prompts_and_forget_names(tmp_path):
    names = tmp_path / "names.yaml"
    names.write_text("T-shirt: tee shirt\ntrousers: pants\n")
    tree = {**TREE, "data": {**TREE["data"], "class_names": str(names), "forget": ["pants", 4]}}
    (outcome,) = run_experiment(validate_spec(tree, "t"), tmp_path / "out")
    manifest = load_artifact(outcome.artifact).manifest
    assert manifest["forget"] == [1, 4]
    assert manifest["class_names"][:3] == ["tee shirt", "pants", "pullover sweater"]
    inline = {**TREE, "data": {**TREE["data"], "class_names": ["c"] * 10}}
    with pytest.raises(ValueError, match="names must be distinct"):
        run_experiment(validate_spec(inline, "t"), tmp_path / "inline")


def test_unknown_forget_class_names_the_field_and_the_classes(tmp_path):
    tree = {**TREE, "data": {**TREE["data"], "forget": ["jacket"]}}
    with pytest.raises(TrialsFailedError, match=r"data\.forget: .jacket. is not a class .*T-shirt"):
        run_experiment(validate_spec(tree, "t"), tmp_path)


def test_official_defaults():
    config = validate_spec({"name": "d"}, "t").method
    assert isinstance(config, ForgettingConfig)  # the spec's section is the method's config
    assert config.fitness == "full" and config.baseline_dim is None
    assert (config.batch_order, config.loss_precision, config.context_rounding, config.csa) == (
        "shuffled",
        "fp16",
        "fp16",
        "pycma3",
    )
    ours = {
        "batch_order": "shared",
        "loss_precision": "fp64",
        "context_rounding": "none",
        "csa": "installed",
    }
    spec = validate_spec({"name": "d", "method": ours}, "t")
    chosen = spec.method
    assert {name: getattr(chosen, name) for name in ours} == ours
    with pytest.raises(ValueError, match=r"method\.batch_order"):
        validate_spec({"name": "d", "method": {"batch_order": "random"}}, "t")
