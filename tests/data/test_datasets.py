from __future__ import annotations

import numpy as np
import pytest

from vlmlab.data import (
    FASHION_MNIST_CLASSES,
    few_shot_split,
    list_datasets,
    load_dataset,
    partition_classes,
    prompt_name,
    read_class_names,
    rename_classes,
    sample_per_class,
    stratified_subset,
)
from vlmlab.errors import DatasetUnavailableError


def test_fashion_mnist_offline(fashion_test):
    assert fashion_test.images.shape == (10000, 28, 28, 3)
    assert fashion_test.images.dtype == np.uint8
    assert fashion_test.class_names == FASHION_MNIST_CLASSES
    assert np.bincount(fashion_test.labels).tolist() == [1000] * 10
    # Inverted to dark-on-white: the border is white.
    assert fashion_test.images[:, 0, 0].mean() > 250
    raw = load_dataset("fashion-mnist", "test", invert=False)
    assert np.array_equal(raw.images, 255 - fashion_test.images)


def test_registry_and_errors():
    assert set(list_datasets()) >= {"fashion-mnist", "cifar10", "cifar100", "imagefolder"}
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*fashion-mnist"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("fashion-mnist", "val")


def test_cifar_offline_names_the_offline_dataset(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(
        DatasetUnavailableError, match=r"cifar10 .*offline, use the 'fashion-mnist'"
    ):
        load_dataset("cifar10", "test", root=tmp_path)


def test_cifar100_class_names_from_a_local_copy(monkeypatch, tmp_path):
    import torchvision.datasets

    class FakeCifar100:
        def __init__(self, root, train, download):
            self.data = np.zeros((2, 32, 32, 3), dtype=np.uint8)
            self.targets = [0, 1]
            self.classes = ["apple", "aquarium_fish"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCifar100)
    data = load_dataset("cifar100", "train", root=tmp_path)
    assert data.class_names == ["apple", "aquarium fish"]


def test_few_shot_is_deterministic_and_disjoint(fashion_test):
    labels = fashion_test.labels
    a = few_shot_split(labels, 16, seed=3)
    b = few_shot_split(labels, 16, seed=3)
    c = few_shot_split(labels, 16, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train)
    assert len(a.train) == len(a.val) == 160
    assert not set(a.train) & set(a.val)
    assert np.bincount(labels[a.train]).tolist() == [16] * 10
    with pytest.raises(ValueError, match="shots must be a positive int"):
        sample_per_class(labels, 0, seed=0)
    with pytest.raises(ValueError, match="fewer than 5 shots"):
        sample_per_class(np.array([0, 0, 1, 1, 1, 1, 1]), 5, seed=0)


def test_subset_records_split_indices(fashion_test):
    idx = stratified_subset(fashion_test.labels, 50, seed=0)
    sub = fashion_test.subset(idx)
    sub2 = sub.subset([1, 0])
    assert np.array_equal(sub2.indices, idx[[1, 0]])
    assert sub2.image_set().meta == {
        "dataset": "fashion-mnist",
        "split": "test",
        "indices": idx[[1, 0]].tolist(),
    }
    assert np.array_equal(sub2.images[0], fashion_test.images[idx[1]])


def test_partition_defaults_to_first_40_percent():
    assert partition_classes(10).forget == (0, 1, 2, 3)
    assert partition_classes(100).forget == tuple(range(40))
    assert partition_classes(200).forget == tuple(range(80))
    part = partition_classes(10, forget=[7, 2])
    assert part.forget == (2, 7) and 2 not in part.memorize and len(part.memorize) == 8
    assert part.forget_mask(np.array([2, 3, 7])).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"out of range"):
        partition_classes(10, forget=[10])
    with pytest.raises(ValueError, match="some but not all"):
        partition_classes(3, forget=[0, 1, 2])


