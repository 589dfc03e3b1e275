"""CraFT's data rules: short classes filled with repeats, no validation split on request,
and augmented crops cut from the full-resolution originals (the official transform)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from vlmlab.data import ImageDataset, augmented_view, few_shot_split, sample_per_class
from vlmlab.data._common import square_crop
from vlmlab.data._lazy import LazyImages

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ------------------------------------------------------------------ few-shot draw
def test_a_short_class_is_filled_with_repeats_as_coop_draws_it():
    """CoOp's generate_fewshot_dataset (CraFT's loaders): random.choices when a class is short."""
    labels = np.array([0] * 10 + [1] * 40)
    rows = sample_per_class(labels, 16, seed=4, repeat=True)
    short, full = rows[:16], rows[16:]
    assert len(rows) == 32 and (labels[short] == 0).all() and (labels[full] == 1).all()
    assert len(set(short.tolist())) < 16  # 16 draws from 10 images: repeats
    assert len(set(full.tolist())) == 16  # a class with enough images draws without
    assert np.array_equal(rows, sample_per_class(labels, 16, seed=4, repeat=True))
    # A full class's draw is the one it always was (repeat changes nothing there).
    assert np.array_equal(
        sample_per_class(labels, 8, seed=4, repeat=True), sample_per_class(labels, 8, seed=4)
    )
    with pytest.raises(ValueError, match="class 0 has 10 images available, fewer than 16"):
        sample_per_class(labels, 16, seed=4)  # BBF's draw stays strict
    with pytest.raises(ValueError, match="class 0 has 0 images"):
        sample_per_class(labels, 16, seed=4, repeat=True, exclude=np.arange(10))


def test_val_shots_zero_draws_no_validation_split():
    labels = np.array([0] * 19 + [1] * 50)  # Caltech101's inline_skate: 19 training images
    split = few_shot_split(labels, 16, seed=1, val_shots=0, repeat=True)
    assert split.val.size == 0 and split.val.dtype == np.int64
    assert np.bincount(labels[split.train]).tolist() == [16, 16]
    with pytest.raises(ValueError, match="fewer than 16 shots"):
        few_shot_split(labels, 16, seed=1)  # 2K images a class were needed before
    with pytest.raises(ValueError, match="val_shots must be >= 0"):
        few_shot_split(labels, 4, seed=1, val_shots=-1)


# ------------------------------------------------------------------ originals
def _wide_photo():
    """300 x 450: red, green and blue bands (60, 330, 60 px wide); its stored centre square
    (columns 75-375) is all green."""
    from PIL import Image

    pixels = np.zeros((300, 450, 3), dtype=np.uint8)
    pixels[:, :60], pixels[:, 60:390], pixels[:, 390:] = RED, GREEN, BLUE
    return Image.fromarray(pixels)


def _wide_dataset(n: int = 4) -> ImageDataset:
    photo = _wide_photo()
    images = LazyImages(
        lambda row: square_crop(photo, 224), np.arange(n), 224, original=lambda row: photo
    )
    return ImageDataset("wide", "train", images, np.arange(n) % 2, ["a", "b"])


def _has(view: np.ndarray, colour: tuple[int, int, int]) -> bool:
    channel = colour.index(255)
    return bool(((view[..., channel] > 200) & (view.sum(-1) < 330)).any())


def test_crops_of_the_original_reach_beyond_the_stored_centre_square():
    data = _wide_dataset()
    assert data.originals is not None and data.originals[0].size == (450, 300)
    assert not _has(np.asarray(data.images), RED) and not _has(np.asarray(data.images), BLUE)
    stored_seen, original_seen = set(), set()
    for seed in range(20):
        stored = augmented_view(data, seed=seed, view=0, source="stored")
        original = augmented_view(data, seed=seed, view=0, source="original")
        assert stored.images.shape == original.images.shape == (4, 224, 224, 3)
        for image in stored.images:
            stored_seen |= {c for c in (RED, BLUE) if _has(image, c)}
        for image in original.images:
            original_seen |= {c for c in (RED, BLUE) if _has(image, c)}
    # The stored square never shows the bands; crops of the photo reach them.
    assert stored_seen == set() and original_seen == {RED, BLUE}
    again = augmented_view(data, seed=3, view=0, source="original")
    assert np.array_equal(
        again.images, augmented_view(data, seed=3, view=0, source="original").images
    )
    assert again.meta["augmentation"]["source"] == "original"
    assert "source" not in augmented_view(data, seed=3, view=0).meta["augmentation"]


def test_the_crop_box_is_drawn_on_the_originals_own_size():
    """scale is a share of the photo's area (torchvision's rule), not of the 224 px square."""
    from vlmlab.data import _augment

    data = _wide_dataset()
    boxes = []

    def record(rng, height, width, scale):
        box = real(rng, height, width, scale)
        boxes.append(((height, width), box))
        return box

    real = _augment._crop_box
    with mock.patch.object(_augment, "_crop_box", side_effect=record):
        for seed in range(5):
            augmented_view(data, seed=seed, view=1, scale=(0.5, 1.0), source="original")
        assert {size for size, _ in boxes} == {(300, 450)} and len(boxes) == 20
        assert len({box[2:] for _, box in boxes}) > 10  # random boxes, not the fallback
        for _, (top, left, h, w) in boxes:
            assert 0.5 * 135_000 * 0.98 <= h * w <= 135_000  # up to rounding of h and w
            assert 0 <= top <= 300 - h and 0 <= left <= 450 - w
        boxes.clear()
        augmented_view(data, seed=0, view=1, source="stored")
        assert {size for size, _ in boxes} == {(224, 224)}


def test_subsets_keep_their_originals_and_sets_in_memory_crop_their_pixels(fashion_test):
    data = _wide_dataset(6)
    sub = data.subset([5, 1, 1])
    assert sub.originals is not None and len(sub.originals) == 3
    assert isinstance(sub.images, np.ndarray)  # the k-shot pixels are decoded once
    # Held in memory at its own size (28 px): the stored pixels are the originals.
    small = fashion_test.subset(np.arange(6))
    assert small.originals is None
    a = augmented_view(small, seed=1, view=0, source="original")
    b = augmented_view(small, seed=1, view=0, source="stored")
    assert np.array_equal(a.images, b.images) and a.meta == b.meta
    with pytest.raises(ValueError, match="source must be"):
        augmented_view(small, seed=1, view=0, source="photo")  # type: ignore[arg-type]


def test_lazy_loaders_give_their_originals(monkeypatch, tmp_path):
    from PIL import Image

    from vlmlab.data import _torchvision, load_dataset

    class Photos:
        classes = ("apple_pie", "beignets")
        _labels = (0, 1, 0, 1)

        def __len__(self):
            return 4

        def __getitem__(self, row):
            return Image.new("L", (300 + row, 200), 40 * row), self._labels[row]

    monkeypatch.setattr(_torchvision, "build_torchvision_dataset", lambda s, r, a: Photos())
    train = load_dataset("food101", "train", root=tmp_path)
    shots = train.subset([3, 0])
    assert shots.originals is not None
    assert [shots.originals[i].size for i in range(2)] == [(303, 200), (300, 200)]
    assert shots.originals[0].mode == "RGB"  # as the official read_image converts

    folder = tmp_path / "photos"
    for name in ("cat", "dog"):
        (folder / "train" / name).mkdir(parents=True)
        (folder / "test" / name).mkdir(parents=True)
        Image.new("RGB", (120, 60), (9, 9, 9)).save(folder / "train" / name / "a.png")
        Image.new("RGB", (50, 80), (9, 9, 9)).save(folder / "test" / name / "a.png")
    monkeypatch.setenv("VLMLAB_DATA_DIR", str(tmp_path / "cache"))
    own = load_dataset("imagefolder", "train", root=folder, image_size=32)
    assert own.images.shape == (2, 32, 32, 3)
    assert own.subset([1]).originals[0].size == (120, 60)
