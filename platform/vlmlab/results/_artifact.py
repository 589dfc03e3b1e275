"""Adapted-model artifacts: learned tensors (safetensors) plus a JSON manifest.

An artifact folder holds ``contexts.safetensors``: for the prompt methods the
learned soft prompt ``contexts`` (``1 x m x D``; more tensors, such as a
refinement head, may sit beside it), for devsafety the adapted model's
``class_embeddings`` (``C x E``, unit norm: a ready classifier over image
features) with its heads and projection. Beside it sits
``manifest.json`` (backend, model, dataset, class names, method-specific facts
such as the forget set, metrics and the spec). The manifest is written last,
so a folder with a manifest is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vlmlab.storage import Location, locate

MANIFEST = "manifest.json"
TENSORS = "contexts.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its tensors and its manifest."""

    path: Path | str
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]

    @property
    def contexts(self) -> torch.Tensor:
        return self.tensors["contexts"]


def save_artifact(
    folder: str | Path | Location,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    *,
    required: str = "contexts",
) -> Path | str:
    """Write ``tensors`` and ``manifest`` atomically; ``required`` names the kind's main tensor.

    ``manifest["kind"]`` names the task that wrote it (its registry entry reads it back).
    """
    if required not in tensors:
        raise ValueError(f"a {manifest.get('kind', 'prompt')} artifact needs a {required!r} tensor")
    location = locate(folder)
    blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    (location / TENSORS).write_bytes(blob)
    document = {"format_version": FORMAT_VERSION, **manifest}
    (location / MANIFEST).write_text(json.dumps(document, indent=2, sort_keys=True, default=str))
    return location.native


def load_artifact(folder: str | Path | Location) -> Artifact:
    """Read an artifact folder written by :func:`save_artifact` (a path or a URI)."""
    location = locate(folder)
    manifest_path = location / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"not an artifact folder (no {MANIFEST}): {str(location)!r}")
    manifest = json.loads(manifest_path.read_text())
    tensors = load_safetensors((location / TENSORS).read_bytes())
    return Artifact(location.native, tensors, manifest)
