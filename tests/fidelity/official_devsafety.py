"""The official Model Developmental Safety settings (github.com/GangLii/DevSafety).

Read from the repository at commit 5a2bfa2: ``train_foggy.sh``, ``train_tunnel.sh``,
``train_dressing_room.sh``, ``src/args.py`` (defaults, L104-159),
``src/train_eval/loss.py`` (``SogCLR_Penalty`` L79-230, ``SogCLR_RM`` L392-534),
``src/train_eval/train.py``, ``src/main.py``, ``clip/clip.py``, ``clip/model.py``,
``src/datasets/`` and ``src/templates/``. The repository also ships
``train_overcast.sh`` (task ``weather_enhance``: target overcast, ``--control-size=2000``,
``--ct-batch-size=40`` over 4 classes); vlmlab has no config for that setting.
"""

from __future__ import annotations

SHARED = {
    "backend": (
        "open_clip:ViT-B-16",
        "train_*.sh: --model=ViT-B/16, the OpenAI CLIP branch of src/train_eval/modeling.py "
        "L20-22 (the 'ViT-B-16' branch at L16 would load open_clip laion400m)",
    ),
    "pretrained": (
        "openai",
        "src/train_eval/modeling.py L21-22: clip.load(args.model, args.device, jit=False)",
    ),
    "precision": ("fp32", "clip/model.py L465-466: p.data = p.data.float()"),
    "epochs": (40, "train_*.sh: --epochs=40"),
    "lr": (1e-6, "train_*.sh: --lr=1e-6 (one AdamW group for every parameter)"),
    "tower_lr": (None, "src/train_eval/train.py L140-143: one AdamW group, the same lr"),
    "weight_decay": (0.1, "train_*.sh: --wd=0.1"),
    "warmup_steps": (
        500,
        "src/args.py L149-153: --warmup_length default 500 (train.py L145-146, utils.py "
        "cosine_lr L19-33)",
    ),
    "rank": (32, "train_*.sh: --lora-dim=32"),
    "trainable": (
        "full",
        "src/train_eval/train.py L140-143: every parameter trains, the image tower included",
    ),
    "negative_head": (
        True,
        "src/main.py L54-56 (the last head re-initialised: 'negative head'); "
        "src/train_eval/train.py L176-180: cls_ids = (index('NA')+1)*label - 1",
    ),
    "augment_scale": ((0.7, 1.0), "clip/clip.py L71: RandomResizedCrop(n_px, scale=(0.7, 1.0))"),
    "augment_rotation": (15.0, "clip/clip.py L72: RandomRotation(degrees=(-15, 15))"),
    "augment_flip": (True, "clip/clip.py L73: RandomHorizontalFlip()"),
    "gamma": (
        0.8,
        "src/args.py L107: --gamma2 default 0.8 (train_tunnel.sh and train_dressing_room.sh "
        "pass --gamma2=0.8; train_foggy.sh and train_overcast.sh --gamma=0.8, an argparse "
        "abbreviation of it)",
    ),
    "objective": ("contrastive", "train_*.sh: --loss=sog_pnl (SogCLR_Penalty)"),
    "contrastive_t": (0.05, "train_*.sh: --t=0.05"),
    "contrastive_gamma": (0.8, "src/train_eval/loss.py L101: gamma1 = 0.8 (hard-coded)"),
    "penalty": (
        "official",
        "src/train_eval/loss.py L227-230: mean_k max(beta u_k, 0).detach() L_k tau",
    ),
    "constraint_logits": ("tau", "src/train_eval/loss.py L201: logits = (1/tau) img @ txt.T"),
    "weight": (
        None,
        "src/train_eval/loss.py L534 (SogCLR_RM, --loss=sog_rm): F + beta * mean_k L_k * tau",
    ),
    "weight_reduction": (
        "mean",
        "src/train_eval/loss.py L520-522 (per-class means of the classes present), L534: mean_by_cls.mean()",
    ),
    "base_epochs": (0, "w_old is the starting checkpoint (no development of our own)"),
}

