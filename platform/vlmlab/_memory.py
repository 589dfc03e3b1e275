"""Handing freed heap memory back to the OS: light on purpose (Serve's proxy imports it)."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_LIBC: Any = None


def trim_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    A big request leaves freed arenas behind that glibc keeps; without this the
    gateway's resident size only ever grows with the biggest requests it saw.
    """
    global _LIBC
    if _LIBC is None:
        path = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(path) if path else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)
