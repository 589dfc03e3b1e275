"""Safe forgetting: constraints from the same call, safe selection, DevSafety, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmlab.data import partition_classes, stratified_subset
from vlmlab.methods.forgetting import BlackBoxForgetting, ForgettingConfig, make_forgetting_data
from vlmlab.methods.safe_forgetting import SafeBlackBoxForgetting, SafeForgettingConfig

SMALL = {"n_context": 4, "shared_dim": 3, "unique_dim": 2, "popsize": 4, "iterations": 6}


@pytest.fixture(scope="module")
def setting(fashion_train):
    from vlmlab.oracle import create_oracle

    oracle = create_oracle("latency:0")
    test = fashion_train.subset(stratified_subset(fashion_train.labels, 40, seed=5))
    data = make_forgetting_data(
        oracle, fashion_train, test, shots=3, seed=1, partition=partition_classes(10, forget=[0, 1])
    )
    return oracle, data


def _safe(setting, key, **overrides):
    oracle, data = setting
    config = SafeForgettingConfig(**{**SMALL, **overrides})
    return SafeBlackBoxForgetting(
        oracle, data, config, seed=3, max_queries=24, budget_key=key, eval_key=f"{key}:eval"
    )


@pytest.mark.parametrize("constraint", ["al", "penalty"])
def test_the_constraints_cost_no_query(setting, constraint):
    oracle, data = setting
    plain = BlackBoxForgetting(
        oracle,
        data,
        ForgettingConfig(**SMALL),
        seed=3,
        max_queries=24,
        budget_key=f"plain-{constraint}",
    )
    safe = _safe(setting, f"safe-{constraint}", constraint=constraint)
    plain.run()
    records = safe.run()
    assert safe.queries_used == plain.queries_used == 24  # 6 generations of 4
    assert oracle.ledger.usage(f"safe-{constraint}").queries == 24
    assert {"feasible", "worst_violation"} <= set(records[-1].metrics["train"])


def test_search_starts_at_the_reference_prompt(setting):
    oracle, _ = setting
    safe = _safe(setting, "start")
    reference = oracle.phrase_embeddings("a photo of a").numpy()
    # BBF's official fp16 contexts: the centre is the reference prompt rounded to fp16 ...
    rounded = torch.from_numpy(reference).half().float()
    assert torch.equal(safe.search.mean_contexts()[0], rounded)
    # ... and the reference itself with fp32 contexts.
    exact = _safe(setting, "start-fp32", context_rounding="none")
    assert np.allclose(exact.search.mean_contexts()[0].numpy(), reference, atol=1e-6)
    # Before any search, the result is the reference itself (feasible by definition).
    assert safe.best_generation == 0 and torch.equal(
        safe.best_contexts[0], torch.from_numpy(reference)
    )
    with pytest.raises(ValueError, match="n_context is 2"):
        _safe(setting, "start-bad", n_context=2)


def _as_logits(predictions: np.ndarray) -> torch.Tensor:
    """Logits ``P x N x 10`` whose argmax is ``predictions``."""
    return torch.nn.functional.one_hot(torch.from_numpy(predictions).long(), 10).float()


def test_a_violating_candidate_ranks_below_a_feasible_one(setting):
    safe = _safe(setting, "rank", constraint="penalty")
    data = safe.task
    n_train = len(data.train_index)
    labels = torch.from_numpy(data.train_labels.astype(np.int64))
    # Candidate 0 is certain of every label; candidate 1 is the same, except it is
    # unsure on one kept class's images: the same forgetting loss share, a violated constraint.
    good = torch.nn.functional.one_hot(labels, 10).float()[None] * 20
    bad = good.clone()
    kept = safe.kept[0]
    bad[0, labels == kept] = 0.0
    logits = torch.cat([good, bad])
    safe.reference_losses = np.zeros(len(safe.kept)) + 1e-3  # the reference: nearly certain
    losses = np.array([1.0, 1.0])  # equal objective: only the constraint tells them apart
    for _ in range(3):  # the moving average builds up
        fitness, metrics = safe._fitness(losses, logits, np.arange(n_train))
    assert fitness[1] > fitness[0]
    assert metrics["feasible"] == pytest.approx(0.5)
    # Selection: a candidate that loses a kept class's validation image is not eligible.
    val_labels = data.val_labels
    perfect = val_labels.copy()
    worse = val_labels.copy()
    worse[np.flatnonzero(val_labels == kept)[0]] = (kept + 1) % 10
    safe.reference_val_accuracy = np.ones(10)
    val_only = _safe(setting, "rank-val", selection_images="val")
    val_only.reference_val_accuracy = np.ones(10)
    train = np.tile(data.train_labels, (2, 1))
    rows = np.arange(n_train)
    assert val_only._eligible(np.stack([perfect, worse]), _as_logits(train), rows).tolist() == [
        True,
        False,
    ]
    # train_val: the same lost image, among more images; a lost training image counts too.
    safe.reference_train_val_accuracy = np.ones(10)
    assert safe._eligible(np.stack([perfect, worse]), _as_logits(train), rows).tolist() == [
        True,
        False,
    ]
    train_worse = train.copy()
    train_worse[1, np.flatnonzero(data.train_labels == kept)[0]] = (kept + 1) % 10
    both_perfect = np.stack([perfect, perfect])
    assert safe._eligible(both_perfect, _as_logits(train_worse), rows).tolist() == [True, False]


def test_resume_is_bit_for_bit(setting):
    whole = _safe(setting, "whole")
    whole.run()
    first = _safe(setting, "half")
    for _ in range(3):
        first.step()
    blob = first.state_bytes()
    second = _safe(setting, "half2")
    second.load_state_bytes(blob)
    second.run()
    assert torch.equal(second.best_contexts, whole.best_contexts)
    assert second.best_val == whole.best_val
    for mine, theirs in zip(second.search.strategies, whole.search.strategies, strict=True):
        assert np.array_equal(mine.mean, theirs.mean) and mine.sigma == theirs.sigma
    assert np.array_equal(second._lagrangian.lam, whole._lagrangian.lam)
    assert np.array_equal(second._lagrangian.mu, whole._lagrangian.mu)


def test_every_forgetting_run_reports_devsafety_and_per_class_accuracy(setting):
    oracle, data = setting
    plain = BlackBoxForgetting(oracle, data, ForgettingConfig(**SMALL), seed=3, budget_key="dev")
    plain.run()
    result = plain.evaluate("test")
    zero_shot = plain.reference("test", "a photo of a")
    names = data.class_names
    kept = [names[k] for k in data.partition.memorize]
    deltas = [result[f"acc:{n}"] - zero_shot[f"acc:{n}"] for n in kept]
    assert result["devsafety"] == pytest.approx(min(deltas))
    assert all(result[f"delta:{n}"] == pytest.approx(d) for n, d in zip(kept, deltas, strict=True))
    assert zero_shot["devsafety"] == 0.0 and zero_shot["safe_H"] == zero_shot["H"]
    assert not any(f"delta:{names[k]}" in result for k in data.partition.forget)
    unsafe = result["devsafety"] < -0.01
    assert result["safe_H"] == (-1 + result["devsafety"] if unsafe else result["H"])


def test_bad_configs():
    with pytest.raises(ValueError, match="fitness='full'"):
        SafeForgettingConfig(fitness="minibatch")
    assert SafeForgettingConfig(name="bbt").search_variant == "bbt"  # plain BBT, for the table
    assert SafeForgettingConfig().search_variant == "bbf"  # safe_bbf searches with LCS
    with pytest.raises(ValueError, match="name"):
        SafeForgettingConfig(name="lcs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="constraint\n  Input should be"):
        SafeForgettingConfig(constraint="barrier")  # type: ignore[arg-type]


def test_the_task_is_registered_like_any_other():
    from vlmlab.tasks import get_task

    task = get_task("safe_forgetting")
    assert task.variants == ("safe_bbf", "bbf", "bbt", "wo_lcs", "coop")
    assert task.sweep_metrics[0] == "val_safe_H"
    assert ("devsafety", "DevSafety") in task.metrics


def test_the_prompt_goes_on_the_forget_classes_only(setting):
    """prompted='forget': kept columns are the reference prompt's, forget columns the candidate's."""
    oracle, data = setting
    safe = _safe(setting, "scope")
    forget, kept = list(data.partition.forget), list(data.partition.memorize)
    candidates = safe.search.ask()
    mixed = safe._class_logits(candidates, data.pool, data.val_index, "scope:probe")
    own = oracle.logits(candidates, data.class_names, data.pool, indices=data.val_index)
    reference = oracle.logits(
        safe.reference_contexts, data.class_names, data.pool, indices=data.val_index
    )
    assert torch.allclose(mixed[:, :, forget], own[:, :, forget], atol=1e-6)
    assert torch.allclose(mixed[:, :, kept], reference.expand_as(own)[:, :, kept], atol=1e-6)
    assert oracle.ledger.usage("scope:probe").queries == len(candidates)  # P, like BBF's call
    everyone = _safe(setting, "scope-all", prompted="all")
    assert torch.allclose(
        everyone._class_logits(candidates, data.pool, data.val_index, "scope:all"), own, atol=1e-6
    )


def test_a_forget_only_artifact_classifies_as_the_run_scored(setting):
    from vlmlab.results import Artifact
    from vlmlab.tasks import get_task

    oracle, data = setting
    safe = _safe(setting, "artifact")
    safe.run()
    task = get_task("safe_forgetting")
    tensors, facts = task.artifact(safe)
    assert facts["prompted_classes"] == list(data.partition.forget)
    embeddings, head = task.classifier(Artifact(Path("."), tensors, facts), oracle)
    features = oracle.image_features(data.test)
    served = features @ embeddings.T * oracle.logit_scale + oracle.logit_bias
    scored = safe._class_logits(safe.best_contexts, data.test, None, "artifact:eval")[0]
    assert head is None and torch.allclose(served, scored, atol=1e-5)