def test_imagefolder(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("VLMLAB_DATA_DIR", str(tmp_path / "data-cache"))  # split manifests

    for name, color in (("red_apple", (255, 0, 0)), ("green_leaf", (0, 255, 0))):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (60 + 10 * i, 40), color).save(folder / f"{i}.png")
    (tmp_path / "train" / "green_leaf" / "notes.txt").write_text("not an image")
    data = load_dataset("imagefolder", "train", root=tmp_path, image_size=32)
    assert data.class_names == ["green leaf", "red apple"]
    assert data.images.shape == (6, 32, 32, 3)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[0, 16, 16].tolist() == [0, 255, 0]
    with pytest.raises(FileNotFoundError, match="imagefolder root not found"):
        load_dataset("imagefolder", "train", root=tmp_path / "missing")
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("imagefolder", "train")


@pytest.mark.parametrize(
    ("folder", "prompt"),
    [
        ("001.Black_footed_Albatross", "Black footed Albatross"),
        ("12_sea_lion", "sea lion"),
        ("3-oak", "oak"),
        ("aquarium_fish", "aquarium fish"),
        ("T-shirt", "T-shirt"),
        ("7", "7"),
        ("747-400", "747-400"),
    ],
)
def test_prompt_names_from_folders(folder, prompt):
    assert prompt_name(folder) == prompt


def _two_class_folder(root, names):
    from PIL import Image

    for name in names:  # two images a class: a flat folder is split into train and test
        (root / name).mkdir(parents=True)
        for image in ("a.png", "b.png"):
            Image.new("RGB", (8, 8), (9, 9, 9)).save(root / name / image)


def test_imagefolder_cleans_cub_style_names_and_maps_by_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMLAB_DATA_DIR", str(tmp_path / ".data-cache"))  # split manifests
    _two_class_folder(tmp_path, ["001.Black_footed_Albatross", "002.Laysan_Albatross"])
    data = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    assert data.class_names == ["Black footed Albatross", "Laysan Albatross"]
    renamed = load_dataset(
        "imagefolder",
        "test",
        root=tmp_path,
        image_size=8,
        class_names={"002.Laysan_Albatross": "Laysan albatross"},
    )
    assert renamed.class_names == ["Black footed Albatross", "Laysan albatross"]


def test_class_name_files_rename_any_dataset(tmp_path, fashion_test):
    small = fashion_test.subset([0, 1])
    as_list = tmp_path / "names.txt"
    as_list.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    assert rename_classes(small, read_class_names(as_list)).class_names[9] == "class 9"
    as_map = tmp_path / "names.yaml"
    as_map.write_text("trousers: pair of trousers\n'0': tee\n")
    renamed = rename_classes(small, read_class_names(as_map))
    assert renamed.class_names[:2] == ["tee", "pair of trousers"]
    assert renamed.class_names[2:] == FASHION_MNIST_CLASSES[2:]
    assert np.array_equal(renamed.labels, small.labels)
    as_json = tmp_path / "names.json"
    as_json.write_text('{"trowsers": "x"}')
    with pytest.raises(ValueError, match=r"'trowsers' match no class of fashion-mnist"):
        rename_classes(small, read_class_names(as_json))
    with pytest.raises(ValueError, match="3 names given but fashion-mnist has 10"):
        rename_classes(small, ["a", "b", "c"])
    with pytest.raises(ValueError, match="repeated: \\['bag'\\]"):
        rename_classes(small, {"coat": "bag"})
    with pytest.raises(FileNotFoundError, match=r"data\.class_names: no such file"):
        read_class_names(tmp_path / "missing.txt")
    (tmp_path / "names.csv").write_text("a")
    with pytest.raises(ValueError, match=r"must be \.txt"):
        read_class_names(tmp_path / "names.csv")


class _FakeFood:
    """A torchvision-shaped dataset: labels in ``_labels``; decoding is counted."""

    def __init__(self, root, split="train", download=False):
        self.classes = ["apple_pie", "baby_back_ribs", "beignets"]
        self.split, self.decoded = split, 0
        self._labels = [i % 3 for i in range(30 if split == "train" else 12)]

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, row):
        from PIL import Image

        self.decoded += 1
        shade = 40 * self._labels[row] + row
        return Image.new("RGB", (64 + row, 48), (shade, shade, shade)), self._labels[row]


