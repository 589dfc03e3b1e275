"""Backends by name: ``create_oracle("conse")``, ``create_oracle("open_clip:RN50")``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmlab.oracle._base import LocalOracle
from vlmlab.plugins import BACKENDS, load_plugins


def _open_clip(model: str | None, **kwargs: Any) -> LocalOracle:
    from vlmlab.oracle._open_clip import OpenClipOracle

    return OpenClipOracle(model or "ViT-B-32", **kwargs)


def _conse(model: str | None, **kwargs: Any) -> LocalOracle:
    from vlmlab.oracle._conse import ConseOracle

    if model not in (None, "", "default"):
        raise ValueError(f"the ConSE backend has one model; got model {model!r} (use 'conse')")
    return ConseOracle(**kwargs)


def _latency(model: str | None, **kwargs: Any) -> LocalOracle:
    from vlmlab.oracle._latency import LatencyOracle

    try:
        latency_ms = float(model) if model else 50.0
    except ValueError:
        raise ValueError(f"latency backend: 'latency:<milliseconds>', got {model!r}") from None
    kwargs.pop("cache_dir", None)  # nothing to cache
    return LatencyOracle(latency_ms, **kwargs)


_BACKENDS: dict[str, tuple[Callable[..., LocalOracle], str]] = {
    "open_clip": (_open_clip, "real CLIP via open_clip: 'open_clip:<architecture>' + pretrained"),
    "conse": (_conse, "offline ConSE stand-in (EfficientNet-lite0 + MiniLM-L6), not CLIP"),
    "latency": (_latency, "no model: a fixed delay per call ('latency:<ms>'), for benchmarks"),
}
_TAKES_WEIGHTS = {"open_clip"}
"""Backends whose constructor takes ``pretrained`` (a hub tag or a checkpoint)."""
_TAKES_MODEL = {"open_clip", "latency"}
"""Backends named with a model part (``open_clip:RN50``, ``latency:20``)."""


def _backends() -> dict[str, tuple[Callable[..., LocalOracle], str]]:
    """The registry, with the backends of installed plugins (entry points ``vlmlab.backends``)."""
    load_plugins(BACKENDS)
    return _BACKENDS


def register_backend(
    name: str,
    factory: Callable[..., LocalOracle],
    description: str,
    *,
    takes_model: bool = False,
    takes_weights: bool = False,
    replace: bool = False,
) -> None:
    """Make a backend known to ``create_oracle``, specs, ``vlmlab run`` and serving.

    ``factory(model, **kwargs)`` builds the oracle: ``model`` is the part after
    the colon of ``"<name>:<model>"`` (None without one), ``kwargs`` the
    backend's options (``pretrained`` where ``takes_weights``, ``cache_dir``).

    Raises:
        ValueError: a bad name, or one registered already (without ``replace``).
    """
    key = name.lower()
    if not key or ":" in key or not key.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a backend name is letters, digits, - and _; got {name!r}")
    if key in _BACKENDS and not replace:
        raise ValueError(f"a backend named {key!r} is registered already (replace=True)")
    _BACKENDS[key] = (factory, description)
    for flag, names in ((takes_model, _TAKES_MODEL), (takes_weights, _TAKES_WEIGHTS)):
        if flag:
            names.add(key)
        else:
            names.discard(key)


def backend_takes_model(name: str) -> tuple[bool, bool]:
    """``(takes a model part, takes pretrained weights)`` of a registered backend.

    Raises:
        ValueError: ``name`` is not a registered backend (the message lists them).
    """
    backend = name.partition(":")[0].lower()
    if backend not in _backends():
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(_BACKENDS))}")
    return backend in _TAKES_MODEL, backend in _TAKES_WEIGHTS


def check_backend(spec: str, pretrained: str | None = None) -> str:
    """Check a backend name and its weights without building a model; returns the model id.

    For ``open_clip``: the architecture is known and its text side servable, a tag
    is one of its tags, a checkpoint file exists (``random-init`` names untrained
    weights). What ``vlmlab validate`` asks before a model loads.

    Raises:
        ValueError: unknown backend, model or tag.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    backend, _, model = spec.partition(":")
    backend_takes_model(spec)  # raises for an unknown backend, listing them
    if backend.lower() == "open_clip":
        from vlmlab.oracle._open_clip import resolve_open_clip_model

        return resolve_open_clip_model(model or "ViT-B-32", pretrained)[2]
    return spec


def list_backends() -> dict[str, str]:
    """Backend names and what each one is."""
    return {name: text for name, (_, text) in _backends().items()}


def create_oracle(spec: str, **kwargs: Any) -> LocalOracle:
    """Build an in-process oracle from ``"<backend>[:<model>]"``.

    Examples: ``"conse"``, ``"open_clip:ViT-B-16"`` with ``pretrained="openai"``,
    ``"open_clip:RN50"`` with ``pretrained="/path/to/checkpoint.pt"``.
    Keyword arguments go to the backend's constructor.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"oracle spec must be a string like 'conse' or 'open_clip:RN50', got {spec!r}"
        )
    backend, _, model = spec.partition(":")
    entry = _backends().get(backend.lower())
    if entry is None:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(_BACKENDS))}")
    return entry[0](model or None, **kwargs)
