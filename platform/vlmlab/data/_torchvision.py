"""The CoOp few-shot datasets that torchvision provides, loaded lazily.

CraFT's paper evaluates on the 11 CoOp datasets. torchvision downloads (or
reads, given ``root``) nine of them; Flowers102 (torchvision has no class
names) and UCF101 (a video set in torchvision; CoOp uses middle frames) come
through ``imagefolder``. These splits are large (Food101 alone is ~100k
photos), so images are decoded only for the rows a run uses: the k-shot
sample and the test subset. Labels come from the dataset's index, unread.

Class names are CoOp's (the ones CraFT's prompts read, from CoOp's split
files): EuroSAT's land-use names ("Annual Crop Land" ...), Caltech101 without
``Faces_easy`` (100 classes; torchvision already drops ``BACKGROUND_Google``)
and with singular names, Stanford Cars with the year first, SUN397 with the
qualifier first ("outdoor apartment building"). ImageNet keeps torchvision's
first synonym; CLIP's hand-picked names come through ``data.class_names``.

Datasets without an official train/test split (Caltech101, SUN397, EuroSAT)
are split here deterministically: 40 % of each class, chosen by a fixed seed,
is the test split. This is not CoOp's split files; for exact protocol, lay
CoOp's split out as folders and use ``imagefolder``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.data._common import IMAGE_SIZE, OFFLINE_DATASET, SPLITS, data_root, square_crop
from vlmlab.data._dataset import ImageDataset
from vlmlab.data._lazy import LazyImages
from vlmlab.errors import DatasetUnavailableError

HOLDOUT_TEST_FRACTION = 0.4


@dataclass(frozen=True)
class TorchvisionSource:
    """How to build one torchvision dataset and read its labels and class names."""

    cls_name: str
    splits: dict[str, dict[str, Any]] | None
    """Our split -> constructor arguments; None: no official split (held out here)."""
    description: str
    downloadable: bool = True
    rename: Callable[[str], str] | None = None
    """torchvision's class name -> CoOp's (after ``_`` became a space)."""
    drop: tuple[str, ...] = ()
    """torchvision classes CoOp leaves out (their images are dropped, labels renumbered)."""


EUROSAT_COOP_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
CALTECH101_COOP_NAMES = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}


def _year_first(name: str) -> str:
    """Stanford Cars as CoOp names them: ``AM General Hummer SUV 2000`` -> ``2000 AM ...``."""
    *model, year = name.split(" ")
    return " ".join([year, *model]) if model and year.isdigit() else name


def _qualifier_first(name: str) -> str:
    """SUN397 as CoOp names them: ``apartment building/outdoor`` -> ``outdoor apartment building``."""
    return " ".join(reversed(name.split("/")))


COOP_SOURCES: dict[str, TorchvisionSource] = {
    "caltech101": TorchvisionSource(
        "Caltech101",
        None,
        "Caltech101, 100 objects (CoOp: no Faces_easy)",
        rename=lambda name: CALTECH101_COOP_NAMES.get(name, name),
        drop=("Faces_easy", "BACKGROUND_Google"),
    ),
    "oxford_pets": TorchvisionSource(
        "OxfordIIITPet",
        {"train": {"split": "trainval"}, "test": {"split": "test"}},
        "Oxford-IIIT Pets, 37 breeds",
    ),
    "stanford_cars": TorchvisionSource(
        "StanfordCars",
        {"train": {"split": "train"}, "test": {"split": "test"}},
        "Stanford Cars, 196 models (torchvision cannot download it: give root)",
        downloadable=False,
        rename=_year_first,
    ),
    "food101": TorchvisionSource(
        "Food101", {"train": {"split": "train"}, "test": {"split": "test"}}, "Food-101"
    ),
    "fgvc_aircraft": TorchvisionSource(
        "FGVCAircraft",
        {"train": {"split": "trainval"}, "test": {"split": "test"}},
        "FGVC Aircraft, 100 variants",
    ),
    "sun397": TorchvisionSource("SUN397", None, "SUN397 scenes", rename=_qualifier_first),
    "dtd": TorchvisionSource(
        "DTD", {"train": {"split": "train"}, "test": {"split": "test"}}, "DTD textures, 47"
    ),
    "eurosat": TorchvisionSource(
        "EuroSAT",
        None,
        "EuroSAT satellite images, 10 land uses",
        rename=lambda name: EUROSAT_COOP_NAMES.get(name, name),
    ),
    "imagenet": TorchvisionSource(
        "ImageNet",
        {"train": {"split": "train"}, "test": {"split": "val"}},
        "ImageNet-1k (give root with torchvision's ImageNet archives)",
        downloadable=False,
    ),
}


def _labels_of(dataset: Any) -> np.ndarray:
    for attribute in ("_labels", "targets", "y"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    if hasattr(dataset, "_samples"):
        return np.asarray([label for _, label in dataset._samples], dtype=np.int64)
    raise TypeError(f"{type(dataset).__name__}: cannot read labels without decoding images")


def _raw_class_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    if names is None:
        raise TypeError(f"{type(dataset).__name__} carries no class names")
    # ImageNet lists synonyms per class: the first one prompts best.
    return [n[0] if isinstance(n, tuple) else n for n in names]


def coop_class_names(source: TorchvisionSource, raw: list[str]) -> tuple[list[str], list[int]]:
    """CoOp's prompt names for ``raw`` torchvision classes, and which raw labels are kept."""
    kept = [label for label, name in enumerate(raw) if name not in source.drop]
    rename = source.rename or (lambda name: name)
    return [rename(raw[label]).replace("_", " ") for label in kept], kept


