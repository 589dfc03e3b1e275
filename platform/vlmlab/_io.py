"""Atomic file writes: a crash or a kill never leaves a half-written file.

Data goes to a hidden temporary file in the destination folder (hidden, so
Parquet dataset readers skip it), is flushed to disk, then renamed over the
destination in one step.
"""

from __future__ import annotations

import os
import tempfile
import time
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


STALE_AFTER_SECONDS = 3600.0
"""A temporary this old belongs to a writer that died: every write finishes in seconds."""


def remove_stale_temporaries(folder: Path | str, *, older_than: float = STALE_AFTER_SECONDS) -> int:
    """Delete temporaries a killed writer left behind; returns how many.

    Only temporaries untouched for ``older_than`` seconds go: a younger one may be
    another process's write in flight (concurrent trials share a results folder,
    on one machine or a shared filesystem), and readers skip temporaries anyway.
    """
    removed = 0
    now = time.time()
    for tmp in Path(folder).glob("**/.*.tmp"):
        try:
            if now - tmp.stat().st_mtime < older_than:
                continue
            tmp.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed += 1
    return removed
