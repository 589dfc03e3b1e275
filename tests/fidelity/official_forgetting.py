"""The official Black-Box Forgetting settings (github.com/yusukekwn/Black-Box-Forgetting).

Read from the repository at commit 9b447a0: ``scripts/run_<dataset>.sh`` (lines ~11-25),
the README's commands (~L60-79: ``lcs 25 4`` / ``bbt 10 1`` / ``ind 10 4`` on CIFAR-10,
``lcs 500 16`` / ``bbt 125 1`` / ``ind 125 16`` elsewhere), ``main.py``, ``train.py``,
``utils.py``, ``src/customclip.py`` and ``requirements.txt``; pycma's CSA constants from
``CMA-ES/pycma`` at tags r3.3.0 and r4.4.0. Lines without ``~`` are exact at 9b447a0.
"""

from __future__ import annotations

SHARED = {
    "backend": ("open_clip:ViT-B-16", "train.py ~L38: CLIP ViT-B/16"),
    "pretrained": ("openai", "train.py ~L38: OpenAI CLIP weights"),
    "precision": ("fp16", "clip/model.py ~L437: build_model converts the weights to fp16"),
    "popsize": (20, "scripts/run_*.sh: popsize 20"),
    "sigma": (1.0, "main.py ~L23: sigma0 = 1"),
    "sep_cma": (False, "main.py ~L152-163: no CMA_diagonal option, full covariance"),
    "batch_size": (160, "main.py ~L226-243: batch_size 160"),
    "fitness": ("full", "train.py ~L186-224: every batch of the k-shot set, mean of the losses"),
    "batch_order": (
        "shuffled",
        "main.py L113: DataLoader(train_data, batch_size, shuffle=True), re-iterated for every "
        "candidate (train.py L186, called per candidate at main.py L194-198): a new permutation "
        "each; train.py L224: the unweighted mean of the batch losses",
    ),
    "loss_precision": (
        "fp16",
        "utils.py L34-39: log(outputs + 1e-7) of train.py L194's softmax of the fp16 logits "
        "(src/customclip.py L165-176); train.py L217: CE on the fp16 logits; L221 the sum in fp16",
    ),
    "context_rounding": (
        "fp16",
        "train.py L73: p0 = vocab_mean.type(float16); L154/L160: linear(z).type(float16); "
        "L164-165: (Az + p0).type(float16)",
    ),
    "csa": (
        "pycma3",
        "requirements.txt L1: unpinned cma, code of 2024-10 (before pycma 4.5): CSA cs and "
        "damps of pycma r4.4.0 cma/sigma_adaptation.py L170-180 (r3.3.0 L170-176)",
    ),
    "baseline_dim": (None, "README: bbt/ind per-token size = (ds + m du) / m (10 or 125)"),
    "forget": (None, "main.py ~L43-109: the first 40 % of label indices"),
    "forget_fraction": (0.4, "main.py ~L43-109: the first 40 % of label indices"),
}

# dataset file stem: n_ctx, ds, du, iterations, shots (scripts/run_<dataset>.sh ~L11-25).
SCRIPTS = {
    "cifar10": ("run_cifar10.sh", 4, 20, 5, 400, 16),
    "cifar100": ("run_cifar100.sh", 16, 400, 100, 800, 4),
    "cub": ("run_cub.sh", 16, 400, 100, 800, 1),
    "imagenet30": ("run_imagenet30.sh", 16, 400, 100, 400, 16),
    "imagenet": ("run_imagenet.sh", 16, 400, 100, 800, 1),
}


def expected(dataset: str) -> dict[str, tuple[object, str]]:
    """Every official value of one dataset's paper config, with its source."""
    script, n_ctx, ds, du, iterations, shots = SCRIPTS[dataset]
    source = f"scripts/{script}"
    return SHARED | {
        "n_context": (n_ctx, f"{source}: n_ctx"),
        "shared_dim": (ds, f"{source}: dim_slc"),
        "unique_dim": (du, f"{source}: dim_ulc"),
        "iterations": (iterations, f"{source}: iteration (maxiter)"),
        "shots": (shots, f"{source}: kshot"),
        "max_queries": (iterations * 20, f"{source}: iteration x popsize candidate evaluations"),
    }
