"""Atomic file writes: a crash or a kill never leaves a half-written file.

Data goes to a hidden temporary file in the destination folder (hidden, so
Parquet dataset readers skip it), is flushed to disk, then renamed over the
destination in one step.

The file gets the mode any other new file would (``0o666`` less the process
umask: 0644 under umask 022, 0640 under 027), not the 0600 of the temporary
``mkstemp`` makes, so collaborators on a shared filesystem can read results;
a writer of secrets passes ``mode`` to keep its file private.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path


@functools.cache
def _umask_by_setting() -> int:
    """The umask, read once (by setting it) where ``/proc`` cannot say it (not Linux).

    ``os.umask`` reads the process-wide mask only by replacing it: the most private
    one stands in meanwhile, so a file another thread creates in that instant is
    never more open than intended.
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def current_umask() -> int:
    """The process umask, read without changing it (Linux: ``/proc/self/status``).

    Read at every call, so a umask set later (by the program, or a test) applies;
    where ``/proc`` has no ``Umask:`` line, the umask at the first such call.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file now: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    ``mode``: the file's permission bits (default: :func:`default_file_mode`, what
    the umask allows; pass ``0o600`` for a file only its owner may read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, default_file_mode() if mode is None else mode)  # mkstemp's: 0600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


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
