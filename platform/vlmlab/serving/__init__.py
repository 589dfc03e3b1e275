"""Serving: adapted models as classifiers, the HTTP app that serves them,
and the oracle service's keys and client.

Artifacts are written and read by ``vlmlab.results``; each task builds its
classifier from one (``vlmlab.tasks``).

``vlmlab.serving._http`` (the Ray Serve app) is imported on demand: it needs Ray.
"""

from __future__ import annotations

from typing import Any

from vlmlab.serving._classifier import (
    AdaptedModel,
    AdapterStore,
    RequestError,
    decode_image,
)
from vlmlab.serving._client import HttpOracle
from vlmlab.serving._keys import KEY_LIMITS, ApiKey, KeysFileError, add_key, hash_key, load_keys
from vlmlab.serving._limits import ServerLimits, proxy_http_options


def __getattr__(name: str) -> Any:
    # The Ray Serve app needs Ray: it loads when asked for.
    if name in ("APP_NAME", "build_adapters_app", "reload_keys", "serve_adapters"):
        from vlmlab.serving import _http

        return getattr(_http, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "APP_NAME",
    "KEY_LIMITS",
    "AdaptedModel",
    "AdapterStore",
    "ApiKey",
    "HttpOracle",
    "KeysFileError",
    "RequestError",
    "ServerLimits",
    "add_key",
    "build_adapters_app",
    "decode_image",
    "hash_key",
    "load_keys",
    "proxy_http_options",
    "reload_keys",
    "serve_adapters",
]
