"""A user's own photos, split without leaks and decoded only when needed.

Two layouts:

- ``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg``: the user's
  split, used as it is. Classes are the union of both folders' class
  sub-folders, so a label means the same class in both splits.
- ``root/<class>/*.jpg`` (flat): split here into disjoint train and test
  parts. Per class, ``test_fraction`` (default 0.4, like the CoOp sets without
  an official split) of the images go to test, at least one each side when the
  class has two or more. A class with a single image goes to train only; the
  manifest lists it under ``train_only_classes``. Which images go to test is
  fixed by the seed and the file names alone (a SHA-256 order, not a random
  generator), so train and test loaded in separate calls or processes agree.

Loading lists files and never decodes them: labels come from folder names.
The images are a lazy array that decodes a file when its row is indexed
(resize of the shorter side and a centre crop to ``image_size``), and whose
fingerprint (a digest of each file's bytes and the crop size) lets an oracle
find the set's cached features without decoding an image. Each file is also
readable whole (``ImageDataset.originals``), for augmentations that crop the
photo itself rather than its stored square (CraFT's).

Nothing is written into the user's folder (it may be read-only). Which files
went where is in the dataset's ``meta`` (``files``: the rows' paths relative to
``root``; ``split_manifest``: both parts) and in a JSON file under
``data_root()/imagefolder-splits/`` (``meta["split_manifest_path"]``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab._io import atomic_write_text
from vlmlab.data._common import IMAGE_SIZE, SPLITS, data_root, square_crop
from vlmlab.data._dataset import ImageDataset
from vlmlab.data._lazy import LazyImages
from vlmlab.data._names import ClassNames, prompt_name, rename_classes
from vlmlab.data._torchvision import HOLDOUT_TEST_FRACTION

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_SEED = 0
"""The default seed of a flat folder's split."""
TEST_FRACTION = HOLDOUT_TEST_FRACTION
"""The default share of each class a flat folder's test part gets."""
FLAT_LAYOUT = "flat (split here)"
SPLIT_LAYOUT = "train/test folders"
_DECODER = "square-crop-bicubic-v1"
"""Names how files become pixels, in the fingerprint: change it if the decoding changes."""


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p) and p.is_file()
    )


def _split_layout(base: Path) -> bool:
    return any((base / split).is_dir() for split in SPLITS)


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"imagefolder: test_fraction must be in (0, 1), got {test_fraction!r}")


def _split_order(seed: int, class_name: str, file_name: str) -> str:
    return hashlib.sha256(f"{seed}\0{class_name}\0{file_name}".encode()).hexdigest()


def _split_class(
    class_name: str, files: list[Path], seed: int, test_fraction: float
) -> tuple[list[Path], list[Path]]:
    """One class's (train, test) files: disjoint, each in file-name order."""
    if len(files) < 2:
        return list(files), []
    n_test = min(len(files) - 1, max(1, round(len(files) * test_fraction)))
    ranked = sorted(files, key=lambda path: _split_order(seed, class_name, path.name))
    test = set(ranked[:n_test])
    return [p for p in files if p not in test], [p for p in files if p in test]


def _listing(base: Path, seed: int, test_fraction: float) -> dict[str, Any]:
    """The manifest of ``base`` (see :func:`imagefolder_split_manifest`), plus the label
    of each file, without opening an image."""
    if not base.is_dir():
        raise FileNotFoundError(f"imagefolder root not found: {str(base)!r}")
    parts: dict[str, list[tuple[Path, str]]] = {split: [] for split in SPLITS}
    train_only: list[str] = []
    if _split_layout(base):
        layout = "split"
        classes = sorted(
            {name for s in SPLITS if (base / s).is_dir() for name in _class_folders(base / s)}
        )
        for split in SPLITS:
            for name in classes:
                parts[split] += [(path, name) for path in _image_files(base / split / name)]
    else:
        layout = "flat"
        _check_fraction(test_fraction)
        classes = _class_folders(base)
        for name in classes:
            files = _image_files(base / name)
            train, test = _split_class(name, files, seed, test_fraction)
            if len(files) == 1:
                train_only.append(name)
            parts["train"] += [(path, name) for path in train]
            parts["test"] += [(path, name) for path in test]
    if not classes:
        raise ValueError(f"imagefolder {str(base)!r} has no class sub-folders")
    manifest: dict[str, Any] = {
        "root": str(base),
        "layout": layout,
        "seed": seed if layout == "flat" else None,
        "test_fraction": test_fraction if layout == "flat" else None,
        "classes": classes,
        "train_only_classes": train_only,
    }
    for split in SPLITS:
        manifest[split] = [path.relative_to(base).as_posix() for path, _ in parts[split]]
    label_of = {name: label for label, name in enumerate(classes)}
    labels = {split: [label_of[name] for _, name in parts[split]] for split in SPLITS}
    return {"manifest": manifest, "labels": labels}


def _resolved(root: str | Path) -> Path:
    return Path(root).expanduser().resolve()


def imagefolder_split_manifest(
    root: str | Path, *, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
) -> dict[str, Any]:
    """Which files of ``root`` are train and which test, as ``load_dataset("imagefolder")``
    splits them; lists the folder, decodes nothing, writes nothing.

    Returns ``{"root", "layout": "flat" | "split", "seed", "test_fraction",
    "classes", "train_only_classes", "train": [paths], "test": [paths]}``
    with paths relative to ``root`` (POSIX separators), in row order. ``seed``
    and ``test_fraction`` are None for the ``split`` layout (the user's folders
    decide).
    """
    manifest: dict[str, Any] = _listing(_resolved(root), seed, test_fraction)["manifest"]
    return manifest


