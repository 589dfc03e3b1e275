"""The official Model Developmental Safety settings (github.com/GangLii/DevSafety).

Read from the repository at commit 5a2bfa2: ``train_foggy.sh``, ``train_tunnel.sh``,
``train_dressing_room.sh``, ``src/args.py`` (defaults, ~L104-159),
``src/train_eval/loss.py`` (``SogCLR_Penalty``, ~L79-230), ``src/train_eval/train.py``
and ``src/templates/``.
"""

from __future__ import annotations

SHARED = {
    "backend": ("open_clip:ViT-B-16", "train_*.sh: --model=ViT-B/16 (OpenAI CLIP, fp32)"),
    "pretrained": ("openai", "src/modeling.py ~L20-22: clip.load('ViT-B/16')"),
    "epochs": (40, "train_*.sh: --epochs=40"),
    "lr": (1e-6, "train_*.sh: --lr=1e-6 (one AdamW group for every parameter)"),
    "tower_lr": (1e-6, "train.py ~L143: the same lr for the whole model"),
    "weight_decay": (0.1, "train_*.sh: --wd=0.1"),
    "warmup_steps": (500, "src/args.py: --warmup default 500 (utils.py cosine_lr)"),
    "rank": (32, "train_*.sh: --lora-dim=32"),
    "trainable": ("all", "train.py ~L131-143: every parameter trains"),
    "gamma": (0.8, "train_*.sh: --gamma2=0.8 (u's moving average)"),
    "objective": ("contrastive", "train_*.sh: --loss=sog_pnl (SogCLR_Penalty)"),
    "contrastive_t": (0.05, "train_*.sh: --t=0.05"),
    "contrastive_gamma": (0.8, "loss.py ~L101: gamma1 = 0.8 (hard-coded)"),
    "penalty": ("official", "loss.py ~L222-230: mean_k max(beta u_k, 0).detach() L_k tau"),
    "constraint_logits": ("tau", "loss.py ~L201: logits = (1/tau) img @ txt.T"),
    "base_epochs": (0, "w_old is the starting checkpoint (no development of our own)"),
}

SETTINGS = {
    "bdd100k-weather": {
        "prompt": ("the weather is {}.", "src/templates/: weather"),
        "target": (["foggy"], "train_foggy.sh: target foggy"),
        "beta": (100.0, "train_foggy.sh: --beta=100"),
        "tau": (0.05, "train_foggy.sh: --tau=0.05"),
        "batch_size": (256, "train_foggy.sh: --batch-size=256 (128 target + 128 negatives)"),
        "control_classes": (5, "train_foggy.sh: --ct-num-cls-per-batch=5"),
        "control_per_class": (10, "train_foggy.sh: --ct-batch-size=50 over 5 classes"),
        "steps_per_epoch": (600, "train_foggy.sh: --batchs-per-epoch=600"),
        "shots": (1000, "train_foggy.sh: --control-size=1000"),
    },
    "bdd100k-scene": {
        "prompt": ("the scene is a {}.", "src/templates/: scene"),
        "target": (["tunnel"], "train_tunnel.sh: target tunnel"),
        "beta": (100.0, "train_tunnel.sh: --beta=100"),
        "tau": (0.05, "train_tunnel.sh: --tau=0.05"),
        "batch_size": (256, "train_tunnel.sh: --batch-size=256"),
        "control_classes": (4, "train_tunnel.sh: --ct-num-cls-per-batch=4"),
        "control_per_class": (10, "train_tunnel.sh: --ct-batch-size=40 over 4 classes"),
        "steps_per_epoch": (600, "train_tunnel.sh: --batchs-per-epoch=600"),
        "shots": (1000, "train_tunnel.sh: --control-size=1000"),
        "class_names": (
            {"residential": "residential area"},
            "src/datasets/bdd100k_classnames.py: 'residential area'",
        ),
    },
    "places365": {
        "prompt": ("the scene is a(n) {}.", "src/templates/: places365"),
        "target": (["dressing room"], "train_dressing_room.sh: class 126, dressing room"),
        "beta": (1000.0, "train_dressing_room.sh: --beta=1000"),
        "tau": (0.01, "train_dressing_room.sh: --tau=0.01"),
        "batch_size": (64, "train_dressing_room.sh: --batch-size=64 (32 + 32)"),
        "control_classes": (240, "train_dressing_room.sh: --ct-num-cls-per-batch=240"),
        "control_per_class": (2, "train_dressing_room.sh: --ct-batch-size=480 over 240 classes"),
        "steps_per_epoch": (1600, "train_dressing_room.sh: --batchs-per-epoch=1600"),
        "shots": (2000, "train_dressing_room.sh: --control-size=2000"),
    },
}


def expected(setting: str) -> dict[str, tuple[object, str]]:
    """Every official value of one paper setting, with its source."""
    return SHARED | SETTINGS[setting]
