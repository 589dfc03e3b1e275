"""Adapted-model artifacts, the classifiers built from them, and the HTTP app that serves them.

``vlmlab.serving._http`` (the Ray Serve app) is imported on demand: it needs Ray.
"""

from __future__ import annotations

from vlmlab.serving._artifact import PromptArtifact, load_prompt_artifact, save_prompt_artifact
from vlmlab.serving._classifier import (
    AdaptedModel,
    AdapterStore,
    RequestError,
    decode_image,
)

__all__ = [
    "AdaptedModel",
    "AdapterStore",
    "PromptArtifact",
    "RequestError",
    "decode_image",
    "load_prompt_artifact",
    "save_prompt_artifact",
]
