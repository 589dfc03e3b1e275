"""Serving (layer 9): adapted models as classifiers, the HTTP app that serves them,
and the oracle service's keys and client.

Artifacts are written and read by ``vlmlab.results``; each task builds its
classifier from one (``vlmlab.tasks``).

``vlmlab.serving._http`` (the Ray Serve app) is imported on demand: it needs Ray.
"""

from __future__ import annotations

from vlmlab.serving._classifier import (
    AdaptedModel,
    AdapterStore,
    RequestError,
    decode_image,
)
from vlmlab.serving._client import HttpOracle
from vlmlab.serving._keys import KeysFileError, add_key, hash_key, load_keys

__all__ = [
    "AdaptedModel",
    "AdapterStore",
    "HttpOracle",
    "KeysFileError",
    "RequestError",
    "add_key",
    "decode_image",
    "hash_key",
    "load_keys",
]
