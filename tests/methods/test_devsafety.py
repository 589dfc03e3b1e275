"""Model Developmental Safety: the fine-tunable model and the three methods on ConSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmlab.data import stratified_subset
from vlmlab.methods import FineTunableModel
from vlmlab.methods.devsafety import (
    DevSafety,
    DevSafetyConfig,
    make_devsafety_data,
    per_class_accuracy,
)

NAMES = ["T-shirt", "trousers", "bag"]


def test_conse_model_starts_as_the_zero_shot_classifier(conse):
    model = FineTunableModel(conse, NAMES)
    expected = conse.encode_texts([f"a photo of a {name}." for name in NAMES])
    assert torch.allclose(model.class_embeddings(), expected, atol=1e-5)


def test_open_clip_model_starts_as_encode_text(vit_b32):
    model = FineTunableModel(vit_b32, NAMES)
    tokens = vit_b32.tokenizer([f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        expected = F.normalize(vit_b32.model.encode_text(tokens), dim=-1)
    assert torch.allclose(model.class_embeddings(), expected, atol=1e-5)


def test_open_clip_text_tower_trains_and_the_backend_does_not_change(vit_b32):
    model = FineTunableModel(vit_b32, NAMES)
    params = model.set_trainable("all")
    before = vit_b32.model.ln_final.weight.detach().clone()
    optimizer = torch.optim.SGD(params, lr=0.1)
    model.class_embeddings()[:, 0].sum().backward()
    assert model.tower.ln_final.weight.grad is not None
    optimizer.step()
    assert not torch.equal(model.tower.ln_final.weight, before)
    assert torch.equal(vit_b32.model.ln_final.weight, before)  # a private copy trained


def test_target_heads_move_only_the_target_embedding(conse):
    model = FineTunableModel(conse, NAMES, rank=4)
    before = model.class_embeddings().detach().clone()
    optimizer = torch.optim.SGD(model.set_trainable("target_heads", [1]), lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        (model.class_embeddings() @ torch.ones(before.shape[1])).sum().backward()
        optimizer.step()
    after = model.class_embeddings().detach()
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert not torch.allclose(after[1], before[1])


def test_bad_settings_are_named(conse):
    with pytest.raises(ValueError, match="prompt must contain"):
        FineTunableModel(conse, NAMES, prompt="a photo")
    with pytest.raises(ValueError, match="trainable must be one of"):
        FineTunableModel(conse, NAMES).set_trainable("everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant must be one of"):
        DevSafetyConfig(variant="greedy")  # type: ignore[arg-type]


def test_per_class_accuracy_marks_absent_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    accuracy = per_class_accuracy(logits, torch.tensor([0, 1, 1]), 3)
    assert accuracy[:2].tolist() == [1.0, 0.5] and accuracy[2].isnan()


# The quickstart's recipe, scaled down: 60 training and 20 validation images a
# class, 500 test images, w_old = the projection fitted to the protected classes;
# everything else is the official default.
SMALL = {"trainable": "target_heads", "base_epochs": 25, "beta": 1000.0, "epochs": 30}


@pytest.fixture(scope="module")
def fmnist_task(conse, fashion_train, fashion_test):
    test = fashion_test.subset(stratified_subset(fashion_test.labels, 500, seed=0))

    def build(seed: int):
        model = FineTunableModel(conse, fashion_train.class_names, seed=seed)
        task = make_devsafety_data(
            model, fashion_train, test, per_class=60, val_per_class=20, seed=seed
        )
        return model, task

    return build


@pytest.fixture(scope="module")
def three_methods(fmnist_task):
    results = {}
    for mode in ("constrained", "finetune", "weighted"):
        model, task = fmnist_task(1)
        method = DevSafety(model, task, DevSafetyConfig(variant=mode, **SMALL), seed=1)
        while not method.done:
            method.step()
        results[mode] = method
    return results


@pytest.mark.slow
def test_weakest_class_is_the_target_and_the_rest_protected(three_methods):
    method = three_methods["constrained"]
    assert method.task.target == (0,)  # T-shirt: 0 % zero-shot on the validation images
    assert method.task.protected == tuple(range(1, 10))
    # w_old never saw the target: its protected classes are strong, the target is not.
    assert float(method.old_accuracy["test"][0]) < 0.1
    assert float(method.old_accuracy["test"][1:].mean()) > 0.6


@pytest.mark.slow
def test_constrained_improves_the_target_and_keeps_the_protected(three_methods):
    # Measured with the official defaults (contrastive objective, mean_k max(beta u, 0)
    # L_k tau, constraints at 1/tau, paired w_old losses), 500 test images:
    # constrained gains +0.60 / +0.38 / +0.44 (seeds 1-3) with DevSafety 0.00 / -0.02 /
    # -0.02 (one test image a class is 0.02); finetune +1.00 / -0.86; weighted +0.36 / 0.00.
    constrained = three_methods["constrained"].evaluate("test")
    finetune = three_methods["finetune"].evaluate("test")
    weighted = three_methods["weighted"].evaluate("test")
    assert constrained["target_gain"] >= 0.3
    assert constrained["devsafety"] >= -0.02
    assert finetune["target_gain"] >= 0.9 and finetune["devsafety"] <= -0.5
    assert weighted["target_gain"] < constrained["target_gain"] - 0.1
    # The constraints hold on the control set up to the penalty's small slack.
    assert float(three_methods["constrained"].constraint_values().max()) < 0.05
    assert float(three_methods["finetune"].constraint_values().max()) > 0.5


@pytest.mark.slow
def test_resume_is_bit_for_bit(fmnist_task):
    config = DevSafetyConfig(**{**SMALL, "epochs": 6})
    model, task = fmnist_task(1)
    straight = DevSafety(model, task, config, seed=1)
    for _ in range(6):
        straight.step()
    model, task = fmnist_task(1)
    first = DevSafety(model, task, config, seed=1)
    for _ in range(3):
        first.step()
    state = first.state_dict()
    model, task = fmnist_task(1)
    resumed = DevSafety(model, task, config, seed=1)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step()
    assert torch.equal(resumed.model.class_embeddings(), straight.model.class_embeddings())
    assert torch.equal(resumed.estimates, straight.estimates)


@pytest.mark.slow
def test_target_outside_the_classes_is_refused(conse, fashion_train, fashion_test):
    model = FineTunableModel(conse, fashion_train.class_names)
    small = fashion_test.subset(stratified_subset(fashion_test.labels, 500, seed=0))
    with pytest.raises(
        ValueError, match=r"data\.target: class index 12 out of range for 10 classes"
    ):
        make_devsafety_data(
            model, fashion_train, small, per_class=60, val_per_class=20, seed=1, target=[12]
        )
    with pytest.raises(ValueError, match=r"data\.target: 'jacket' is not a class of this dataset"):
        make_devsafety_data(
            model, fashion_train, small, per_class=60, val_per_class=20, seed=1, target=["jacket"]
        )
    by_name = make_devsafety_data(
        model, fashion_train, small, per_class=60, val_per_class=20, seed=1, target=["bag"]
    )
    assert by_name.target == (8,) and 8 not in by_name.protected


@pytest.mark.slow
def test_open_clip_runs_with_its_text_tower_training(vit_b32, fashion_train, fashion_test):
    """The paper's configuration (``trainable: all``) end to end on a random-init CLIP."""
    test = fashion_test.subset(stratified_subset(fashion_test.labels, 60, seed=0))
    model = FineTunableModel(vit_b32, fashion_train.class_names, rank=4, seed=1)
    task = make_devsafety_data(
        model, fashion_train, test, per_class=4, val_per_class=2, seed=1, target=["bag"]
    )
    tower_before = model.tower.ln_final.weight.detach().clone()
    config = DevSafetyConfig(trainable="all", epochs=2, batch_size=16, lr=1e-3, tower_lr=1e-3)
    method = DevSafety(model, task, config, seed=1)
    while not method.done:
        record = method.step()
    # The contrastive objective may go below zero (as the official loss does).
    assert np.isfinite(record.metrics["train"]["target_loss"])
    # 2 epochs x 3 steps (40 images / 16) of 16 target-batch rows + 9 classes x 10 control rows
    assert method.images_seen == 2 * 3 * (16 + 9 * 10)
    assert not torch.equal(model.tower.ln_final.weight, tower_before)
    state = method.state_dict()["model"]
    assert "tower.ln_final.weight" in state and state["head_b"].abs().sum() > 0
    metrics = method.evaluate("test")
    assert set(metrics) == {
        "target_acc",
        "target_gain",
        "devsafety",
        "protected_acc",
        "acc",
        "safe_gain",
    }


