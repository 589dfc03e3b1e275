"""Conformance tests every Oracle implementation must pass.

Subclass :class:`OracleConformance` in a test module and provide two pytest
fixtures, ``oracle`` (the implementation under test) and ``image_set`` (a
registered :class:`~vlmlab.oracle.ImageSetRef` of at least 4 images); every
``test_*`` method then runs against it. The in-process backends, the Serve
pool's client and the HTTP client all run through it.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import ImageSetRef, Oracle

CLASS_NAMES = ["cat", "dog", "sweet pepper"]


def random_contexts(
    oracle: Oracle, population: int, n_context: int = 4, seed: int = 0
) -> torch.Tensor:
    """Contexts drawn around the token-embedding table (N(mean, std))."""
    meta = oracle.metadata
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(population, n_context, meta.token_dim, generator=generator)
    return meta.embedding_mean + meta.embedding_std * noise


def _key(label: str) -> str:
    return f"conformance-{label}-{uuid.uuid4().hex[:8]}"


def _bad_inputs(
    dim: int, context_length: int
) -> list[tuple[str, object, object, object, type, str]]:
    """(label, contexts, class names, indices, error type, message pattern)."""
    ok = torch.zeros(2, 4, dim)
    inf = torch.zeros(3, 4, dim)
    inf[1, 2, 3] = float("inf")
    return [
        ("wrong rank", torch.zeros(4, dim), CLASS_NAMES, None, ValueError, r"shape \(population"),
        (
            "wrong dim",
            torch.zeros(2, 4, dim + 1),
            CLASS_NAMES,
            None,
            ValueError,
            f"dimension {dim + 1}",
        ),
        ("empty population", torch.zeros(0, 4, dim), CLASS_NAMES, None, ValueError, "at least one"),
        ("nan", torch.full((2, 4, dim), float("nan")), CLASS_NAMES, None, ValueError, "NaN/inf"),
        ("inf", inf, CLASS_NAMES, None, ValueError, r"candidates \[1\]"),
        ("integer contexts", ok.long(), CLASS_NAMES, None, TypeError, "floating"),
        ("list contexts", [[0.0]], CLASS_NAMES, None, TypeError, "torch.Tensor"),
        ("empty classes", ok, [], None, ValueError, "class_names is empty"),
        ("blank class", ok, ["cat", " "], None, ValueError, r"class_names\[1\]"),
        ("string classes", ok, "cat", None, TypeError, "sequence of strings"),
        (
            "too long",
            torch.zeros(1, context_length, dim),
            CLASS_NAMES,
            None,
            ValueError,
            f"context length {context_length}",
        ),
        ("bad indices", ok, CLASS_NAMES, [0, 10**6], ValueError, "out of range"),
        ("empty indices", ok, CLASS_NAMES, [], ValueError, "non-empty"),
        ("float indices", ok, CLASS_NAMES, [0.5], TypeError, "integers"),
    ]


class OracleConformance:
    """The Oracle contract, as tests. Needs fixtures ``oracle`` and ``image_set``."""

    def test_is_an_oracle(self, oracle: Oracle) -> None:
        assert isinstance(oracle, Oracle)
        meta = oracle.metadata
        assert meta.token_dim > 0 and meta.context_length > 1
        assert meta.embedding_mean.shape == (meta.token_dim,) and meta.embedding_std > 0

    def test_shapes_and_exact_counts(self, oracle: Oracle, image_set: ImageSetRef) -> None:
        key = _key("counts")
        out = oracle.logits(random_contexts(oracle, 4), CLASS_NAMES, image_set, budget_key=key)
        assert out.shape == (4, image_set.size, 3) and out.dtype == torch.float32
        out = oracle.logits(
            random_contexts(oracle, 5), CLASS_NAMES, image_set, indices=[0, 2, 2], budget_key=key
        )
        assert out.shape == (5, 3, 3)
        usage = oracle.ledger.usage(key)
        assert (usage.queries, usage.images_scored, usage.prompts_encoded, usage.calls) == (
            9,
            4 * image_set.size + 5 * 3,
            9 * 3,
            2,
        )

    def test_same_inputs_same_logits(self, oracle: Oracle, image_set: ImageSetRef) -> None:
        ctx = random_contexts(oracle, 3, seed=1)
        first = oracle.logits(ctx, CLASS_NAMES, image_set)
        assert torch.equal(first, oracle.logits(ctx, CLASS_NAMES, image_set))

    def test_candidates_are_scored_independently(
        self, oracle: Oracle, image_set: ImageSetRef
    ) -> None:
        ctx = random_contexts(oracle, 3, seed=2)
        together = oracle.logits(ctx, CLASS_NAMES, image_set)
        alone = oracle.logits(ctx[2:], CLASS_NAMES, image_set)
        assert torch.allclose(together[2:], alone, atol=1e-4)
        assert not torch.allclose(together[0], together[1], atol=1e-6)

    def test_indices_select_rows(self, oracle: Oracle, image_set: ImageSetRef) -> None:
        ctx = random_contexts(oracle, 2, seed=3)
        full = oracle.logits(ctx, CLASS_NAMES, image_set)
        part = oracle.logits(ctx, CLASS_NAMES, image_set, indices=np.array([3, 1]))
        assert torch.allclose(part, full[:, [3, 1]], atol=1e-5)

    def test_budget_refuses_whole_call_before_work(
        self, oracle: Oracle, image_set: ImageSetRef
    ) -> None:
        key = _key("budget")
        oracle.ledger.set_budget(key, 10)
        oracle.logits(random_contexts(oracle, 6), CLASS_NAMES, image_set, budget_key=key)
        with pytest.raises(BudgetExceededError, match="requested 6 queries, 4 left of 10"):
            oracle.logits(random_contexts(oracle, 6), CLASS_NAMES, image_set, budget_key=key)
        assert oracle.ledger.usage(key).queries == 6
        oracle.logits(random_contexts(oracle, 4), CLASS_NAMES, image_set, budget_key=key)
        assert oracle.ledger.remaining(key) == 0

    def test_threads_on_one_budget_key_are_counted_exactly(
        self, oracle: Oracle, image_set: ImageSetRef
    ) -> None:
        key = _key("threads")
        oracle.ledger.set_budget(key, 25)
        served: list[int] = []
        refused: list[int] = []
        ctx = random_contexts(oracle, 3)

        def worker() -> None:
            for _ in range(4):
                try:
                    oracle.logits(ctx, CLASS_NAMES, image_set, budget_key=key)
                    served.append(3)
                except BudgetExceededError:
                    refused.append(3)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(served) == oracle.ledger.usage(key).queries == 24  # 8 calls of 3 fit in 25
        assert len(refused) == 16 - 8

    def test_bad_input_is_refused_before_any_query(
        self, oracle: Oracle, image_set: ImageSetRef
    ) -> None:
        meta = oracle.metadata
        for label, contexts, names, indices, error, match in _bad_inputs(
            meta.token_dim, meta.context_length
        ):
            key = _key("bad")
            with pytest.raises(error, match=match):
                oracle.logits(contexts, names, image_set, indices=indices, budget_key=key)  # type: ignore[arg-type]
            usage = oracle.ledger.usage(key)
            assert usage.queries == 0 and usage.calls == 0, label

    def test_unknown_image_set_is_refused(self, oracle: Oracle) -> None:
        key = _key("unknown-set")
        with pytest.raises(KeyError, match=r"unknown image set 'deadbeef'.*register_images"):
            oracle.logits(random_contexts(oracle, 1), CLASS_NAMES, "deadbeef", budget_key=key)
        assert oracle.ledger.usage(key).queries == 0

    def test_phrase_embeddings(self, oracle: Oracle) -> None:
        emb = oracle.phrase_embeddings("a photo of a")
        assert emb.ndim == 2 and emb.shape[1] == oracle.metadata.token_dim
        assert emb.shape[0] >= 4
        with pytest.raises(ValueError, match="no tokens"):
            oracle.phrase_embeddings("")
