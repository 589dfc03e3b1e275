"""Black-Box Forgetting's loss and metrics: the objective CMA-ES minimizes and what a run reports.

The loss follows the official fp16 numerics by default (``precision="fp16"``), the
exact float64 one on request; CoOp's forgetting variant differentiates the latter.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

LossPrecision = Literal["fp16", "fp64"]
FP16_EPS = 1e-7
"""The official forget loss's epsilon, ``log(p + 1e-7)`` (``utils.py`` L34-39); in fp16 it
becomes 2**-23 (1.19e-7), so a class term costs at most ``-log(2**-23)`` = 15.94 nats."""


def forgetting_metrics(
    predictions: np.ndarray, labels: np.ndarray, forget_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Err_fgt, Acc_mem and H for each row of ``predictions`` (``P x N``)."""
    predictions = np.atleast_2d(predictions)
    correct = predictions == labels[None, :]
    forget, memorize = forget_mask, ~forget_mask
    err_fgt = 1.0 - correct[:, forget].mean(axis=1) if forget.any() else np.ones(len(predictions))
    acc_mem = correct[:, memorize].mean(axis=1) if memorize.any() else np.ones(len(predictions))
    denom = err_fgt + acc_mem
    harmonic = np.where(denom > 0, 2 * err_fgt * acc_mem / np.where(denom > 0, denom, 1), 0.0)
    return {"err_fgt": err_fgt, "acc_mem": acc_mem, "H": harmonic}


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Accuracy of each row of ``predictions`` (``P x N``) on each class: ``P x C``
    (NaN for a class with no sample)."""
    predictions = np.atleast_2d(predictions)
    correct = (predictions == labels[None, :]).astype(np.float64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    hits = np.stack([np.bincount(labels, weights=row, minlength=n_classes) for row in correct])
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / counts[None, :]


def forgetting_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    forget_mask: torch.Tensor,
    *,
    precision: LossPrecision = "fp64",
) -> torch.Tensor:
    """Per-candidate loss ``CE(memorize) + mean over forget samples of -(1/C) sum_c log p_c``.

    ``logits`` is ``P x N x C``; returns ``P`` losses (float64). ``precision="fp64"``: exact,
    in float64 (differentiable, as CoOp uses it); ``"fp16"``: the official code's fp16
    numerics (:func:`_forgetting_loss_fp16`).
    """
    if precision == "fp16":
        return _forgetting_loss_fp16(logits, labels, forget_mask)
    if precision != "fp64":
        raise ValueError(f"precision must be 'fp16' or 'fp64', got {precision!r}")
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    loss = torch.zeros(logits.shape[0], dtype=torch.float64)
    memorize = ~forget_mask
    if memorize.any():
        picked = log_probs[:, memorize].gather(
            -1, labels[memorize].view(1, -1, 1).expand(logits.shape[0], -1, 1)
        )
        loss = loss - picked.squeeze(-1).mean(dim=1)
    if forget_mask.any():
        loss = loss - log_probs[:, forget_mask].mean(dim=(1, 2))
    return loss


def _half(values: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and carry on in fp32, as CUDA's half ops compute in fp32 and round once."""
    return values.half().float()


def _forgetting_loss_fp16(
    logits: torch.Tensor, labels: torch.Tensor, forget_mask: torch.Tensor
) -> torch.Tensor:
    """The official loss of one batch with its fp16 roundings (``P`` losses, float64).

    ``train.py`` L194 ``soft_out = softmax(outputs)`` on fp16 logits; L217
    ``ce_loss(outputs[mem], labels[mem])``; L220 ``crossentropyloss_max(soft_out[fgt], 1/C)``,
    which is ``utils.py`` L31-43: ``-sum(sum(t * log(p + 1e-7), 1)) / len``; L221 the sum,
    in fp16. Every elementwise result and every reduction's output is rounded to fp16, the
    arithmetic in between in fp32. Measured against the official chain run on CUDA (an
    H200, torch 2.11; fp16 logits of 10 to 1,000 classes, 1,500 batches): equal bit for
    bit. The official CE of a batch without kept images is NaN; here it is left out
    (only the ``sorted`` order makes such batches).
    """
    z = _half(logits.float())
    n_candidates, _, n_classes = z.shape
    loss = torch.zeros(n_candidates, dtype=torch.float32)
    memorize = ~forget_mask
    if memorize.any():
        log_probs = _half(torch.log_softmax(z[:, memorize], dim=-1))
        index = labels[memorize].view(1, -1, 1).expand(n_candidates, -1, 1)
        loss = _half(-log_probs.gather(-1, index).squeeze(-1).mean(dim=1))
    if forget_mask.any():
        probs = _half(torch.softmax(z[:, forget_mask], dim=-1))
        terms = _half((1.0 / n_classes) * _half(torch.log(_half(probs + FP16_EPS))))
        per_image = _half(terms.sum(dim=-1))
        forget_term = _half(_half(per_image.sum(dim=1)) / int(forget_mask.sum()))
        loss = _half(loss - forget_term)
    return loss.double()