# ------------------------------------------------- the official protocol, pinned
@pytest.fixture(scope="module")
def tiny_task(conse, fashion_train, fashion_test):
    test = fashion_test.subset(stratified_subset(fashion_test.labels, 50, seed=0))

    def build(**config):
        model = FineTunableModel(conse, fashion_train.class_names, rank=2, seed=1)
        task = make_devsafety_data(
            model, fashion_train, test, per_class=6, val_per_class=2, seed=1, target=["bag"]
        )
        defaults = {"epochs": 3, "batch_size": 8, "steps_per_epoch": 1, "control_per_class": 3}
        return DevSafety(model, task, DevSafetyConfig(**{**defaults, **config}), seed=1)

    return build


def test_official_penalty_is_zero_until_violated_then_beta_u_tau(tiny_task):
    method = tiny_task(beta=100.0, tau=0.05)
    method.estimates = torch.linspace(-0.4, 0.4, len(method.task.protected))
    weights = method.penalty_weights()
    u = method.estimates
    assert torch.equal(weights[u <= 0], torch.zeros(int((u <= 0).sum())))
    assert torch.allclose(weights[u > 0], 100.0 * u[u > 0] * 0.05)
    smoothed = tiny_task(beta=100.0, tau=0.05, penalty="smoothed")
    smoothed.estimates = torch.zeros(len(smoothed.task.protected))
    # The smoothed hinge pushes back before a violation: beta tau softplus(0) sigmoid(0) > 0.
    assert torch.allclose(
        smoothed.penalty_weights(), torch.full_like(smoothed.estimates, 1.733), atol=1e-3
    )


