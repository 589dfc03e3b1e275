"""Images decoded when they are needed: a lazy ``N x S x S x 3`` uint8 array.

Large splits (a torchvision CoOp set, a user's folder of 50,000 photos) would
take gigabytes as one array. A :class:`LazyImages` holds only how to decode
row ``i``; indexing decodes the rows asked for and returns a NumPy array, so
a k-shot subset decodes its k images and an oracle encodes a whole split one
batch at a time (it is a ``vlmlab.oracle.PixelSource``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class LazyImages:
    """``N x S x S x 3`` uint8 images decoded on indexing; indexing returns a NumPy array.

    Args:
        decode: row of the underlying source -> its ``S x S x 3`` uint8 pixels.
        rows: the underlying rows this array holds, in order.
        size: S, the side every decoded image has.
        fingerprint: optional, rows -> a string that identifies their pixels
            without decoding them (e.g. a digest of the image files' bytes and
            the crop size). Oracles then hash that instead of every pixel.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self,
        decode: Callable[[int], np.ndarray],
        rows: np.ndarray,
        size: int,
        *,
        fingerprint: Callable[[np.ndarray], str] | None = None,
    ) -> None:
        self._decode, self._rows, self._size = decode, np.asarray(rows, dtype=np.int64), size
        self._fingerprint = fingerprint

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._rows), self._size, self._size, 3)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        """Like a NumPy array's: ``images[3]`` is one image, ``images[rows]`` a batch,
        ``images[0, 16, 16]`` one pixel. Only the rows picked are decoded."""
        rest: tuple[Any, ...] = ()
        if isinstance(index, tuple):
            index, rest = (index[0] if index else slice(None)), index[1:]
        picked = self._rows[index]
        if np.ndim(picked) == 0:
            one = np.asarray(self._decode(int(picked)), dtype=np.uint8)
            return one[rest] if rest else one
        rows = np.asarray(picked).reshape(-1)
        out = np.empty((rows.size, self._size, self._size, 3), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = self._decode(int(row))
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[np.arange(len(self))]
        return array if dtype is None else array.astype(dtype)

    def fingerprint(self) -> str | None:
        """What identifies these pixels without decoding them; None: hash the pixels."""
        return None if self._fingerprint is None else self._fingerprint(self._rows)
