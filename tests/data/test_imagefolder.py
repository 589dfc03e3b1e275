"""A user's own folder: split without leaks (flat layout), decoded lazily, never written to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmlab.data import imagefolder_split_manifest, list_datasets, load_dataset

# Class folder -> image count: a one-image class, a two-image one, odd and even sizes.
COUNTS = {"001.red_apple": 7, "002.green_leaf": 5, "blue_sky": 2, "lonely_owl": 1}


def _write_folder(root, counts=COUNTS):
    from PIL import Image

    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            shade = (40 * c + 9 * i) % 256
            # JPEG and PNG, odd sizes: every file goes through the resize and crop.
            image = Image.new("RGB", (40 + 3 * i, 30 + 2 * c), (shade, 255 - shade, 60))
            image.save(root / name / f"img{i:02d}.{'jpg' if i % 2 else 'png'}")
    if "blue_sky" in counts:
        (root / "blue_sky" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()  # not a class


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Manifests go to a private data cache, never to ~/.cache."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv("VLMLAB_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def flat(tmp_path):
    root = tmp_path / "photos"
    _write_folder(root)
    return root


@pytest.fixture
def decodes(monkeypatch):
    """How many images were decoded (each decode runs the crop once)."""
    from vlmlab.data import _imagefolder

    count = [0]
    crop = _imagefolder.square_crop

    def counted(image, size):
        count[0] += 1
        return crop(image, size)

    monkeypatch.setattr(_imagefolder, "square_crop", counted)
    return count


def _all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_flat_folder_is_split_disjoint_stratified_and_complete(flat):
    train = load_dataset("imagefolder", "train", root=flat, image_size=16)
    test = load_dataset("imagefolder", "test", root=flat, image_size=16)
    train_files, test_files = set(train.meta["files"]), set(test.meta["files"])
    assert len(train_files) == len(train) and len(test_files) == len(test)
    assert not train_files & test_files  # no image is in both: no leak
    images = {f for f in _all_files(flat) if f.endswith((".jpg", ".png"))}
    assert train_files | test_files == images  # none lost
    # Stratified: 40 % of each class to test (rounded), at least one each side.
    assert np.bincount(test.labels, minlength=4).tolist() == [3, 2, 1, 0]
    assert np.bincount(train.labels, minlength=4).tolist() == [4, 3, 1, 1]
    assert (
        train.class_names
        == test.class_names
        == ["red apple", "green leaf", "blue sky", "lonely owl"]
    )
    for dataset in (train, test):  # labels come from the folder of each file
        folders = dataset.meta["folders"]
        assert [folders[label] for label in dataset.labels] == [
            f.split("/")[0] for f in dataset.meta["files"]
        ]
        assert dataset.meta["layout"] == "flat (split here)"
    manifest = test.meta["split_manifest"]
    assert manifest["layout"] == "flat" and manifest["seed"] == 0
    assert manifest["test_fraction"] == 0.4
    assert manifest["train_only_classes"] == ["lonely_owl"]  # one image: train only, said so
    assert manifest["train"] == train.meta["files"] and manifest["test"] == test.meta["files"]


def test_the_split_is_fixed_across_loads_and_processes(flat, data_dir):
    first = load_dataset("imagefolder", "test", root=flat, image_size=16)
    again = load_dataset("imagefolder", "test", root=flat, image_size=16)
    assert first.meta["files"] == again.meta["files"]
    code = (
        "import json, sys; from vlmlab.data import imagefolder_split_manifest; "
        "print(json.dumps(imagefolder_split_manifest(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(flat)], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == first.meta["split_manifest"] == imagefolder_split_manifest(flat)
    # The manifest a researcher can read: in the data cache, not in the user's folder.
    path = first.meta["split_manifest_path"]
    assert path.startswith(str(data_dir / "imagefolder-splits"))
    assert json.loads(Path(path).read_text()) == first.meta["split_manifest"]
    other = imagefolder_split_manifest(flat, seed=1)
    assert other["test"] != first.meta["files"]  # the seed decides it
    assert {f.split("/")[0] for f in other["test"]} == {
        "001.red_apple",
        "002.green_leaf",
        "blue_sky",
    }


def test_loading_never_writes_into_the_users_folder(flat):
    before = _all_files(flat)
    for split in ("train", "test"):
        data = load_dataset("imagefolder", split, root=flat, image_size=16)
        np.asarray(data.images)
    assert _all_files(flat) == before


def test_images_decode_only_when_used(flat, decodes):
    from PIL import Image

    from vlmlab.data._common import square_crop

    train = load_dataset("imagefolder", "train", root=flat, image_size=16)
    assert decodes[0] == 0  # listing the folder decodes nothing
    assert train.images.shape == (len(train), 16, 16, 3) and train.images.dtype == np.uint8
    shots = train.subset([0, 2, 4, 6, 8])
    assert decodes[0] == 5
    assert shots.meta["files"] == [train.meta["files"][i] for i in (0, 2, 4, 6, 8)]
    with Image.open(flat / shots.meta["files"][1]) as image:
        assert np.array_equal(shots.images[1], square_crop(image, 16))
    assert train.images[3].shape == (16, 16, 3) and decodes[0] == 6
    assert train.images[3, 8, 8].shape == (3,)
    image_set = train.image_set()
    assert decodes[0] == 7 and len(image_set) == len(train)  # the set is lazy too
    assert image_set.content_hash and decodes[0] == 7  # hashed from the files, not pixels


def test_a_broken_file_is_named_when_it_is_decoded(flat):
    (flat / "002.green_leaf" / "img99.jpg").write_bytes(b"not a jpeg")
    data = load_dataset("imagefolder", "train", root=flat, image_size=16)
    files = data.meta["files"]
    if "002.green_leaf/img99.jpg" not in files:
        data = load_dataset("imagefolder", "test", root=flat, image_size=16)
        files = data.meta["files"]
    with pytest.raises(ValueError, match=r"cannot read image .*img99\.jpg"):
        np.asarray(data.images)


def test_train_and_test_folders_are_used_as_they_are(tmp_path):
    from PIL import Image

    for split, names in (("train", ["cat", "dog"]), ("test", ["cat", "dog", "emu"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    train = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    test = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    # One class list for both splits: a label means the same class in each.
    assert train.class_names == test.class_names == ["cat", "dog", "emu"]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.meta["layout"] == "train/test folders"
    assert (
        train.meta["files"][0] == "train/cat/0.png" and test.meta["files"][-1] == "test/emu/1.png"
    )
    manifest = imagefolder_split_manifest(tmp_path)
    assert manifest["layout"] == "split" and manifest["seed"] is None
    (tmp_path / "test").rename(tmp_path / "held-out")
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        load_dataset("imagefolder", "test", root=tmp_path, image_size=8)


def test_refusals_are_clear(tmp_path, flat):
    one = tmp_path / "one"
    _write_folder(one, {"only": 1})
    with pytest.raises(ValueError, match=r"no test images.*single image go to train only"):
        load_dataset("imagefolder", "test", root=one, image_size=8)
    assert len(load_dataset("imagefolder", "train", root=one, image_size=8)) == 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("imagefolder", "test", root=flat, test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("imagefolder", "val", root=flat)


def test_class_name_mapping_and_registry_text(flat):
    renamed = load_dataset(
        "imagefolder",
        "train",
        root=flat,
        image_size=8,
        class_names={"002.green_leaf": "leaf", "blue sky": "sky"},
    )
    assert renamed.class_names == ["red apple", "leaf", "sky", "lonely owl"]
    assert renamed.meta["layout"] == "flat (split here)"
    assert list_datasets()["imagefolder"] == (
        "your own images: root/train|test/<class>/*.jpg, or root/<class>/*.jpg split here"
    )
