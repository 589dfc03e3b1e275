"""CoOp, the white-box reference: gradients through the oracle's own encoder, no queries."""

from __future__ import annotations

import pytest
import torch

from vlmlab.data import partition_classes, stratified_subset
from vlmlab.methods.coop import CoOpClassifier, CoOpConfig, CoOpForgetting
from vlmlab.methods.craft import make_craft_data
from vlmlab.methods.forgetting import make_forgetting_data

NAMES = ["T-shirt", "trousers", "ankle boot"]


def _gradient_check(oracle) -> None:
    contexts = oracle.phrase_embeddings("a photo of a")[None].clone().requires_grad_(True)
    # A scoring call first (in inference mode, as logits calls are): what it caches for
    # these names (open_clip's suffix plan) must serve the differentiable call after it.
    scored = oracle.class_embeddings(contexts.detach(), NAMES)
    embeddings = oracle.differentiable_class_embeddings(contexts, NAMES)
    assert torch.allclose(embeddings.detach(), scored)
    embeddings[0, 1].sum().backward()
    assert contexts.grad is not None and float(contexts.grad.abs().sum()) > 0
    # The model's own weights are never trained by it.
    model = getattr(oracle, "model", None) or getattr(oracle, "bert", None)
    if model is not None:
        assert all(p.grad is None for p in model.parameters())


def test_gradients_reach_the_contexts_through_the_oracles_own_encoder():
    from vlmlab.oracle import create_oracle

    _gradient_check(create_oracle("latency:0"))


def test_gradients_through_an_open_clip_text_tower(vit_b32):
    _gradient_check(vit_b32)


@pytest.mark.slow
def test_gradients_through_the_conse_text_tower(conse):
    _gradient_check(conse)


@pytest.fixture(scope="module")
def forgetting(fashion_train):
    from vlmlab.oracle import create_oracle

    oracle = create_oracle("latency:0")
    test = fashion_train.subset(stratified_subset(fashion_train.labels, 30, seed=5))
    data = make_forgetting_data(
        oracle, fashion_train, test, shots=4, seed=1, partition=partition_classes(10, forget=[0, 1])
    )
    return oracle, data


def _coop(forgetting, **overrides):
    oracle, data = forgetting
    config = CoOpConfig(**{"epochs": 6, "batch_size": 8, "lr": 0.05, **overrides})
    return CoOpForgetting(oracle, data, config, seed=2, eval_key="coop:eval")


def test_coop_counts_no_query_and_learns(forgetting):
    oracle, _ = forgetting
    coop = _coop(forgetting)
    records = coop.run()
    assert coop.generations == 6 and coop.done
    assert coop.queries_used == 0 and all(r.queries_used == 0 for r in records)
    assert oracle.ledger.usage("train").queries == 0  # the budget key is never charged
    assert records[-1].metrics["train"]["loss"] < records[0].metrics["train"]["loss"]
    # The result is the best epoch on validation, scored there as the oracle scores it.
    assert coop.evaluate("val")["H"] == pytest.approx(coop.best_val["H"])
    assert 1 <= coop.best_generation <= 6
    zero_shot = coop.reference("test", "a photo of a")
    own = {name for name in zero_shot if not name.startswith("dropclasses:")}
    assert own == set(coop.evaluate("test"))  # the same metrics as BBF's rows
    assert zero_shot["dropclasses:err_fgt"] == 1.0  # and the zero-query bound beside them


def test_coop_resumes_bit_for_bit(forgetting):
    whole = _coop(forgetting)
    whole.run()
    first = _coop(forgetting)
    for _ in range(3):
        first.step()
    second = _coop(forgetting)
    second.load_state_bytes(first.state_bytes())
    second.run()
    assert torch.equal(second.best_contexts, whole.best_contexts)
    assert torch.equal(second.learner.contexts, whole.learner.contexts)
    assert second.best_val == whole.best_val
    with pytest.raises(ValueError, match="another config or seed"):
        _coop(forgetting, lr=0.01).load_state_bytes(first.state_bytes())


def test_coop_refuses_an_oracle_without_gradients(forgetting):
    _, data = forgetting

    class LogitsOnly:  # what the pool and the HTTP oracle are: logits, no encoder
        pass

    with pytest.raises(TypeError, match="white-box"):
        CoOpForgetting(LogitsOnly(), data, CoOpConfig(), seed=0)  # type: ignore[arg-type]


def test_bad_coop_configs(forgetting):
    with pytest.raises(ValueError, match="epochs"):
        CoOpConfig(epochs=0)
    with pytest.raises(ValueError, match="init"):
        CoOpConfig(init="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_context is 2"):
        _coop(forgetting, n_context=2)


def test_coop_is_a_white_box_variant_of_the_prompt_tasks():
    from vlmlab.specs import RunSpec

    spec = RunSpec.model_validate(
        {
            "name": "mixed",
            "task": "forgetting",
            "backend": {"name": "latency:0"},
            "data": {"dataset": "fashion-mnist", "shots": 2, "forget": [0]},
            "method": {"name": "bbf", "popsize": 4, "iterations": 3},
            "variants": [{"name": "bbf"}, {"name": "coop", "coop": {"epochs": 7}}],
            "budget": {"max_queries": 8},
        }
    )
    assert spec.problems() == [] and not spec.white_box  # the bbf variant needs the pool
    bbf, coop = spec.expand_trials()
    assert not bbf.white_box and coop.white_box
    assert coop.generations == 7 and bbf.generations == 2
    task = spec.task_entry
    assert task.queries_per_generation(coop.method) == 0
    assert task.method_label("coop") == "coop (white-box)" and task.method_label("bbf") == "bbf"
    only = spec.model_copy(update={"variants": [{"name": "coop"}]})
    assert only.white_box


@pytest.mark.slow
def test_coop_beats_zero_shot_on_the_stand_in(conse, fashion_train, fashion_test):
    """ConSE, 16 shots, CraFT's task: CoOp's prompt is far better than the hand-written one."""
    test = fashion_test.subset(stratified_subset(fashion_test.labels, 50, seed=3))
    data = make_craft_data(conse, fashion_train, test, shots=16, seed=1)
    coop = CoOpClassifier(conse, data, CoOpConfig(epochs=50), seed=1, eval_key="coop-conse:eval")
    coop.run()
    learned = coop.evaluate("test")["acc"]
    zero_shot = coop.reference("test", "a photo of a")["acc"]
    assert coop.queries_used == 0
    assert learned > zero_shot + 0.1, (learned, zero_shot)


def test_a_budget_study_refuses_a_white_box_variant():
    from vlmlab.specs import RunSpec

    spec = RunSpec.model_validate(
        {
            "name": "study",
            "task": "safe_forgetting",
            "backend": {"name": "latency:0"},
            "data": {"dataset": "fashion-mnist", "shots": 2, "forget": [0]},
            "method": {"name": "safe_bbf", "popsize": 4, "iterations": 3},
            "variants": [{"name": "safe_bbf"}, {"name": "coop"}],
            "study": {"budgets": [8, 12]},
        }
    )
    assert any("coop spend no oracle queries" in p for p in spec.problems())
    alone = spec.model_copy(update={"variants": [{"name": "safe_bbf"}, {"name": "bbf"}]})
    assert alone.problems() == []
