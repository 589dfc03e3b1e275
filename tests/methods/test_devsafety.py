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
from vlmlab.specs import SpecError, preflight, validate_spec

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
    with pytest.raises(ValueError, match="name\n  Input should be"):
        DevSafetyConfig(name="greedy")  # type: ignore[arg-type]


def test_per_class_accuracy_marks_absent_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    accuracy = per_class_accuracy(logits, torch.tensor([0, 1, 1]), 3)
    assert accuracy[:2].tolist() == [1.0, 0.5] and accuracy[2].isnan()


# vlmlab's CPU recipe (what the quickstarts pin; the defaults are the official GPU
# scripts' values): the settings every measured number below was taken with.
CPU = {
    "epochs": 60,
    "lr": 1e-3,
    "tower_lr": 1e-5,
    "weight_decay": 0.0,
    "warmup_steps": None,
    "warmup": 0.1,
    "beta": 300.0,
    "negative_head": False,
    "weight": 1.0,
    "weight_reduction": "sum",
}
# The quickstart's recipe, scaled down: 60 training and 20 validation images a
# class, 500 test images, w_old = the projection fitted to the protected classes;
# the objective, penalty and constraints are the official ones.
SMALL = {**CPU, "trainable": "target_heads", "base_epochs": 25, "beta": 1000.0, "epochs": 30}


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
        method = DevSafety(model, task, DevSafetyConfig(name=mode, **SMALL), seed=1)
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
    model = FineTunableModel(vit_b32, fashion_train.class_names, rank=4, seed=1, negative_head=True)
    task = make_devsafety_data(
        model, fashion_train, test, per_class=4, val_per_class=2, seed=1, target=["bag"]
    )
    tower_before = model.tower.ln_final.weight.detach().clone()
    config = DevSafetyConfig(
        trainable="all", epochs=2, batch_size=16, lr=1e-3, tower_lr=1e-3, warmup_steps=None
    )
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
        small = {"epochs": 3, "batch_size": 8, "steps_per_epoch": 1, "control_per_class": 3}
        settings = DevSafetyConfig(**{**CPU, **small, **config})
        model = FineTunableModel(
            conse,
            fashion_train.class_names,
            rank=2,
            seed=1,
            negative_head=settings.negative_head,
        )
        task = make_devsafety_data(
            model,
            fashion_train,
            test,
            per_class=6,
            val_per_class=2,
            seed=1,
            target=["bag"],
            views=settings.augment_views,
            view_scale=settings.augment_scale,
            view_rotation=settings.augment_rotation,
            view_flip=settings.augment_flip,
        )
        return DevSafety(model, task, settings, seed=1)

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


# ------------------------------------------- control set sizes (official --control-size)
def _short_classes(fashion_train):
    """Fashion-MNIST with a short target (bag: 7 images) and a short protected class
    (T-shirt: 6); 12 images of every other class."""
    counts = {0: 6, 8: 7}
    rows = np.concatenate(
        [np.flatnonzero(fashion_train.labels == c)[: counts.get(c, 12)] for c in range(10)]
    )
    return fashion_train.subset(rows)


def test_control_cap_takes_every_target_image_and_caps_each_protected_class(
    conse, fashion_train, fashion_test
):
    train = _short_classes(fashion_train)
    test = fashion_test.subset(stratified_subset(fashion_test.labels, 20, seed=0))
    model = FineTunableModel(conse, train.class_names, rank=2)

    def data(seed, control_seed=None):
        return make_devsafety_data(
            model,
            train,
            test,
            per_class=None,
            val_per_class=5,
            seed=seed,
            target=["bag"],
            control_cap=8,
            control_seed=control_seed,
        )

    task = data(1)
    train_counts = torch.bincount(task.train_labels, minlength=10).tolist()
    val_counts = torch.bincount(task.val_labels, minlength=10).tolist()
    # validation first, at most a fifth of a class: bag 1 of 7, T-shirt 1 of 6, others 2
    assert val_counts == [1, 2, 2, 2, 2, 2, 2, 2, 1, 2]
    # every remaining bag (6, fewer than the cap: no error), T-shirt all of its 5 left,
    # every other protected class capped at 8 of its 10
    assert train_counts == [5, 8, 8, 8, 8, 8, 8, 8, 6, 8]
    # one split for every seed with control_seed (official 2024); each seed's own without
    fixed = [data(seed, control_seed=2024) for seed in (1, 2)]
    assert torch.equal(fixed[0].train_features, fixed[1].train_features)
    assert torch.equal(fixed[0].val_features, fixed[1].val_features)
    assert not torch.equal(task.train_features, data(2).train_features)
    with pytest.raises(
        ValueError, match=r"give per_class \(images of every class\) or control_cap"
    ):
        make_devsafety_data(model, train, test, per_class=4, val_per_class=2, seed=1, control_cap=5)


def _dev_tree(**data):
    return {
        "name": "dev",
        "task": "devsafety",
        "data": {"dataset": "fashion-mnist", **data},
        "method": {"epochs": 1},
    }


