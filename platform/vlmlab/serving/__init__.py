"""Adapted-model artifacts (and, later, the HTTP app that serves them)."""

from __future__ import annotations

from vlmlab.serving._artifact import PromptArtifact, load_prompt_artifact, save_prompt_artifact

__all__ = ["PromptArtifact", "load_prompt_artifact", "save_prompt_artifact"]
