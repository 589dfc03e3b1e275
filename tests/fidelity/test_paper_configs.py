"""Every paper config runs the official protocol: each value checked against the
official repositories' tables in this folder (each row names its source file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from official_craft import CONFIG_FILES
from official_craft import expected as craft_expected
from official_devsafety import SETTINGS as DEVSAFETY_SETTINGS
from official_devsafety import expected as devsafety_expected
from official_forgetting import SCRIPTS as FORGETTING_SCRIPTS
from official_forgetting import expected as forgetting_expected

from vlmlab.specs import load_spec

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _spec_values(path: Path) -> dict[str, object]:
    spec = load_spec(path)
    method = spec.method.model_dump()
    values = dict(method)
    values |= {
        "backend": spec.backend.name,
        "pretrained": spec.backend.pretrained,
        "prompt": spec.prompt,
        "seeds": spec.seeds,
        "budget": spec.budget.by_shots,
    }
    return values


@pytest.mark.parametrize("dataset", sorted(CONFIG_FILES))
def test_craft_paper_config_matches_the_official_code(dataset):
    path = EXPERIMENTS / f"craft-{dataset}.yaml"
    values = _spec_values(path)
    wrong = {
        name: (values.get(name), official, source)
        for name, (official, source) in craft_expected(dataset).items()
        if values.get(name) != official
    }
    assert not wrong, f"{path.name} differs from the official code: {wrong}"
    # The generations follow the official maxiter = budget // popsize.
    spec = load_spec(path)
    for trial in spec.expand_trials():
        if trial.method.name == "craft":
            assert trial.generations == trial.query_budget() // 40


def test_every_craft_paper_config_is_covered():
    shipped = {p.stem.removeprefix("craft-") for p in EXPERIMENTS.glob("craft-*.yaml")}
    ours = {"quickstart", "ladder", "sweep"}  # offline stand-in configs, not paper settings
    assert shipped - ours == set(CONFIG_FILES)


@pytest.mark.parametrize("dataset", sorted(FORGETTING_SCRIPTS))
def test_forgetting_paper_config_matches_the_official_code(dataset):
    path = EXPERIMENTS / f"bbf-{dataset}.yaml"
    spec = load_spec(path)
    values = _spec_values(path) | {
        "precision": spec.backend.precision,
        "forget": spec.data.forget,
        "forget_fraction": spec.data.forget_fraction,
        "shots": spec.data.shots,
        "max_queries": spec.budget.max_queries,
    }
    wrong = {
        name: (values.get(name), official, source)
        for name, (official, source) in forgetting_expected(dataset).items()
        if values.get(name) != official
    }
    assert not wrong, f"{path.name} differs from the official code: {wrong}"


@pytest.mark.parametrize("setting", sorted(DEVSAFETY_SETTINGS))
def test_devsafety_paper_config_matches_the_official_code(setting):
    path = EXPERIMENTS / f"devsafety-{setting}.yaml"
    spec = load_spec(path)
    values = _spec_values(path) | {
        "target": spec.data.target,
        "shots": spec.data.shots,
        "class_names": spec.data.class_names,
    }
    wrong = {
        name: (values.get(name), official, source)
        for name, (official, source) in devsafety_expected(setting).items()
        if values.get(name) != official
    }
    assert not wrong, f"{path.name} differs from the official code: {wrong}"
