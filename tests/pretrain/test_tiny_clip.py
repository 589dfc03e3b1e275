"""`vlmlab pretrain tiny-clip`: a real open_clip CLIP trained offline, deterministic,
cached, and loaded by the open_clip backend exactly as a user's checkpoint is."""

from __future__ import annotations

import json

import pytest

from vlmlab.pretrain import (
    GENERIC_CAPTION,
    PretrainConfig,
    caption_table,
    checkpoint_path,
    pretrain_tiny_clip,
)

SMALL = PretrainConfig(epochs=1, batch_size=128, max_images=640)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    steps = []
    result = pretrain_tiny_clip(SMALL, cache_dir=cache, progress=lambda s, n, loss: steps.append(s))
    return cache, result, steps


def test_trains_writes_checkpoint_and_manifest(trained):
    cache, result, steps = trained
    assert steps == [1, 2, 3, 4, 5]  # 640 images / 128 a batch, one epoch
    assert result.checkpoint == checkpoint_path(SMALL, cache) and result.checkpoint.is_file()
    manifest = json.loads(result.checkpoint.with_suffix(".json").read_text())
    assert manifest == result.manifest
    assert manifest["config"]["max_images"] == 640 and manifest["train_images"] == 640
    assert set(manifest["zero_shot_test_accuracy_by_class"]) >= {"T-shirt", "ankle boot"}
    assert (
        "not OpenAI's CLIP" in manifest["note"] and result.backend == "open_clip:vlmlab-tiny-fmnist"
    )
    assert not list(cache.rglob("*.tmp*"))  # written atomically


def test_same_seed_same_bytes_and_the_cache_is_reused(trained):
    cache, first, _ = trained
    steps = []
    reused = pretrain_tiny_clip(SMALL, cache_dir=cache, progress=lambda s, n, loss: steps.append(s))
    assert steps == [] and reused.manifest == first.manifest  # nothing trained again
    again = pretrain_tiny_clip(SMALL, cache_dir=cache, force=True)
    assert again.manifest["sha256"] == first.manifest["sha256"]
    other = pretrain_tiny_clip(
        PretrainConfig(epochs=1, batch_size=128, max_images=640, seed=1),
        cache_dir=cache,
        force=True,
    )
    assert other.manifest["sha256"] != first.manifest["sha256"]


def test_the_checkpoint_loads_like_any_users_checkpoint(trained):
    from vlmlab.data import load_dataset
    from vlmlab.methods import zero_shot
    from vlmlab.oracle import create_oracle

    _, result, _ = trained
    oracle = create_oracle("open_clip:vlmlab-tiny-fmnist", pretrained=str(result.checkpoint))
    assert oracle.metadata.model.startswith("vlmlab-tiny-fmnist/vlmlab-tiny-fmnist-")
    test = load_dataset("fashion-mnist", "test")
    measured = zero_shot(oracle, test, prompt="a photo of a")
    # The same pixels and prompt; batches of another size may flip a near-tie of this
    # barely-trained model (the full tiny CLIP measured 0.8153 both ways).
    assert measured.accuracy == pytest.approx(result.manifest["zero_shot_test_accuracy"], abs=1e-3)


def test_held_out_classes_are_never_named(tmp_path):
    config = PretrainConfig(epochs=1, batch_size=128, max_images=640, hold_out=("trousers",))
    assert config.name == "vlmlab-tiny-fmnist-without-trousers"
    names = ["T-shirt", "trousers", "bag"]
    table = caption_table(names, config)
    assert table[1] == [GENERIC_CAPTION] * len(config.captions)
    assert not any("trousers" in c for row in table for c in row)
    assert table[0][0] == "a photo of a T-shirt." and len(set(table[2])) == len(config.captions)
    with pytest.raises(
        ValueError, match=r"hold_out: \['jacket'\] are not classes of fashion-mnist"
    ):
        pretrain_tiny_clip(
            PretrainConfig(epochs=1, batch_size=128, max_images=640, hold_out=("jacket",)),
            cache_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="max_images must be >= batch_size"):
        PretrainConfig(max_images=10)
