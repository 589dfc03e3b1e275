"""Every paper config runs the official protocol: each value checked against the
official repositories' tables in this folder (each row names its source file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from official_craft import CONFIG_FILES
from official_craft import expected as craft_expected
from official_devsafety import SETTINGS as DEVSAFETY_SETTINGS
from official_devsafety import SHARED as OFFICIAL_DEVSAFETY_SHARED
from official_devsafety import expected as devsafety_expected
from official_forgetting import SCRIPTS as FORGETTING_SCRIPTS
from official_forgetting import expected as forgetting_expected

from vlmlab.specs import RunSpec, load_spec

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _values(spec: RunSpec) -> dict[str, object]:
    """The spec's method fields and the other values a paper config pins."""
    return spec.method.model_dump() | {
        "backend": spec.backend.name,
        "pretrained": spec.backend.pretrained,
        "precision": spec.backend.precision,
        "text_precision": spec.backend.text_precision,
        "val_shots": spec.data.val_shots,
        "prompt": spec.prompt,
        "seeds": spec.seeds,
        "budget": spec.budget.by_shots,
        "max_queries": spec.budget.max_queries,
        "shots": spec.data.shots,
        "forget": spec.data.forget,
        "forget_fraction": spec.data.forget_fraction,
        "target": spec.data.target,
        "class_names": spec.data.class_names,
        "control_cap": spec.data.control_cap,
        "control_seed": spec.data.control_seed,
    }


def _assert_official(path: Path, official: dict[str, tuple[object, str]]) -> RunSpec:
    spec = load_spec(path)
    values = _values(spec)
    wrong = {
        name: (values.get(name, "<missing>"), value, source)
        for name, (value, source) in official.items()
        if values.get(name, "<missing>") != value
    }
    assert not wrong, (
        f"{path.name} differs from the official code (ours, official, source): {wrong}"
    )
    return spec


@pytest.mark.parametrize("dataset", sorted(CONFIG_FILES))
def test_craft_paper_config_matches_the_official_code(dataset):
    spec = _assert_official(EXPERIMENTS / f"craft-{dataset}.yaml", craft_expected(dataset))
    for trial in spec.expand_trials():  # the official maxiter = budget // popsize
        if trial.method.name == "craft":
            assert trial.generations == trial.query_budget() // 40


def test_every_craft_paper_config_is_covered():
    shipped = {p.stem.removeprefix("craft-") for p in EXPERIMENTS.glob("craft-*.yaml")}
    ours = {
        "quickstart",
        "quickstart-clip",
        "ladder",
        "sweep",
    }  # offline configs, not paper settings
    assert shipped - ours == set(CONFIG_FILES)


@pytest.mark.parametrize("dataset", sorted(FORGETTING_SCRIPTS))
def test_forgetting_paper_config_matches_the_official_code(dataset):
    _assert_official(EXPERIMENTS / f"bbf-{dataset}.yaml", forgetting_expected(dataset))


@pytest.mark.parametrize("setting", sorted(DEVSAFETY_SETTINGS))
def test_devsafety_paper_config_matches_the_official_code(setting):
    spec = _assert_official(EXPERIMENTS / f"devsafety-{setting}.yaml", devsafety_expected(setting))
    # Batches are augmented (the official transforms), afresh each step: the tower trains.
    assert all(m.augment_views > 0 for m in spec.variant_methods())  # type: ignore[attr-defined]


def test_devsafety_defaults_are_the_official_script_values():
    """A run that sets nothing runs the official protocol (BDD weather's per-run values),
    but for ``trainable``: its default stays ``all`` (cached image features) because
    ``full`` needs an open_clip backend and image-tower passes every step."""
    from vlmlab.methods.devsafety import DevSafetyConfig
    from vlmlab.tasks.devsafety import DevSafetyMethodSpec

    spec, config = DevSafetyMethodSpec(), DevSafetyConfig()
    assert spec.trainable == config.trainable == "all"
    per_run = ("beta", "tau", "batch_size", "control_per_class")
    official = {
        name: value
        for name, value in devsafety_expected("bdd100k-weather").items()
        if name in DevSafetyMethodSpec.model_fields
        and name != "trainable"
        and (name in OFFICIAL_DEVSAFETY_SHARED or name in per_run)
    }
    assert len(official) >= 20
    for name, (value, source) in official.items():
        assert getattr(spec, name) == value, (name, getattr(spec, name), value, source)
        assert getattr(config, name) == value, (name, getattr(config, name), value, source)


def test_a_changed_value_is_caught(tmp_path):
    text = (EXPERIMENTS / "craft-eurosat.yaml").read_text().replace("sigma: 0.02", "sigma: 1.0")
    changed = tmp_path / "craft-eurosat.yaml"
    changed.write_text(text)
    with pytest.raises(AssertionError, match=r"'sigma': \(1\.0, 0\.02, 'craft_configs/eurosat"):
        _assert_official(changed, craft_expected("eurosat"))
