"""Specs: every shipped spec validates; malformed ones are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmlab.specs import SpecError, apply_overrides, load_spec, validate_spec

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert all(trial.generations >= 1 for trial in spec.expand_trials())
    offline = spec.backend.name == "conse" or "vlmlab-tiny" in spec.backend.name
    if not offline:
        assert spec.expected, f"{path.name}: paper configs carry the paper's numbers as `expected:`"


def test_quickstart_is_offline_and_within_2000_queries():
    spec = load_spec(Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml")
    assert spec.backend.name == "conse" and spec.data.dataset == "fashion-mnist"
    assert spec.data.forget == [0, 1, 2, 3] and spec.data.shots == 16
    assert spec.budget.max_queries <= 2000


MALFORMED = [
    ({"method": {"popsize": 1}}, "method.popsize: got 1"),
    (
        {"method": {"name": "lcs"}},
        "method.name: got 'lcs'; allowed for task forgetting: bbf, bbt, wo_lcs",
    ),
    ({"method": {"popsize": "twenty"}}, "method.popsize: got 'twenty'"),
    ({"method": {"sigma": 0}}, "method.sigma: got 0"),
    ({"method": {"pop_size": 20}}, "method.pop_size: unknown field; allowed: name, n_context"),
    ({"data": {"shots": 0}}, "data.shots: got 0"),
    (
        {"data": {"dataset": "mnist"}},
        "data.dataset: got 'mnist'; unknown dataset; allowed: fashion-mnist",
    ),
    ({"data": {"forget": [1, 1]}}, "data.forget: got [1, 1]; must be distinct"),
    (
        {"data": {"dataset": "imagefolder"}},
        "data: data.root is required for the imagefolder dataset",
    ),
    ({"data": {"forget_fraction": 1.5}}, "data.forget_fraction: got 1.5"),
    (
        {"backend": {"name": "clip"}},
        "backend.name: got 'clip'; unknown backend 'clip'; available: conse, latency, open_clip",
    ),
    ({"backend": {"precision": "fp8"}}, "backend.precision: got 'fp8'"),
    (
        {"backend": {"name": "conse", "pretrained": "openai"}},
        "backend.pretrained: the conse backend has no pretrained weights to choose",
    ),
    (
        {"backend": {"name": "conse:big"}},
        "backend.name: got 'conse:big'; the conse backend takes no model",
    ),
    ({"budget": {"max_queries": -5}}, "budget.max_queries: got -5"),
    (
        {"budget": {"max_queries": 10}},
        "budget.max_queries: 10 queries (16-shot) cannot pay for one generation (20 queries at method.popsize=20)",
    ),
    ({"seeds": []}, "seeds: got []"),
    ({"seeds": [1, 1]}, "seeds: got [1, 1]; seeds must be distinct"),
    ({"name": "my run"}, "name: got 'my run'; must be letters"),
    ({"colour": "red"}, "colour: unknown field; allowed: name, description, task"),
    ({"task": "unlearning"}, "task: got 'unlearning'"),
    ({"study": {"budgets": [100, 100]}}, "study.budgets: got [100, 100]; budgets must be distinct"),
    ({"study": {"budgets": [10, 100]}}, "study.budgets: [10] cannot pay for one generation"),
    (
        {"task": "devsafety", "study": {"budgets": [100]}},
        "study: the devsafety task spends no oracle queries",
    ),
    (
        {"data": {"shots": [1, 2]}, "study": {"budgets": [100]}},
        "data.shots: a budget study runs one shot count",
    ),
    (
        {"task": "devsafety", "method": {"name": "bbf"}},
        "method.name: got 'bbf'; allowed for task devsafety: constrained, finetune, weighted",
    ),
    ({"task": "devsafety", "method": {"gamma": 0}}, "method.gamma: got 0"),
    (
        {"task": "devsafety", "method": {"trainable": "backbone"}},
        "method.trainable: got 'backbone'",
    ),
    (
        {"task": "devsafety", "prompt": "a photo"},
        "prompt: got 'a photo'; must contain '{}' exactly once",
    ),
    (
        {"task": "craft", "prompt": "a photo of a {}, a type of pet."},
        "prompt: the craft task learns the words before the class name",
    ),
    ({"prompt": "{}."}, "prompt: the forgetting task learns the words before the class name"),
    (
        {"task": "devsafety", "data": {"target": [2, 2]}},
        "data.target: got [2, 2]; must be distinct",
    ),
    (
        {"task": "devsafety", "budget": {"max_queries": 100}},
        "budget: the devsafety task trains the model and spends no oracle queries",
    ),
    (
        {
            "task": "devsafety",
            "sweep": {
                "space": {"method.beta": {"type": "uniform", "low": 10, "high": 100}},
                "metric": "val_acc",
            },
        },
        "sweep.metric: 'val_acc' is not measured by the devsafety task; allowed: val_safe_gain",
    ),
    (
        {"task": "craft", "method": {"name": "bbf"}},
        "method.name: got 'bbf'; allowed for task craft: craft, prompt_only, refine_only, no_consistency",
    ),
    (
        {"task": "craft", "method": {"name": "craft", "sigmaa": 1}},
        "method.sigmaa: unknown field; allowed: name, latent_dim",
    ),
    ({"task": "craft", "method": {"popsize": 1}}, "method.popsize: got 1"),
    ({"task": "craft", "method": {"lr": 0}}, "method.lr: got 0"),
    ({"data": {"shots": [1, 1]}}, "shots must be a positive integer or a list of distinct ones"),
    ({"data": {"shots": [0, 2]}}, "shots must be a positive integer or a list of distinct ones"),
    (
        {"task": "craft", "data": {"shots": [1, 2]}, "budget": {"by_shots": {1: 2000}}},
        "budget.by_shots: no budget for shots [2]",
    ),
    (
        {"task": "craft", "budget": {"by_shots": {16: 30}}},
        "budget.by_shots: 30 queries (16-shot) cannot pay for one generation (40 queries",
    ),
    (
        {"budget": {"max_queries": 100, "by_shots": {16: 100}}},
        "set max_queries or by_shots, not both",
    ),
    (
        {
            "task": "craft",
            "sweep": {
                "space": {"method.sigma": {"type": "uniform", "low": 0.1, "high": 1}},
                "metric": "val_H",
            },
        },
        "sweep.metric: 'val_H' is not measured by the craft task; allowed: val_acc, test_acc",
    ),
    (
        {
            "task": "craft",
            "data": {"shots": [1, 2]},
            "sweep": {"space": {"method.sigma": {"type": "uniform", "low": 0.1, "high": 1}}},
        },
        "data.shots: a sweep tunes one shot count",
    ),
]


@pytest.mark.parametrize(("patch", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_spec_names_file_field_value(tmp_path, patch, message):
    tree = {"name": "t", **patch}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert str(path) in text and message in text, text


def test_all_problems_reported_together():
    with pytest.raises(SpecError) as info:
        validate_spec(
            {"name": "t", "method": {"popsize": 1, "sigma": -1}, "data": {"shots": 0}}, "x.yaml"
        )
    text = str(info.value)
    assert "x.yaml: 3 problems" in text
    assert all(f in text for f in ("method.popsize", "method.sigma", "data.shots"))


def test_every_cross_field_problem_reported_together():
    tree = {"name": "t", "budget": {"max_queries": 10}, "study": {"budgets": [5, 100]}}
    with pytest.raises(SpecError) as info:
        validate_spec(tree, "x.yaml")
    text = str(info.value)
    assert "x.yaml: 2 problems" in text, text
    assert "study.budgets: [5] cannot pay for one generation" in text
    assert "budget.max_queries: 10 queries (16-shot) cannot pay for one generation" in text


def test_field_and_method_problems_reported_together():
    tree = {"name": "t", "task": "craft", "method": {"lr": 0}, "seeds": [], "colour": 1}
    with pytest.raises(SpecError) as info:
        validate_spec(tree, "x.yaml")
    text = str(info.value)
    assert "x.yaml: 3 problems" in text, text
    assert all(f in text for f in ("method.lr: got 0", "seeds: got []", "colour: unknown field"))


def test_registered_backends_are_accepted():
    spec = validate_spec({"name": "t", "backend": {"name": "latency:5"}}, "x.yaml")
    assert spec.backend.name == "latency:5" and spec.backend.oracle_kwargs() == {}


def test_missing_name_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="name: required field is missing"):
        validate_spec({}, "x.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(FileNotFoundError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmethod:\n  popsize: 20\n")
    spec = load_spec(
        path, ["method.popsize=30", "seeds=[1,2]", "method.sep_cma=true", "data.forget=null"]
    )
    assert spec.method.popsize == 30 and spec.seeds == [1, 2] and spec.method.sep_cma
    with pytest.raises(SpecError, match=r"method\.popsiz: unknown field"):
        load_spec(path, ["method.popsiz=30"])
    with pytest.raises(SpecError, match="expected PATH=VALUE"):
        apply_overrides({}, ["method.popsize"])
    with pytest.raises(SpecError, match="name is not a section"):
        apply_overrides({"name": "s"}, ["name.x=1"])


def test_variants_expand_to_one_spec_per_method():
    spec = validate_spec(
        {"name": "v", "variants": [{"name": "bbf"}, {"name": "bbt", "sigma": 0.5}]}, "x.yaml"
    )
    bbf, bbt = spec.expand_trials()
    assert (bbf.method.name, bbt.method.name, bbt.method.sigma) == ("bbf", "bbt", 0.5)
    assert bbf.name == bbt.name == "v" and bbf.variants is None
    same = validate_spec({"name": "v", "variants": [{"sigma": 0.5}, {"sigma": 2.0}]}, "x.yaml")
    assert [s.name for s in same.expand_trials()] == ["v-v0", "v-v1"]
    with pytest.raises(SpecError, match=r"variants\[1\]\.popsize: got 1"):
        validate_spec({"name": "v", "variants": [{"name": "bbt"}, {"popsize": 1}]}, "x.yaml")


def test_val_shots_zero_is_craft_only_and_never_swept_on():
    """``data.val_shots: 0`` (no validation split, CraFT's official protocol): refused by
    tasks that choose their result on validation, and by a sweep on a val_ metric."""
    craft = validate_spec({"name": "t", "task": "craft", "data": {"val_shots": 0}}, "x.yaml")
    assert craft.data.val_shots == 0
    for task in ("forgetting", "devsafety"):
        with pytest.raises(SpecError, match=rf"data.val_shots: 0 .* not allowed by the {task}"):
            validate_spec({"name": "t", "task": task, "data": {"val_shots": 0}}, "x.yaml")
    sweep = {"space": {"method.sigma": {"type": "uniform", "low": 0.1, "high": 1}}}
    with pytest.raises(SpecError, match=r"sweep.metric: 'val_acc' needs validation images"):
        validate_spec(
            {"name": "t", "task": "craft", "data": {"val_shots": 0}, "sweep": sweep}, "x.yaml"
        )
    on_test = {**sweep, "metric": "test_acc"}
    validate_spec({"name": "t", "task": "craft", "data": {"val_shots": 0}, "sweep": on_test}, "x")
    with pytest.raises(SpecError, match=r"data.val_shots: got -1"):
        validate_spec({"name": "t", "task": "craft", "data": {"val_shots": -1}}, "x.yaml")


def test_text_precision_is_an_open_clip_option():
    with pytest.raises(SpecError, match=r"backend.text_precision: the conse backend has no"):
        validate_spec({"name": "t", "backend": {"text_precision": "fp32"}}, "x.yaml")
    with pytest.raises(SpecError, match=r"backend.text_precision: got 'fp16'"):
        validate_spec(
            {
                "name": "t",
                "backend": {
                    "name": "open_clip:RN50",
                    "pretrained": "random-init",
                    "text_precision": "fp16",
                },
            },
            "x.yaml",
        )