def test_constraints_pair_each_sample_with_its_w_old_loss_and_start_at_the_first_value(tiny_task):
    method = tiny_task()
    method.step()  # the first step scores w_old itself: every paired difference is exactly 0
    assert bool(method.estimated.all())  # every protected class is in each control batch
    assert torch.equal(method.estimates, torch.zeros_like(method.estimates))
    shifted = tiny_task()
    shifted.old_sample_losses = shifted.old_sample_losses - 1.0
    shifted.step()  # first value used as it is (a moving average from 0 would give 0.8)
    assert torch.allclose(shifted.estimates, torch.ones_like(shifted.estimates))


def test_control_batches_are_class_balanced_and_never_hold_the_target(tiny_task):
    method = tiny_task(control_classes=3, control_per_class=2)
    labels = method.task.train_labels
    for _ in range(5):
        rows = method._control_rows()
        counts = torch.bincount(labels[rows], minlength=10)
        assert len(rows) == 6 and sorted(counts[counts > 0].tolist()) == [2, 2, 2]
        assert counts[8] == 0  # bag is the target


def test_contrastive_objective_trains_the_target_head(tiny_task):
    method = tiny_task(objective="contrastive", trainable="target_heads", lr=0.05, epochs=4)
    before = method.model.class_embeddings().detach().clone()
    while not method.done:
        record = method.step()
    after = method.model.class_embeddings().detach()
    moved = (after - before).norm(dim=-1)
    assert moved[8] > 0 and torch.equal(moved[:8], torch.zeros(8))
    assert bool((method.image_averages[method._positives] > 0).any())
    assert np.isfinite(record.metrics["train"]["target_loss"])
