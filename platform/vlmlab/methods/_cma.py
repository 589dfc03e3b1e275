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

import cma
import numpy as np


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
    ) -> None:
        if dim < 1 or popsize < 2 or not sigma > 0:
            raise ValueError(
                f"need dim >= 1, popsize >= 2, sigma > 0; got {dim}, {popsize}, {sigma}"
            )
        # Step-size adaptation as the official BBT / BBF / CraFT code ran it (pycma 3):
        # TPA only for a diagonal ES above 299 variables, else CSA. pycma 4 moved every
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