def test_coop_datasets_decode_only_the_rows_used(monkeypatch, tmp_path):
    from vlmlab.data import _torchvision

    built = []

    def fake(source, root, arguments):
        assert source.cls_name == "Food101"
        built.append(_FakeFood(root, **arguments))
        return built[-1]

    monkeypatch.setattr(_torchvision, "build_torchvision_dataset", fake)
    train = load_dataset("food101", "train", root=tmp_path)
    assert built[-1].split == "train" and built[-1].decoded == 0  # labels read, nothing decoded
    assert train.images.shape == (30, 224, 224, 3) and train.class_names[0] == "apple pie"
    shots = train.subset(sample_per_class(train.labels, 2, seed=0))
    assert built[-1].decoded == 6 and shots.images.shape == (6, 224, 224, 3)
    assert shots.images.dtype == np.uint8 and np.bincount(shots.labels).tolist() == [2, 2, 2]
    test = load_dataset("food101", "test", root=tmp_path)
    assert built[-1].split == "test" and len(test) == 12
    assert np.asarray(test.image_set().pixels).shape == (12, 224, 224, 3)


def test_datasets_without_a_split_get_a_fixed_holdout(monkeypatch, tmp_path):
    from vlmlab.data import _torchvision

    monkeypatch.setattr(
        _torchvision, "build_torchvision_dataset", lambda s, r, a: _FakeFood(r, split="train")
    )
    train = load_dataset("eurosat", "train", root=tmp_path)
    test = load_dataset("eurosat", "test", root=tmp_path)
    assert len(train) == 18 and len(test) == 12  # 40 % of each class of 10 is held out
    assert not set(train.labels.tolist()) - {0, 1, 2}
    assert np.bincount(test.labels).tolist() == [4, 4, 4]
    again = load_dataset("eurosat", "test", root=tmp_path)
    assert np.array_equal(np.asarray(again.images), np.asarray(test.images))


class _FakeCaltech(_FakeFood):
    def __init__(self, root, **arguments):
        super().__init__(root, split="train")
        self.classes = None
        self.categories = ["Faces", "Faces_easy", "Leopards", "airplanes", "sea_horse"]
        self.y = [i % 5 for i in range(50)]
        self._labels = self.y


@pytest.mark.parametrize(
    ("dataset", "raw", "coop"),
    [
        ("eurosat", ["AnnualCrop", "SeaLake"], ["Annual Crop Land", "Sea or Lake"]),
        ("stanford_cars", ["AM General Hummer SUV 2000"], ["2000 AM General Hummer SUV"]),
        (
            "sun397",
            ["apartment_building/outdoor", "abbey"],
            ["outdoor apartment building", "abbey"],
        ),
    ],
)
def test_coop_class_names(dataset, raw, coop):
    from vlmlab.data._torchvision import COOP_SOURCES, coop_class_names

    assert coop_class_names(COOP_SOURCES[dataset], raw) == (coop, list(range(len(raw))))


def test_caltech101_drops_faces_easy_like_coop(monkeypatch, tmp_path):
    from vlmlab.data import _torchvision

    monkeypatch.setattr(_torchvision, "build_torchvision_dataset", lambda s, r, a: _FakeCaltech(r))
    train = load_dataset("caltech101", "train", root=tmp_path)
    test = load_dataset("caltech101", "test", root=tmp_path)
    assert train.class_names == ["face", "leopard", "airplane", "sea horse"]
    assert len(train) + len(test) == 40  # Faces_easy's 10 images are gone
    assert set(train.labels.tolist()) == {0, 1, 2, 3}
    assert np.bincount(test.labels).tolist() == [4, 4, 4, 4]


def test_coop_dataset_unavailable_says_what_to_do(monkeypatch, tmp_path):
    from vlmlab.data import _torchvision

    def offline(source, root, arguments):
        raise RuntimeError("no network")

    monkeypatch.setattr(_torchvision, "build_torchvision_dataset", offline)
    with pytest.raises(DatasetUnavailableError, match=r"stanford_cars.*give data.root"):
        load_dataset("stanford_cars", "test", root=tmp_path)
    with pytest.raises(DatasetUnavailableError, match=r"dtd.*download it once.*fashion-mnist"):
        load_dataset("dtd", "train", root=tmp_path)


