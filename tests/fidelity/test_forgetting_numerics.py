"""The BBF paper configs state the official numerics themselves (batches, fp16 loss and
contexts, pycma 3's step size), so a change of vlmlab's defaults cannot change a paper run;
test_paper_configs.py checks their values against official_forgetting.SHARED."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from official_forgetting import SCRIPTS, SHARED

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
NUMERICS = ("batch_order", "loss_precision", "context_rounding", "csa")


@pytest.mark.parametrize("dataset", sorted(SCRIPTS))
def test_forgetting_paper_configs_state_the_official_numerics(dataset):
    method = yaml.safe_load((EXPERIMENTS / f"bbf-{dataset}.yaml").read_text())["method"]
    assert {name: method.get(name) for name in NUMERICS} == {
        name: SHARED[name][0] for name in NUMERICS
    }


def test_every_bbf_paper_config_is_covered():
    shipped = {p.stem.removeprefix("bbf-") for p in EXPERIMENTS.glob("bbf-*.yaml")}
    assert shipped == set(SCRIPTS)
