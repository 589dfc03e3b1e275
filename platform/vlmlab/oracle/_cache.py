"""On-disk cache of image features, so an image set is encoded once per model.

Entries are keyed by backend, model and the image set's content hash; the file
name also carries the set's dataset, split and an index digest so a person can
tell entries apart. Writes go to a temporary file in the same folder and are
renamed into place, so a killed process never leaves a partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab._io import atomic_write_bytes

CACHE_ENV = "VLMLAB_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$VLMLAB_CACHE_DIR``, else ``~/.cache/vlmlab``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlmlab")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


class FeatureCache:
    """Image features on disk under ``root/features/<backend>/<model>/``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, backend: str, model: str, content_hash: str, meta: dict[str, Any]) -> Path:
        dataset = _slug(str(meta.get("dataset", "images")))
        split = _slug(str(meta.get("split", "")))
        indices = meta.get("indices")
        index_digest = (
            hashlib.sha1(json.dumps(list(map(int, indices))).encode()).hexdigest()[:8]
            if indices is not None
            else "all"
        )
        name = f"{dataset}-{split}-{index_digest}-{content_hash[:16]}.npy"
        return self.root / "features" / _slug(backend) / _slug(model) / name

    def load(self, path: Path) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            loaded: np.ndarray = np.load(path, allow_pickle=False)
            return loaded
        except (OSError, ValueError):
            return None  # unreadable entry: recompute and overwrite it

    def store(self, path: Path, features: np.ndarray) -> None:
        import io

        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
