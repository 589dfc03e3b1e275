"""Dataset loaders and the registry that names them.

``fashion-mnist`` works offline from Debian's ``dataset-fashion-mnist`` files;
``cifar10`` and ``cifar100`` come from torchvision (downloaded when online);
``imagefolder`` reads a user's own ``root/train|test/<class>/<image>`` tree, or
splits a flat ``root/<class>/<image>`` one (``vlmlab.data._imagefolder``).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.data._common import DATA_ENV, OFFLINE_DATASET, SPLITS, data_root
from vlmlab.data._dataset import ImageDataset
from vlmlab.data._imagefolder import load_imagefolder
from vlmlab.data._torchvision import COOP_SOURCES, load_coop_dataset
from vlmlab.errors import DatasetUnavailableError
from vlmlab.plugins import DATASETS, load_plugins

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)

# Prompt-friendly names (the raw labels "T-shirt/top", "Trouser", ... prompt worse).
FASHION_MNIST_CLASSES = [
    "T-shirt",
    "trousers",
    "pullover sweater",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


# --------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, got {array.size} values")
    return array.reshape(shape)


def _fashion_mnist_files(split: str, root: Path | None) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    candidates = (
        [root] if root is not None else [*FASHION_MNIST_DIRS, data_root() / "fashion-mnist"]
    )
    for folder in candidates:
        for suffix in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def load_fashion_mnist(
    split: str = "test", *, root: str | Path | None = None, invert: bool = True
) -> ImageDataset:
    """Fashion-MNIST from local IDX files, else torchvision's download.

    Args:
        invert: present items dark-on-white, like product photos (True by
            default: the pretrained towers recognize them better that way;
            measured on ConSE, zero-shot 0.25 inverted vs 0.22 raw).
    """
    _check_split("fashion-mnist", split)
    files = _fashion_mnist_files(split, Path(root) if root is not None else None)
    if files is not None:
        images, labels = _read_idx(files[0]), _read_idx(files[1])
    else:
        try:
            from torchvision.datasets import FashionMNIST

            dataset = FashionMNIST(str(data_root()), train=split == "train", download=True)
        except Exception as error:  # no files and no network
            raise DatasetUnavailableError(
                "fashion-mnist: no local files (install Debian's dataset-fashion-mnist, which puts "
                f"them in {FASHION_MNIST_DIRS[0]}, or set {DATA_ENV}) and torchvision's download "
                f"failed: {error}"
            ) from error
        images, labels = dataset.data.numpy(), dataset.targets.numpy()
    if invert:
        images = 255 - images
    return ImageDataset(
        "fashion-mnist",
        split,
        _to_rgb(images),
        labels.astype(np.int64),
        list(FASHION_MNIST_CLASSES),
        meta={"inverted": invert},
    )


# --------------------------------------------------------------------- CIFAR
def _load_cifar(kind: str, split: str, root: str | Path | None) -> ImageDataset:
    _check_split(kind, split)
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    folder = Path(root) if root is not None else data_root()
    try:
        dataset = cls(str(folder), train=split == "train", download=True)
    except Exception as error:
        raise DatasetUnavailableError(
            f"{kind} could not be loaded from {folder} or downloaded ({error}). It needs "
            f"internet access once; offline, use the '{OFFLINE_DATASET}' dataset instead"
        ) from error
    names = [name.replace("_", " ") for name in dataset.classes]
    return ImageDataset(kind, split, np.asarray(dataset.data), np.asarray(dataset.targets), names)


def load_cifar10(split: str = "test", *, root: str | Path | None = None) -> ImageDataset:
    return _load_cifar("cifar10", split, root)


def load_cifar100(split: str = "test", *, root: str | Path | None = None) -> ImageDataset:
    return _load_cifar("cifar100", split, root)


# ------------------------------------------------------------------ registry
_LOADERS: dict[str, tuple[Callable[..., ImageDataset], str]] = {
    "fashion-mnist": (load_fashion_mnist, "Fashion-MNIST, 10 classes (offline: Debian files)"),
    "cifar10": (load_cifar10, "CIFAR-10 via torchvision (needs internet once)"),
    "cifar100": (load_cifar100, "CIFAR-100 via torchvision (needs internet once)"),
    "imagefolder": (
        load_imagefolder,
        "your own images: root/train|test/<class>/*.jpg, or root/<class>/*.jpg split here",
    ),
}


def _coop_loader(name: str) -> Callable[..., ImageDataset]:
    def load(split: str = "test", **options: Any) -> ImageDataset:
        return load_coop_dataset(name, split, **options)

    return load


def _register_coop() -> None:
    for name, source in COOP_SOURCES.items():
        _LOADERS[name] = (_coop_loader(name), f"{source.description} via torchvision (CoOp set)")


_register_coop()


def _loaders() -> dict[str, tuple[Callable[..., ImageDataset], str]]:
    """The registry, with the datasets of installed plugins (entry points ``vlmlab.datasets``)."""
    load_plugins(DATASETS)
    return _LOADERS


def register_dataset(
    name: str, loader: Callable[..., ImageDataset], description: str, *, replace: bool = False
) -> None:
    """Make a dataset known to specs (``data.dataset``), ``vlmlab run`` and the reports.

    ``loader(split, **options)`` returns the split (``"train"`` or ``"test"``) as
    an :class:`ImageDataset`; ``options`` are the spec's (``root`` and the like).

    Raises:
        ValueError: an empty name, or one registered already (without ``replace``).
    """
    if not name or name != name.strip():
        raise ValueError(f"a dataset name is a non-empty word; got {name!r}")
    if name in _LOADERS and not replace:
        raise ValueError(f"a dataset named {name!r} is registered already (replace=True)")
    _LOADERS[name] = (loader, description)


def list_datasets() -> dict[str, str]:
    """Registered dataset names and what each one is."""
    return {name: text for name, (_, text) in _loaders().items()}


def load_dataset(name: str, split: str = "test", **options: Any) -> ImageDataset:
    """Load a registered dataset split (``options`` go to its loader, e.g. ``root``)."""
    entry = _loaders().get(name)
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_LOADERS)}")
    return entry[0](split, **options)
