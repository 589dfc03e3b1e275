"""A CMA-ES strategy (the `cma` package) whose randomness is private and resumable.

`cma` draws its samples from ``np.random.randn`` (the global NumPy state)
unless given another ``randn``. Each :class:`CmaStrategy` passes a callable
bound to its own ``numpy.random.Generator``, so strategies never disturb each
other or the caller, and pickling the strategy captures its random state:
``state_bytes`` / ``load_state_bytes`` resume bit-for-bit.
"""

from __future__ import annotations

import math
import pickle
from typing import Literal

import cma
import numpy as np

Csa = Literal["pycma3", "installed"]
CSA_CHOICES: tuple[str, ...] = ("pycma3", "installed")


class _GeneratorRandn:
    """Picklable replacement for ``np.random.randn`` backed by a private Generator."""

    def __init__(self, seed: int | np.random.SeedSequence) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CmaStrategy:
    """One CMA-ES over ``dim`` variables, started at 0 with step size ``sigma``.

    Args:
        dim: number of variables.
        popsize: candidates per generation.
        sigma: initial step size.
        seed: seed (or SeedSequence) of this strategy's private sampler.
        diagonal: Sep-CMA-ES (diagonal covariance; O(dim) per sample instead of O(dim^2)).
        bounds: optional symmetric box ``[-bounds, bounds]`` on every variable.
        csa: the CSA step-size constants. ``"pycma3"`` (default): pycma <= 4.4's
            ``cs = (mueff + 2) / (N + mueff + 3)`` and
            ``damps = 1 + 2 max(0, sqrt((mueff - 1) / (N + 1)) - 1) + cs``, what the
            official BBF and CraFT runs had (neither pins pycma; both predate pycma 4.5).
            ``"installed"``: the installed pycma's own; 4.5 caps ``cs`` at 1/2 and raises
            ``damps`` by its inner factor 3 (``_CSA_dampfac_mueff_inner``), which changes
            both below 40 variables at popsize 20 (the CIFAR-10 settings).
    """

    def __init__(
        self,
        dim: int,
        *,
        popsize: int,
        sigma: float,
        seed: int | np.random.SeedSequence,
        diagonal: bool = False,
        bounds: float | None = None,
        csa: Csa = "pycma3",
    ) -> None:
        if dim < 1 or popsize < 2 or not sigma > 0:
            raise ValueError(
                f"need dim >= 1, popsize >= 2, sigma > 0; got {dim}, {popsize}, {sigma}"
            )
        if csa not in CSA_CHOICES:
            raise ValueError(f"csa must be one of {CSA_CHOICES}, got {csa!r}")
        # Step-size adaptation as the official BBT / BBF / CraFT code ran it (pycma 3):
        # TPA only for a diagonal ES above 299 variables, else CSA. pycma 4.5 moved every
        # ES of 300+ variables to TPA (CraFT's 512-dim search among them), which also
        # forbids a second ask() before tell(), as CraFT's head prompt does.
        tpa = diagonal and dim > 299
        options = {
            "popsize": popsize,
            "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaTPA
            if tpa
            else cma.sigma_adaptation.CMAAdaptSigmaCSA,
            "randn": _GeneratorRandn(seed),
            "seed": math.nan,  # unused: sampling goes through randn
            "verbose": -9,
            "verb_log": 0,
            "CMA_diagonal": diagonal,
            # The budget decides when to stop, not cma's convergence tests.
            "tolx": 0,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolstagnation": 2**62,
            "tolflatfitness": 2**62,
            "maxiter": math.inf,
            "maxfevals": math.inf,
        }
        if bounds is not None:
            options["bounds"] = [-bounds, bounds]
        self.dim = dim
        self.popsize = popsize
        self._es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma, options)
        if not tpa and csa == "pycma3":
            _pycma3_csa(self._es)

    def ask(self) -> np.ndarray:
        """``popsize x dim`` candidates of the current generation."""
        return np.stack(self._es.ask())

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        """Update from the candidates ``ask`` returned and their losses (lower is better)."""
        self._es.tell(list(candidates), np.asarray(fitness, dtype=float).tolist())

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._es.mean, copy=True)

    @property
    def best(self) -> np.ndarray | None:
        """The best candidate told so far (pycma's ``result.xbest``); None before any."""
        best = self._es.result.xbest
        return None if best is None else np.array(best, dtype=float, copy=True)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    def state_bytes(self) -> bytes:
        return pickle.dumps(self._es, protocol=pickle.HIGHEST_PROTOCOL)

    def load_state_bytes(self, state: bytes) -> None:
        self._es = pickle.loads(state)


def pycma3_csa_constants(dim: int, mueff: float) -> tuple[float, float]:
    """``(cs, damps)`` of CSA in pycma 3.3 ... 4.4 (no mirrors, ``CSA_dampfac`` 1).

    r3.3.0 ``cma/sigma_adaptation.py`` L170-176 and r4.4.0 L170-180:
    ``cs = (mueff + 2) / (N + mueff + 3)``, ``damps = 0.5 + 0.5 min(1, (0 / (0.159 lambda)
    - 1)^2) + 2 max(0, ((mueff - 1) / (N + 1))^0.5 - 1) + cs``.
    """
    cs = (mueff + 2) / (dim + mueff + 3)
    damps = 1.0 + 2 * max(0.0, ((mueff - 1) / (dim + 1)) ** 0.5 - 1) + cs
    return cs, damps


def _pycma3_csa(es: cma.CMAEvolutionStrategy) -> None:
    """Give ``es``'s CSA pycma <= 4.4's ``cs`` and ``damps``, on this instance only.

    Initialized first: pycma <= 4.4 initializes CSA lazily at the first ``tell`` (and
    would then overwrite the values); 4.5 has done it in the constructor and keeps
    attributes that are already set (``initialize_settings``). Both are pickled with
    the strategy, so a resumed run keeps them.
    """
    adapt = es.adapt_sigma
    adapt.initialize(es)
    adapt.cs, adapt.damps = pycma3_csa_constants(es.N, float(es.sp.weights.mueff))
