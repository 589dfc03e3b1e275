"""The Oracle contract on a real backend: shapes, counting, and bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import ImageSet, Oracle

NAMES = ["cat", "dog", "sweet pepper"]


@pytest.fixture(scope="module")
def images(vit_b32):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (8, 36, 36, 3), dtype=np.uint8)
    return vit_b32.register_images(ImageSet(pixels, {"dataset": "noise", "split": "contract"}))


def _ctx(oracle, population=4, n_context=4):
    meta = oracle.metadata
    return meta.embedding_mean + meta.embedding_std * torch.randn(
        population, n_context, meta.token_dim
    )


def test_is_an_oracle(vit_b32):
    assert isinstance(vit_b32, Oracle)


def test_shapes_and_exact_counts(vit_b32, images):
    key = "counts"
    out = vit_b32.logits(_ctx(vit_b32, 4), NAMES, images, budget_key=key)
    assert out.shape == (4, 8, 3) and out.dtype == torch.float32
    out = vit_b32.logits(_ctx(vit_b32, 5), NAMES, images, indices=[0, 2, 2], budget_key=key)
    assert out.shape == (5, 3, 3)
    usage = vit_b32.ledger.usage(key)
    assert (usage.queries, usage.images_scored, usage.prompts_encoded, usage.calls) == (
        9,
        4 * 8 + 5 * 3,
        9 * 3,
        2,
    )


def test_same_inputs_same_logits(vit_b32, images):
    ctx = _ctx(vit_b32, 3)
    assert torch.equal(vit_b32.logits(ctx, NAMES, images), vit_b32.logits(ctx, NAMES, images))


def test_indices_select_rows(vit_b32, images):
    ctx = _ctx(vit_b32, 2)
    full = vit_b32.logits(ctx, NAMES, images)
    part = vit_b32.logits(ctx, NAMES, images, indices=np.array([5, 1]))
    assert torch.allclose(part, full[:, [5, 1]], atol=1e-5)


def test_budget_refuses_whole_call_before_work(vit_b32, images):
    key = "budgeted"
    vit_b32.ledger.set_budget(key, 10)
    vit_b32.logits(_ctx(vit_b32, 6), NAMES, images, budget_key=key)
    with pytest.raises(BudgetExceededError, match="requested 6 queries, 4 left of 10"):
        vit_b32.logits(_ctx(vit_b32, 6), NAMES, images, budget_key=key)
    assert vit_b32.ledger.usage(key).queries == 6
    vit_b32.logits(_ctx(vit_b32, 4), NAMES, images, budget_key=key)
    assert vit_b32.ledger.remaining(key) == 0


def test_threads_on_one_budget_key_are_counted_exactly(vit_b32, images):
    key = "threads"
    vit_b32.ledger.set_budget(key, 25)
    served, refused = [], []
    ctx = _ctx(vit_b32, 3)

    def worker() -> None:
        for _ in range(4):
            try:
                vit_b32.logits(ctx, NAMES, images, budget_key=key)
                served.append(3)
            except BudgetExceededError:
                refused.append(3)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(served) == vit_b32.ledger.usage(key).queries == 24  # 8 calls fit in 25
    assert len(refused) == 16 - 8


BAD_INPUTS = [
    ("wrong rank", lambda o: torch.zeros(4, 512), NAMES, None, ValueError, r"shape \(population"),
    ("wrong dim", lambda o: torch.zeros(2, 4, 384), NAMES, None, ValueError, "dimension 384"),
    ("empty population", lambda o: torch.zeros(0, 4, 512), NAMES, None, ValueError, "at least one"),
    ("nan", lambda o: torch.full((2, 4, 512), float("nan")), NAMES, None, ValueError, "NaN/inf"),
    (
        "inf",
        lambda o: torch.zeros(3, 4, 512).index_fill_(0, torch.tensor([1]), float("inf")),
        NAMES,
        None,
        ValueError,
        r"candidates \[1\]",
    ),
    (
        "integer contexts",
        lambda o: torch.zeros(2, 4, 512, dtype=torch.long),
        NAMES,
        None,
        TypeError,
        "floating",
    ),
    ("list contexts", lambda o: [[0.0]], NAMES, None, TypeError, "torch.Tensor"),
    (
        "empty classes",
        lambda o: torch.zeros(2, 4, 512),
        [],
        None,
        ValueError,
        "class_names is empty",
    ),
    (
        "blank class",
        lambda o: torch.zeros(2, 4, 512),
        ["cat", " "],
        None,
        ValueError,
        r"class_names\[1\]",
    ),
    (
        "string classes",
        lambda o: torch.zeros(2, 4, 512),
        "cat",
        None,
        TypeError,
        "sequence of strings",
    ),
    ("too long", lambda o: torch.zeros(1, 75, 512), NAMES, None, ValueError, "context length 77"),
    ("bad indices", lambda o: torch.zeros(2, 4, 512), NAMES, [0, 99], ValueError, "out of range"),
    ("empty indices", lambda o: torch.zeros(2, 4, 512), NAMES, [], ValueError, "non-empty"),
    ("float indices", lambda o: torch.zeros(2, 4, 512), NAMES, [0.5], TypeError, "integers"),
]


@pytest.mark.parametrize(
    ("label", "make", "names", "indices", "error", "match"),
    BAD_INPUTS,
    ids=[b[0] for b in BAD_INPUTS],
)
def test_bad_input_is_refused_before_any_query(
    vit_b32, images, label, make, names, indices, error, match
):
    key = f"bad-{label}"
    with pytest.raises(error, match=match):
        vit_b32.logits(make(vit_b32), names, images, indices=indices, budget_key=key)
    assert vit_b32.ledger.usage(key).queries == 0 and vit_b32.ledger.usage(key).calls == 0


def test_unknown_image_set_is_refused(vit_b32):
    with pytest.raises(KeyError, match=r"unknown image set 'deadbeef'.*register_images"):
        vit_b32.logits(_ctx(vit_b32, 1), NAMES, "deadbeef", budget_key="bad-set")
    assert vit_b32.ledger.usage("bad-set").queries == 0


def test_bad_image_sets():
    with pytest.raises(ValueError, match=r"uint8 with shape \(N, H, W, 3\)"):
        ImageSet(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        ImageSet(np.zeros((0, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        ImageSet([[1, 2, 3]])  # type: ignore[arg-type]


def test_phrase_embeddings_are_table_rows(vit_b32):
    emb = vit_b32.phrase_embeddings("a photo of a")
    ids = vit_b32._token_ids("a photo of a")
    assert torch.equal(emb, vit_b32.model.token_embedding.weight[ids])
    with pytest.raises(ValueError, match="no tokens"):
        vit_b32.phrase_embeddings("")
