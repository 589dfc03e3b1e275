"""Atomic file writes: a crash or a kill never leaves a half-written file.

Data goes to a hidden temporary file in the destination folder (hidden, so
Parquet dataset readers skip it), is flushed to disk, then renamed over the
destination in one step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete temporaries a killed writer left behind; returns how many."""
    removed = 0
    for tmp in Path(folder).glob("**/.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
