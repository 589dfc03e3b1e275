"""What every dataset loader shares: split names, the data folder, the photo crop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

DATA_ENV = "VLMLAB_DATA_DIR"
OFFLINE_DATASET = "fashion-mnist"
"""The dataset every machine has offline (Debian's dataset-fashion-mnist)."""
SPLITS = ("train", "test")
IMAGE_SIZE = 224


def data_root() -> Path:
    """``$VLMLAB_DATA_DIR``, else ``~/.cache/vlmlab/data`` (torchvision downloads land here)."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "vlmlab" / "data")


def square_crop(image: Any, size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop: one shape for every photo."""
    from PIL import Image

    rgb = image.convert("RGB")
    scale = size / min(rgb.size)
    rgb = rgb.resize(
        (max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (rgb.width - size) // 2, (rgb.height - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)
