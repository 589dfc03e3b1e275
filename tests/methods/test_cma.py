"""The CMA-ES strategy: private randomness, and the step-size constants of the official runs."""

from __future__ import annotations

import pickle

import cma
import numpy as np
import pytest

from vlmlab.methods._cma import CmaStrategy, pycma3_csa_constants

# pycma <= 4.4 at popsize 20 (mueff 5.9388): cs = (mueff + 2) / (N + mueff + 3),
# damps = 1 + 2 max(0, sqrt((mueff - 1) / (N + 1)) - 1) + cs (r4.4.0 sigma_adaptation.py
# L170-180). pycma 4.5 gives cs 0.5 / damps 1.5 at N = 5, damps 1.578 at 10, 1.561 at 20.
PYCMA_45 = tuple(map(int, cma.__version__.split(".")[:2])) >= (4, 5)
PYCMA3 = {5: (0.569547, 1.569547), 10: (0.419182, 1.419182), 20: (0.274331, 1.274331)}
PYCMA3[400] = (0.019413, 1.019413)


@pytest.mark.parametrize("dim", sorted(PYCMA3))
def test_csa_constants_are_pycma3s_whatever_pycma_is_installed(dim):
    strategy = CmaStrategy(dim, popsize=20, sigma=1.0, seed=0)
    adapt = strategy._es.adapt_sigma
    assert isinstance(adapt, cma.sigma_adaptation.CMAAdaptSigmaCSA)
    mueff = strategy._es.sp.weights.mueff
    assert mueff == pytest.approx(5.938804, abs=1e-6)
    cs, damps = PYCMA3[dim]
    assert (adapt.cs, adapt.damps) == pytest.approx((cs, damps), abs=1e-6)
    assert (adapt.cs, adapt.damps) == pycma3_csa_constants(dim, mueff)
    # They survive the updates and a checkpoint.
    for _ in range(3):
        candidates = strategy.ask()
        strategy.tell(candidates, np.arange(20.0))
    restored = CmaStrategy(dim, popsize=20, sigma=1.0, seed=0, csa="installed")
    restored.load_state_bytes(strategy.state_bytes())
    again = restored._es.adapt_sigma
    assert (again.cs, again.damps) == pytest.approx((cs, damps), abs=1e-6)
    assert pickle.loads(strategy.state_bytes()).adapt_sigma.damps == adapt.damps


def test_installed_csa_keeps_pycmas_own_constants():
    ours = CmaStrategy(5, popsize=20, sigma=1.0, seed=0)._es.adapt_sigma
    theirs = CmaStrategy(5, popsize=20, sigma=1.0, seed=0, csa="installed")._es
    es = cma.CMAEvolutionStrategy(
        np.zeros(5), 1.0, {"popsize": 20, "verbose": -9, "AdaptSigma": type(ours)}
    )
    for each in (es, theirs):  # pycma <= 4.4 initializes CSA at the first tell; 4.5: done
        each.adapt_sigma.initialize(each)
    reference = es.adapt_sigma
    assert (theirs.adapt_sigma.cs, theirs.adapt_sigma.damps) == (reference.cs, reference.damps)
    if tuple(map(int, cma.__version__.split(".")[:2])) >= (
        4,
        5,
    ):  # pycma 4.5 caps cs at 1/2 (4.4 and before: 0.5695)
        assert theirs.adapt_sigma.cs == 0.5 and ours.cs == pytest.approx(0.569547, abs=1e-6)
    with pytest.raises(ValueError, match="csa must be one of"):
        CmaStrategy(5, popsize=20, sigma=1.0, seed=0, csa="pycma5")  # type: ignore[arg-type]


def test_the_step_size_follows_the_constants():
    """The same samples and fitness, another damping: another step size after one update
    (pycma <= 4.4 has pycma 3's constants itself: the same step size)."""
    sigmas = {}
    for csa in ("pycma3", "installed"):
        strategy = CmaStrategy(10, popsize=20, sigma=1.0, seed=3, csa=csa)  # type: ignore[arg-type]
        candidates = strategy.ask()
        strategy.tell(candidates, np.linalg.norm(candidates - 1, axis=1))
        sigmas[csa] = strategy.sigma
    assert (sigmas["pycma3"] != sigmas["installed"]) == PYCMA_45