def test_augmented_views_are_seeded_crops_of_the_same_shape(fashion_test):
    from vlmlab.data import augmented_view

    small = fashion_test.subset(stratified_subset(fashion_test.labels, 20, seed=0))
    a = augmented_view(small, seed=1, view=0)
    assert a.images.shape == small.images.shape and a.images.dtype == np.uint8
    assert np.array_equal(a.images, augmented_view(small, seed=1, view=0).images)
    assert not np.array_equal(a.images, augmented_view(small, seed=1, view=1).images)
    assert not np.array_equal(a.images, small.images)
    assert np.array_equal(a.labels, small.labels)
    assert a.image_set().meta["augmentation"] == {
        "seed": 1,
        "view": 0,
        "scale": [0.5, 1.0],
        "flip": True,
    }
    # scale (1, 1) without flips keeps every full-area crop close to the original
    whole = augmented_view(small, seed=1, view=0, scale=(1.0, 1.0), flip=False)
    assert np.abs(whole.images.astype(int) - small.images.astype(int)).mean() < 8
    with pytest.raises(ValueError, match="augmentation scale"):
        augmented_view(small, seed=1, view=0, scale=(0.0, 1.0))


def test_sample_up_to_per_class_caps_without_error():
    from vlmlab.data import sample_up_to_per_class

    labels = np.array([0] * 5 + [1] * 2000)
    rows = sample_up_to_per_class(labels, 1000, seed=3)
    assert np.bincount(labels[rows]).tolist() == [5, 1000]  # a short class gives all it has
    assert np.array_equal(rows, sample_up_to_per_class(labels, 1000, seed=3))
    assert len(np.unique(rows)) == len(rows)
    every = sample_up_to_per_class(labels, None, seed=3, exclude=rows[:2], classes=[0])
    assert sorted(every.tolist()) == sorted(set(range(5)) - set(rows[:2].tolist()))
    fifth = sample_up_to_per_class(labels, 200, seed=3, share=0.2)
    assert np.bincount(labels[fifth]).tolist() == [1, 200]
    with pytest.raises(ValueError, match="class 0 has no images available"):
        sample_up_to_per_class(labels, 10, seed=3, exclude=np.arange(5))
    with pytest.raises(ValueError, match="cap must be a positive int"):
        sample_up_to_per_class(labels, 0, seed=3)


def test_rotated_views_are_seeded_and_rotation_zero_keeps_the_old_pixels(fashion_test):
    from PIL import Image

    from vlmlab.data import augmented_view
    from vlmlab.data._augment import _crop_box

    small = fashion_test.subset(stratified_subset(fashion_test.labels, 20, seed=0))
    plain = augmented_view(small, seed=1, view=0, scale=(0.7, 1.0))
    # rotation 0 draws no angle: the crops and flips (and cache name) views had before it
    rng = np.random.default_rng([1, 0])
    for image, got in zip(small.images, plain.images, strict=True):
        top, left, h, w = _crop_box(rng, 28, 28, (0.7, 1.0))
        crop = Image.fromarray(image[top : top + h, left : left + w])
        resized = np.asarray(crop.resize((28, 28), Image.Resampling.BICUBIC))
        assert np.array_equal(got, resized[:, ::-1] if rng.random() < 0.5 else resized)
    assert plain.image_set().meta["augmentation"] == {
        "seed": 1,
        "view": 0,
        "scale": [0.7, 1.0],
        "flip": True,
    }
    turned = augmented_view(small, seed=1, view=0, scale=(0.7, 1.0), rotation=15)
    again = augmented_view(small, seed=1, view=0, scale=(0.7, 1.0), rotation=15)
    assert np.array_equal(turned.images, again.images)
    assert not np.array_equal(turned.images, plain.images)
    assert turned.image_set().meta["augmentation"]["rotation"] == 15
    with pytest.raises(ValueError, match="rotation must be >= 0"):
        augmented_view(small, seed=1, view=0, rotation=-1)
