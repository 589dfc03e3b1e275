"""One key learns nothing about another key's images: features are held per key, evicted on
DELETE and bounded in size (the replica's side; over HTTP: test_hardening.py)."""

from __future__ import annotations

import numpy as np
import pytest

from vlmlab.oracle import ImageSet, create_oracle, scoped_image_set_id
from vlmlab.pool import OracleReplica

PIXELS = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)


def test_scoped_sets_are_held_apart_and_never_touch_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE_DIR", str(tmp_path))
    oracle = create_oracle("latency:0", disk_cache=True)
    images = ImageSet(PIXELS, {"dataset": "http"})
    alice = oracle.register_images(images, scope="alice")
    bob = oracle.register_images(images, scope="bob")
    assert alice.id == scoped_image_set_id("alice", images.ref.id)
    assert len({alice.id, bob.id, images.ref.id}) == 3  # one entry per key, none shared
    assert oracle.has_image_set(alice) and oracle.has_image_set(bob)
    assert not oracle.has_image_set(images.ref)
    assert not list(tmp_path.rglob("*.npy"))  # a later key cannot hit a file the first wrote
    assert oracle.forget_image_set(alice) and not oracle.has_image_set(alice)
    assert not oracle.forget_image_set(alice)
    oracle.register_images(images)  # unscoped (a run's own sets): the disk cache as before
    assert len(list(tmp_path.rglob("*.npy"))) == 1


def _box(set_id: str, scope: str | None, pixels: np.ndarray) -> dict:
    import ray

    box = {"id": set_id, "size": len(pixels), "meta": {}, "pixels": [ray.put(pixels)]}
    return box if scope is None else {**box, "scope": scope}


@pytest.mark.slow
def test_a_replica_keeps_keys_apart_evicts_on_request_and_stays_within_its_bound(ray_session):
    replica = OracleReplica("latency:0")
    sets = [ImageSet(PIXELS + i, {}) for i in range(3)]
    contexts = np.zeros((1, 2, 16), np.float32)

    def score(image_set: ImageSet, scope: str) -> None:
        box = _box(image_set.ref.id, scope, image_set.pixels)
        replica._logits_many([(contexts, ["a"], box, None)])

    score(sets[0], "alice")
    score(sets[0], "bob")  # the same pixels: bob's own features, encoded again
    assert replica.oracle.image_set_count == 2
    assert replica.forget_image_sets([scoped_image_set_id("bob", sets[0].ref.id)]) == 1
    assert replica.oracle.image_set_count == 1
    one_set = replica.oracle.image_features(scoped_image_set_id("alice", sets[0].ref.id)).nbytes
    replica.served_feature_bytes = 2 * one_set  # room for two sets
    score(sets[1], "alice")
    score(sets[0], "alice")  # used again: now the most recent
    score(sets[2], "alice")  # over the bound: the least recently used (sets[1]) goes
    held = {
        s.ref.id
        for s in sets
        if replica.oracle.has_image_set(scoped_image_set_id("alice", s.ref.id))
    }
    assert held == {sets[0].ref.id, sets[2].ref.id}