def test_control_cap_spec_checks():
    spec = validate_spec(_dev_tree(control_cap=1000, control_seed=2024), "test")
    assert (spec.data.control_cap, spec.data.control_seed) == (1000, 2024)
    assert "constrained (control_cap 1000): 1 epochs, white-box" in preflight(spec).plan
    with pytest.raises(SpecError, match=r"data\.control_seed: draws the control_cap split"):
        validate_spec(_dev_tree(control_seed=2024), "test")
    with pytest.raises(SpecError, match=r"data\.shots: data\.control_cap sets the training"):
        validate_spec(_dev_tree(control_cap=10, shots=[1, 2]), "test")
    with pytest.raises(SpecError, match=r"data\.control_cap: got 0"):
        validate_spec(_dev_tree(control_cap=0), "test")


# ------------------------------------------------------------ the negative head
def test_negative_head_is_one_more_head_and_leaves_the_classifier(conse):
    plain = FineTunableModel(conse, NAMES, rank=4, seed=3)
    with_negative = FineTunableModel(conse, NAMES, rank=4, seed=3, negative_head=True)
    assert with_negative.head_a.shape[0] == len(NAMES) + 1
    assert torch.equal(with_negative.head_a[: len(NAMES)], plain.head_a)  # drawn last
    assert torch.equal(with_negative.class_embeddings(), plain.class_embeddings())
    # B = 0: the negative captions start as the class prompts
    assert torch.allclose(with_negative.negative_embeddings(), plain.class_embeddings())
    with pytest.raises(ValueError, match="no negative head"):
        plain.negative_embeddings()
    with pytest.raises(ValueError, match=r"\(negative_head=True\); restore with the settings"):
        with_negative.load_trainable_state(plain.trainable_state())


@pytest.mark.parametrize("variant", ["finetune", "constrained"])
def test_protected_heads_learn_only_from_the_constraints(tiny_task, variant):
    # The objective alone (finetune, or constrained with beta 0) never reaches a protected
    # head: negatives' captions go through the negative head (official cls_ids = -1).
    method = tiny_task(
        name=variant, trainable="heads", negative_head=True, beta=0.0, lr=0.05, epochs=2
    )
    while not method.done:
        method.step()
    head_b = method.model.head_b.detach()
    protected = list(method.task.protected)
    assert torch.equal(head_b[protected], torch.zeros_like(head_b[protected]))
    assert head_b[8].abs().sum() > 0  # the target (bag)
    assert head_b[-1].abs().sum() > 0  # the negative head
    # vlmlab's earlier reading: the negatives' own heads take the objective's gradient
    old = tiny_task(name=variant, trainable="heads", negative_head=False, beta=0.0, lr=0.05)
    old.step()
    assert old.model.head_b.detach()[protected].abs().sum() > 0


def test_constrained_protected_heads_move_through_the_penalty(tiny_task):
    method = tiny_task(trainable="heads", negative_head=True, lr=0.05, augment_views=2)
    method.step()
    method.step()  # the first step's penalty weights are the first estimates' (positive here)
    head_b = method.model.head_b.detach()
    assert head_b[list(method.task.protected)].abs().sum() > 0


# --------------------------------------------------------- augmented batches
def test_augmented_batches_start_with_nonzero_constraints_against_clean_w_old(tiny_task):
    method = tiny_task(augment_views=2)
    task = method.task
    assert task.train_views is not None
    assert task.train_views.shape == (2, *task.train_features.shape)
    assert not torch.equal(task.train_views[0], task.train_features)
    # w_old's per-sample losses are the clean images' (official: the eval preprocessing)
    clean = F.cross_entropy(
        task.train_features @ method.model.class_embeddings().T / 0.05,
        task.train_labels,
        reduction="none",
    )
    assert torch.allclose(method.old_sample_losses, clean)
    method.step()  # w = w_old, but the control batch is augmented: every change is nonzero
    assert bool(method.estimated.all()) and bool((method.estimates != 0).all())


def test_augmented_run_resumes_bit_for_bit(tiny_task):
    settings = {"augment_views": 2, "trainable": "heads", "negative_head": True, "epochs": 4}
    straight = tiny_task(**settings)
    while not straight.done:
        straight.step()
    first = tiny_task(**settings)
    first.step()
    state = first.state_dict()
    resumed = tiny_task(**settings)
    resumed.load_state_dict(state)
    while not resumed.done:
        resumed.step()
    assert torch.equal(resumed.model.head_b, straight.model.head_b)
    assert torch.equal(resumed.estimates, straight.estimates)


