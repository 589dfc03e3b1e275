"""On CUDA: reduced precision stays close to fp32, and batching stays exact (skipped without CUDA).

Random-init models (no weights can be downloaded here); the bounds are what
these models' logits allow: a random-init CLIP's logits differ little between
classes, so agreement is stated relative to their spread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmlab.oracle import ImageSet, LogitsRequest, OpenClipOracle
from vlmlab.testing import random_contexts

pytestmark = pytest.mark.gpu

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _logits(precision: str, model: str = "ViT-B-16"):
    oracle = OpenClipOracle(model, device="cuda", precision=precision, disk_cache=False)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    ref = oracle.register_images(ImageSet(pixels, {"dataset": "noise-gpu"}))
    return oracle, ref, oracle.logits(random_contexts(oracle, 20, seed=0), NAMES, ref)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_stays_close_to_fp32(precision):
    _, _, reference = _logits("fp32")
    _, _, low = _logits(precision)
    spread = float(reference.std())
    assert float((low - reference).abs().max()) <= 0.25 * spread


def test_batched_requests_equal_requests_alone_on_cuda():
    oracle, ref, _ = _logits("fp32")
    requests = [
        LogitsRequest(random_contexts(oracle, 20, seed=s), NAMES, ref, budget_key=f"t{s}")
        for s in range(8)
    ]
    together = oracle.logits_many(requests)
    for request, batched in zip(requests, together, strict=True):
        alone = oracle.logits(request.contexts, NAMES, ref)
        assert float((batched - alone).abs().max()) <= 1e-4
    assert torch.cuda.max_memory_allocated() > 0