SETTINGS = {
    "bdd100k-weather": {
        "prompt": ("the weather is {}.", "src/templates/bdd100k_weather_template.py L1-3"),
        "target": (
            ["foggy"],
            "no flag names it (--target-class=1 is the positive pseudo-label, src/args.py "
            "L98-102): 'NA' takes foggy's slot in src/datasets/bdd100k_classnames.py L17-19 "
            "(weather_classnames L1-3), with --task=weather and the foggy --train-data CSV",
        ),
        "beta": (100.0, "train_foggy.sh: --beta=100"),
        "tau": (0.05, "train_foggy.sh: --tau=0.05"),
        "batch_size": (
            256,
            "train_foggy.sh: --batch-size=256; src/datasets/laion.py L593-594: "
            "DataSampler(pos_num=batch_size//2), 128 target + 128 negatives",
        ),
        "control_classes": (5, "train_foggy.sh: --ct-num-cls-per-batch=5"),
        "control_per_class": (
            10,
            "train_foggy.sh: --ct-batch-size=50; src/datasets/common.py L33-34: num_pos = "
            "batch_size // num_cls",
        ),
        "steps_per_epoch": (600, "train_foggy.sh: --batchs-per-epoch=600"),
        "control_cap": (
            1000,
            "train_foggy.sh: --control-size=1000; src/datasets/bdd100k.py L96-103: "
            "min(control_size, available) of each control class, the target ('NA') none",
        ),
        "control_seed": (2024, "src/datasets/bdd100k.py L96: np.random.seed(2024)"),
    },
    "bdd100k-scene": {
        "prompt": ("the scene is a {}.", "src/templates/bdd100k_scene_template.py L1-3"),
        "target": (
            ["tunnel"],
            "no flag names it: 'NA' takes tunnel's slot in src/datasets/bdd100k_classnames.py "
            "L29-31 (scene_classnames L13-15), with --task=scene and the tunnel --train-data CSV",
        ),
        "beta": (100.0, "train_tunnel.sh: --beta=100"),
        "tau": (0.05, "train_tunnel.sh: --tau=0.05"),
        "batch_size": (
            256,
            "train_tunnel.sh: --batch-size=256; src/datasets/laion.py L593-594 (half target)",
        ),
        "control_classes": (4, "train_tunnel.sh: --ct-num-cls-per-batch=4"),
        "control_per_class": (
            10,
            "train_tunnel.sh: --ct-batch-size=40; src/datasets/common.py L33-34",
        ),
        "steps_per_epoch": (600, "train_tunnel.sh: --batchs-per-epoch=600"),
        "control_cap": (
            1000,
            "train_tunnel.sh: --control-size=1000; src/datasets/bdd100k.py L96-103",
        ),
        "control_seed": (2024, "src/datasets/bdd100k.py L96: np.random.seed(2024)"),
        "class_names": (
            {"residential": "residential area"},
            "src/datasets/bdd100k_classnames.py L13-15: 'residential area'",
        ),
    },
    "places365": {
        "prompt": ("the scene is a(n) {}.", "src/templates/places365_template.py L1-3"),
        "target": (
            ["dressing room"],
            "no flag names it: 'NA' at src/datasets/places365_classnames.py L128 takes "
            "'dressing room' (L33, class 126), with --task=places365 and the dressing-room CSV",
        ),
        "beta": (1000.0, "train_dressing_room.sh: --beta=1000"),
        "tau": (0.01, "train_dressing_room.sh: --tau=0.01"),
        "batch_size": (
            64,
            "train_dressing_room.sh: --batch-size=64; src/datasets/laion.py L593-594 (32 + 32)",
        ),
        "control_classes": (240, "train_dressing_room.sh: --ct-num-cls-per-batch=240"),
        "control_per_class": (
            2,
            "train_dressing_room.sh: --ct-batch-size=480; src/datasets/common.py L33-34",
        ),
        "steps_per_epoch": (1600, "train_dressing_room.sh: --batchs-per-epoch=1600"),
        "control_cap": (
            2000,
            "train_dressing_room.sh: --control-size=2000; src/datasets/places365.py L90-97: min(control_size, available)",
        ),
        "control_seed": (2024, "src/datasets/places365.py L90: np.random.seed(2024)"),
    },
}


def expected(setting: str) -> dict[str, tuple[object, str]]:
    """Every official value of one paper setting, with its source."""
    return SHARED | SETTINGS[setting]