# ----------------------------------------------------------- weighted baseline
@pytest.mark.parametrize(
    ("settings", "factor"),
    [
        ({}, 100.0 * 0.05),  # official SogCLR_RM: F + beta tau mean_k L_k
        ({"weight": 2.0}, 2.0),
        ({"weight": 1.0, "weight_reduction": "sum"}, None),  # vlmlab's earlier reading
    ],
)
def test_weighted_baseline_is_the_objective_plus_weighted_protected_losses(
    tiny_task, monkeypatch, settings, factor
):
    method = tiny_task(
        name="weighted",
        beta=100.0,
        tau=0.05,
        **{"weight": None, "weight_reduction": "mean", **settings},
    )
    seen: dict[str, torch.Tensor] = {}
    objective, control_rows = method._objective, method._control_rows

    def spy_objective(*args):
        seen["objective"] = objective(*args)
        return seen["objective"]

    def spy_control():
        seen["control"] = control_rows()
        return seen["control"]

    backward = torch.Tensor.backward

    def spy_backward(loss, *args, **kwargs):
        with torch.no_grad():  # before the step: the model that scored the batch
            rows = seen["control"]
            labels = method.task.train_labels[rows]
            text = method.model.class_embeddings()
            losses = F.cross_entropy(
                method.task.train_features[rows] @ text.T / 0.05, labels, reduction="none"
            )
            per_class = torch.stack([losses[labels == k].mean() for k in labels.unique()])
            protected = per_class.sum() if factor is None else factor * per_class.mean()
            seen["expected"] = seen["objective"].detach() + protected
            seen["loss"] = loss.detach().clone()
        return backward(loss, *args, **kwargs)

    monkeypatch.setattr(method, "_objective", spy_objective)
    monkeypatch.setattr(method, "_control_rows", spy_control)
    monkeypatch.setattr(torch.Tensor, "backward", spy_backward)
    method.step()
    assert torch.allclose(seen["loss"], seen["expected"], rtol=1e-5)
    assert DevSafetyConfig(beta=100.0, tau=0.05).protected_weight == pytest.approx(5.0)


# ------------------------------------------------- the image tower trains (full)
@pytest.fixture(scope="module")
def tiny_clip(clip_factory):
    """A random-init open_clip ViT small enough to train on CPU in a test."""
    return clip_factory("vlmlab-tiny-fmnist")


def _full_run(tiny_clip, fashion_train, test):
    model = FineTunableModel(
        tiny_clip, fashion_train.class_names, rank=2, seed=1, negative_head=True
    )
    task = make_devsafety_data(
        model, fashion_train, test, per_class=4, val_per_class=2, seed=1, target=["bag"]
    )
    config = DevSafetyConfig(
        trainable="full",
        epochs=2,
        batch_size=8,
        steps_per_epoch=2,
        control_per_class=2,
        lr=1e-3,
        warmup_steps=None,
        augment_views=1,  # with the tower training: a fresh augmentation every step
    )
    return DevSafety(model, task, config, seed=1)


def test_full_trains_the_image_tower_and_the_backend_does_not_change(
    tiny_clip, fashion_train, fashion_test
):
    test = fashion_test.subset(stratified_subset(fashion_test.labels, 20, seed=0))
    backend = {k: v.clone() for k, v in tiny_clip.model.visual.state_dict().items()}
    method = _full_run(tiny_clip, fashion_train, test)
    model, task = method.model, method.task
    assert model.visual is not None and task.train_views is None  # no cached views
    # The private copy starts as the backend's tower: it encodes the cached features.
    assert torch.allclose(model.image_features(task.test_images), task.test_features, atol=1e-5)
    start = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    while not method.done:
        method.step()
    moved = [k for k, v in model.visual.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) > len(start) // 2  # the image tower trained
    assert all(torch.equal(v, backend[k]) for k, v in tiny_clip.model.visual.state_dict().items())
    # Evaluation scores the images with the tower as it is now.
    assert not torch.allclose(model.image_features(task.test_images), task.test_features)
    assert set(method.evaluate("test")) >= {"target_acc", "devsafety"}
    state = method.state_dict()["model"]
    assert {f"visual.{k}" for k in start} <= set(state)
    # Resume: one epoch, the state, a fresh run continues to the very same tower.
    first = _full_run(tiny_clip, fashion_train, test)
    first.step()
    resumed = _full_run(tiny_clip, fashion_train, test)
    resumed.load_state_dict(first.state_dict())
    resumed.step()
    assert resumed.model.visual is not None
    for k, v in resumed.model.visual.state_dict().items():
        assert torch.equal(v, model.visual.state_dict()[k]), k
    assert torch.equal(resumed.estimates, method.estimates)


def test_full_needs_open_clip_and_is_not_served_with_the_backends_tower(conse):
    from vlmlab.results import Artifact
    from vlmlab.tasks import get_task

    tree = {**_dev_tree(), "method": {"trainable": "full"}}
    with pytest.raises(SpecError, match=r"method\.trainable: full trains the image tower"):
        validate_spec(tree, "test")
    with pytest.raises(NotImplementedError, match="no fine-tunable image tower"):
        FineTunableModel(conse, NAMES).set_trainable("full")
    artifact = Artifact("run", {"class_embeddings": torch.eye(3)}, {"trainable": "full"})
    with pytest.raises(ValueError, match="trained its image tower"):
        get_task("devsafety").classifier(artifact, conse)