def manifest_path(
    root: str | Path, *, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
) -> Path:
    """Where :func:`load_imagefolder` writes ``root``'s manifest (in the data cache)."""
    digest = hashlib.sha256(str(_resolved(root)).encode()).hexdigest()[:16]
    if (seed, test_fraction) != (SPLIT_SEED, TEST_FRACTION):
        digest += f"-seed{seed}-test{test_fraction:g}"
    return data_root() / "imagefolder-splits" / f"{digest}.json"


def _write_manifest(path: Path, manifest: dict[str, Any]) -> str | None:
    """Write it unless the same text is there already; the error text if it cannot be."""
    text = json.dumps(manifest, indent=1) + "\n"
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return None
        atomic_write_text(path, text)
    except OSError as error:  # a read-only cache must not stop a run: meta still holds it
        return str(error)
    return None


def files_fingerprint(paths: list[Path], size: int) -> str:
    """SHA-256 over each file's bytes (streamed), in order, and the decoding: what identifies
    the pixels ``paths`` decode to at ``size`` without decoding them."""
    digest = hashlib.sha256(f"{_DECODER} size={size} n={len(paths)}".encode())
    for path in paths:
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _decoder(paths: list[Path], size: int) -> Callable[[int], np.ndarray]:
    def decode(row: int) -> np.ndarray:
        from PIL import Image

        path = paths[row]
        try:
            with Image.open(path) as image:
                return square_crop(image, size)
        except OSError as error:
            raise ValueError(f"imagefolder: cannot read image {str(path)!r}: {error}") from error

    return decode


def _reader(paths: list[Path]) -> Callable[[int], Any]:
    """Row -> the file's image, RGB at its own size (what the official loaders read)."""

    def read(row: int) -> Any:
        from PIL import Image

        path = paths[row]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as error:
            raise ValueError(f"imagefolder: cannot read image {str(path)!r}: {error}") from error

    return read


def load_imagefolder(
    split: str = "test",
    *,
    root: str | Path | None = None,
    image_size: int = IMAGE_SIZE,
    class_names: ClassNames | None = None,
    seed: int = SPLIT_SEED,
    test_fraction: float = TEST_FRACTION,
) -> ImageDataset:
    """A user's own images: ``root/train|test/<class>/*.jpg``, or ``root/<class>/*.jpg``
    split here into disjoint train and test parts (see the module's notes).

    Classes are the sub-folder names in sorted order. Prompts get them cleaned
    (``001.Black_footed_Albatross`` → ``Black footed Albatross``, see
    ``prompt_name``) unless ``class_names`` renames them (mapping keys may be
    folder names). Images are decoded when their rows are used, resized
    (shorter side) and centre-cropped to ``image_size``.

    Args:
        seed, test_fraction: how a flat folder is split (ignored for train/ and test/ folders).
    """
    if split not in SPLITS:
        raise ValueError(f"imagefolder: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if root is None:
        raise ValueError("imagefolder needs root=<folder with one sub-folder per class>")
    base = _resolved(root)
    listed = _listing(base, seed, test_fraction)
    manifest, labels = listed["manifest"], listed["labels"][split]
    if manifest["layout"] == "split" and not (base / split).is_dir():
        raise FileNotFoundError(
            f"imagefolder {str(base)!r} has {'/, '.join(s for s in SPLITS if (base / s).is_dir())}/ "
            f"but no {split}/ folder: give both train/ and test/, or one folder per class to "
            "split here"
        )
    relative: list[str] = manifest[split]
    if not relative:
        hint = (
            f" (classes with a single image go to train only: {manifest['train_only_classes']})"
            if manifest["train_only_classes"]
            else ""
        )
        raise ValueError(
            f"imagefolder {str(base)!r} holds no {split} images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}){hint}"
        )
    paths = [base / name for name in relative]
    path = manifest_path(base, seed=seed, test_fraction=test_fraction)
    error = _write_manifest(path, manifest)
    images = LazyImages(
        _decoder(paths, image_size),
        np.arange(len(paths)),
        image_size,
        fingerprint=lambda rows: files_fingerprint([paths[int(row)] for row in rows], image_size),
        original=_reader(paths),
    )
    classes: list[str] = manifest["classes"]
    folder = base if manifest["layout"] == "flat" else base / split
    meta: dict[str, Any] = {
        "root": str(folder),
        "layout": FLAT_LAYOUT if manifest["layout"] == "flat" else SPLIT_LAYOUT,
        "folders": classes,
        "files": relative,
        "split_manifest": manifest,
        "split_manifest_path": None if error else str(path),
    }
    if error:
        meta["split_manifest_error"] = error
    dataset = ImageDataset(
        "imagefolder",
        split,
        images,
        np.asarray(labels, dtype=np.int64),
        [prompt_name(name) for name in classes],
        meta=meta,
    )
    if isinstance(class_names, dict):  # keys may be the raw folder names
        by_folder = dict(zip(classes, dataset.class_names, strict=True))
        class_names = {by_folder.get(key) or key: value for key, value in class_names.items()}
    return dataset if class_names is None else rename_classes(dataset, class_names)
