"""Images decoded when they are needed: a lazy ``N x S x S x 3`` uint8 array.

Large splits (a torchvision CoOp set, a user's folder of 50,000 photos) would
take gigabytes as one array. A :class:`LazyImages` holds only how to decode
row ``i``; indexing decodes the rows asked for and returns a NumPy array, so
a k-shot subset decodes its k images and an oracle encodes a whole split one
batch at a time (it is a ``vlmlab.oracle.PixelSource``).

The stored pixels are a resized centre crop (``square_crop``); a loader that
can also read the photo they were cut from gives ``original``, and
:class:`OriginalImages` carries that reader to subsets, so augmentations crop
the full-resolution original as the official CraFT code does (``augmented_view``).
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
        original: optional, row of the underlying source -> the full-resolution
            image (a PIL image) the stored pixels were cut from (:meth:`originals`).
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
        original: Callable[[int], Any] | None = None,
    ) -> None:
        self._decode, self._rows, self._size = decode, np.asarray(rows, dtype=np.int64), size
        self._fingerprint = fingerprint
        self._original = original

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

    def originals(self) -> OriginalImages | None:
        """The full-resolution images of these rows, read on indexing; None: no reader."""
        return None if self._original is None else OriginalImages(self._original, self._rows)


class OriginalImages:
    """The images a dataset's stored pixels were cut from, one per row, read on indexing.

    ``originals[i]`` is row ``i``'s image (an RGB PIL image, at its own size);
    :meth:`take` follows a subset's rows, so a k-shot set keeps its originals.

    Args:
        read: row of the underlying source -> its image (a PIL image).
        rows: the underlying rows, in this set's order.
    """

    def __init__(self, read: Callable[[int], Any], rows: np.ndarray) -> None:
        self._read, self._rows = read, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Any:
        image = self._read(int(self._rows[index]))
        return image if image.mode == "RGB" else image.convert("RGB")

    def take(self, index: np.ndarray) -> OriginalImages:
        """The originals of rows ``index`` of this set (a subset's)."""
        return OriginalImages(self._read, self._rows[np.asarray(index, dtype=np.int64)])
