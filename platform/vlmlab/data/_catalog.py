"""What a dataset holds, read without decoding an image: for ``vlmlab validate``.

A spec names classes (``data.forget``, ``data.target``, ``data.class_names``)
and a data folder; both can be checked in seconds, before a model loads or
Ray starts, from folder names, index files and metadata. :func:`inspect_dataset`
says what it could read and what it could not (a note, never a guess).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

from vlmlab.data._common import DATA_ENV, data_root
from vlmlab.data._imagefolder import IMAGE_SUFFIXES, imagefolder_split_manifest
from vlmlab.data._names import prompt_name

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""torchvision's CIFAR-10 class names (fixed by the dataset's own metadata)."""


@dataclass
class DatasetCatalog:
    """What :func:`inspect_dataset` found: class names (None: not readable without
    loading), problems that stop a run, and notes."""

    class_names: list[str] | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _inspect_imagefolder(root: str | None) -> DatasetCatalog:
    """The folder listed as the loader lists it (:func:`imagefolder_split_manifest`)."""
    found = DatasetCatalog()
    if not root:
        found.problems.append("data.root: the imagefolder dataset needs a folder")
        return found
    base = Path(root).expanduser()
    if not base.is_dir():
        found.problems.append(f"data.root: no such folder {str(base)!r}")
        return found
    try:
        manifest = imagefolder_split_manifest(base)
    except (OSError, ValueError) as error:
        found.problems.append(f"data.root: {error}")
        return found
    classes = manifest["classes"]
    found.class_names = [prompt_name(name) for name in classes]
    for split in ("train", "test"):
        present = {path.split("/")[-2] for path in manifest[split]}
        missing = [name for name in classes if name not in present]
        if not manifest[split]:
            found.problems.append(
                f"data.root: {str(base)!r} has no {split} images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        elif missing and split == "train":
            found.problems.append(
                f"data.root: classes without training images: {', '.join(missing)}"
            )
        elif missing:
            found.notes.append(f"data.root: classes without test images: {', '.join(missing)}")
    if manifest["layout"] == "flat":
        found.notes.append(
            f"data.root: {str(base)!r} is one folder of classes; train and test are split "
            f"here ({manifest['test_fraction']:.0%} of each class to test, seeded), disjoint "
            "and stratified; the manifest records which file went where"
        )
    return found


def _inspect_fashion_mnist(root: str | None) -> DatasetCatalog:
    from vlmlab.data._loaders import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS

    found = DatasetCatalog(class_names=list(FASHION_MNIST_CLASSES))
    folders = (
        [Path(root).expanduser()]
        if root
        else [*FASHION_MNIST_DIRS, data_root() / "fashion-mnist", data_root() / "FashionMNIST/raw"]
    )
    if root and not folders[0].is_dir():
        found.problems.append(f"data.root: no such folder {str(folders[0])!r}")
        return found
    wanted = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
    present = any(
        all((f / name).is_file() or (f / f"{name}.gz").is_file() for name in wanted)
        for f in folders
        if f.is_dir()
    )
    if not present:
        found.notes.append(
            "fashion-mnist: no local files (Debian's dataset-fashion-mnist puts them in "
            f"{FASHION_MNIST_DIRS[0]}); torchvision will download them, which needs internet"
        )
    return found


def _inspect_cifar(name: str, root: str | None) -> DatasetCatalog:
    folder = Path(root).expanduser() if root else data_root()
    found = DatasetCatalog()
    if root and not folder.is_dir():
        found.problems.append(f"data.root: no such folder {str(folder)!r}")
        return found
    if name == "cifar10":
        found.class_names = list(CIFAR10_CLASSES)
        if not (folder / "cifar-10-batches-py").is_dir():
            found.notes.append(f"cifar10: not in {str(folder)!r}; downloaded on first use")
        return found
    meta = folder / "cifar-100-python" / "meta"
    if meta.is_file():
        with meta.open("rb") as handle:
            labels = pickle.load(handle, encoding="latin1")["fine_label_names"]
        found.class_names = [str(label).replace("_", " ") for label in labels]
    else:
        found.notes.append(
            f"cifar100: not in {str(folder)!r}; downloaded on first use (class names are "
            "checked once it is there)"
        )
    return found


def inspect_dataset(name: str, root: str | None = None) -> DatasetCatalog:
    """Class names, layout problems and notes of a registered dataset, no image decoded.

    Args:
        name: a registered dataset (``vlmlab datasets``).
        root: the spec's ``data.root`` (None: the dataset's default place,
            ``$VLMLAB_DATA_DIR`` or the cache).
    """
    if name == "imagefolder":
        return _inspect_imagefolder(root)
    if name == "fashion-mnist":
        return _inspect_fashion_mnist(root)
    if name in ("cifar10", "cifar100"):
        return _inspect_cifar(name, root)
    found = DatasetCatalog()
    if root and not Path(root).expanduser().exists():
        found.problems.append(f"data.root: no such folder {str(Path(root).expanduser())!r}")
    else:
        where = root or f"{data_root()} (${DATA_ENV})"
        found.notes.append(
            f"{name}: class names are read when the data loads from {where}; the spec's "
            "class names are checked then"
        )
    return found
