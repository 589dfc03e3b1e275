"""Every backend passes the shared Oracle conformance suite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmlab.oracle import ImageSet
from vlmlab.testing import OracleConformance


def _noise_images(seed: int, n: int = 8) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 36, 36, 3), dtype=np.uint8), {"dataset": "noise"})


class TestOpenClipConformance(OracleConformance):
    @pytest.fixture
    def oracle(self, vit_b32):
        return vit_b32

    @pytest.fixture
    def image_set(self, vit_b32):
        return vit_b32.register_images(_noise_images(2))


@pytest.mark.slow
class TestConseConformance(OracleConformance):
    @pytest.fixture
    def oracle(self, conse):
        return conse

    @pytest.fixture
    def image_set(self, conse, fashion_test):
        return conse.register_images(fashion_test.subset(np.arange(8)).image_set())


class TestLatencyConformance(OracleConformance):
    """The benchmark stand-in (no model, a fixed delay) keeps the contract too."""

    @pytest.fixture
    def oracle(self):
        from vlmlab.oracle import create_oracle

        return create_oracle("latency:1")

    @pytest.fixture
    def image_set(self, oracle):
        return oracle.register_images(_noise_images(3))


def test_latency_backend_takes_its_delay_per_call():
    import time

    from vlmlab.oracle import create_oracle
    from vlmlab.testing import random_contexts

    oracle = create_oracle("latency:40")
    ref = oracle.register_images(_noise_images(4))
    started = time.perf_counter()
    oracle.logits(random_contexts(oracle, 5), ["a", "b"], ref)
    assert time.perf_counter() - started >= 0.04  # one delay for the whole population
    assert oracle.metadata.backend == "latency"
    with pytest.raises(ValueError, match="latency:<milliseconds>"):
        create_oracle("latency:fast")


def test_bad_image_sets():
    with pytest.raises(ValueError, match=r"uint8 with shape \(N, H, W, 3\)"):
        ImageSet(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        ImageSet(np.zeros((0, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        ImageSet([[1, 2, 3]])  # type: ignore[arg-type]


def test_open_clip_phrase_embeddings_are_table_rows(vit_b32):
    emb = vit_b32.phrase_embeddings("a photo of a")
    ids = vit_b32._token_ids("a photo of a")
    assert torch.equal(emb, vit_b32.model.token_embedding.weight[ids])