def holdout_rows(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """A fixed per-class split: ``HOLDOUT_TEST_FRACTION`` of each class is the test split."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(rows) * HOLDOUT_TEST_FRACTION)
        chosen.append(rows[:n_test] if split == "test" else rows[n_test:])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def build_torchvision_dataset(
    source: TorchvisionSource, root: Path, arguments: dict[str, Any]
) -> Any:
    """The torchvision dataset object (a seam: tests put a small fake here)."""
    from torchvision import datasets

    cls = getattr(datasets, source.cls_name)
    if source.downloadable:
        arguments = {**arguments, "download": True}
    return cls(str(root), **arguments)


def load_coop_dataset(
    name: str, split: str = "test", *, root: str | Path | None = None, image_size: int = IMAGE_SIZE
) -> ImageDataset:
    """One CoOp dataset split from torchvision, decoded lazily at ``image_size``."""
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    source = COOP_SOURCES[name]
    folder = Path(root) if root is not None else data_root()
    arguments = source.splits[split] if source.splits is not None else {}
    try:
        dataset = build_torchvision_dataset(source, folder, arguments)
    except Exception as error:
        how = "download it once (needs internet)" if source.downloadable else "give data.root"
        raise DatasetUnavailableError(
            f"{name} could not be loaded from {folder} ({error}); {how}. Offline, use "
            f"'{OFFLINE_DATASET}' or your own photos through 'imagefolder'"
        ) from error
    names, kept = coop_class_names(source, _raw_class_names(dataset))
    raw_labels = _labels_of(dataset)
    renumber = np.full(max(raw_labels.max(initial=0) + 1, len(kept)) + 1, -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    labels = renumber[raw_labels]  # -1: a class CoOp leaves out
    rows = np.arange(len(labels)) if source.splits is not None else holdout_rows(labels, split)
    rows = rows[labels[rows] >= 0]
    images = LazyImages(
        lambda row: square_crop(dataset[row][0], image_size),
        rows,
        image_size,
        original=lambda row: dataset[row][0],  # the photo, for crops of the original
    )
    return ImageDataset(name, split, images, labels[rows], names, meta={"root": str(folder)})
