"""The official CraFT hyperparameters (github.com/mrflogs/CraFT), one row per paper config.

Read from the repository at commit 1a4c251: ``craft_configs/<file>.yaml`` (identical
to ``carrot_configs/``) and the scripts that read them, ``main_craft.py`` (ten
datasets) and ``main_craft_imagenet.py``. Every value names where it comes from.
"""

from __future__ import annotations

# Shared by every config file: backbone RN50, intrinsic_dim 512, popsize 40, lr 1e-3,
# four context tokens from "a photo of a" (main_craft.py ~L57-71), head hidden 256
# (main_craft.py ~L185-189; 512 in main_craft_imagenet.py ~L192-194).
SHARED = {
    "backend": ("open_clip:RN50", "craft_configs/*.yaml: backbone 'RN50'"),
    "pretrained": ("openai", "main_craft.py ~L251: clip.load (OpenAI weights)"),
    "latent_dim": (512, "craft_configs/*.yaml: intrinsic_dim 512"),
    "popsize": (40, "craft_configs/*.yaml: popsize 40"),
    "lr": (1e-3, "craft_configs/*.yaml: lr 0.001 (Adam, main_craft.py ~L191)"),
    "prompt": ("a photo of a {}.", "main_craft.py ~L58-71, L90-92"),
    "head_data": ("views", "main_craft.py ~L210-223: head on augmented images, one prompt"),
    "views": (None, "main_craft.py ~L210: a fresh augmented pass every generation"),
    "fitness_images": ("augmented", "main_craft.py ~L184 + L21-26: one fixed augmented view"),
    # The model's precision: clip.load on CUDA keeps build_model's fp16 weights; the
    # text transformer alone is cast back to fp32 (its parameters are the model's).
    "precision": (
        "fp16",
        "main_craft.py L251 clip.load -> clip/clip.py L134-136: build_model(..).to(cuda), "
        ".float() only on cpu; clip/model.py L371-392, L430: convert_weights",
    ),
    "text_precision": (
        "fp32",
        "main_craft.py L101 (main_craft_imagenet.py L103): TextEncoder(clip_model).float()",
    ),
    # No validation split: built, handed to PromptLearner, never read.
    "val_shots": (
        0,
        "main_craft.py L276, L169/L184, L53-55: val_loader never read; the result is the "
        "last step's accuracy (L225-234); main_craft_imagenet.py L281: val_loader = the test set",
    ),
    # Crops of the photo itself: the transform runs on read_image's PIL original.
    "augment_source": (
        "original",
        "datasets/utils.py L322-333: img0 = read_image(impath), then the transform; "
        "ImageNet: ImageFolder's PIL images, datasets/imagenet.py L209-216",
    ),
}

# file: sigma, bound (0 = none), n (consistency cutoff), batch_size, std (A init), weight.
CONFIG_FILES = {
    "caltech101": ("caltech101.yaml", 1.0, 5.0, 4, 256, 0.2, 0.1),
    "dtd": ("dtd.yaml", 0.02, 5.0, 1, 256, 1.0, 0.001),
    "eurosat": ("eurosat.yaml", 0.02, 5.0, 1, 256, 1.0, 0.01),
    "fgvc-aircraft": ("fgvc.yaml", 0.02, None, 4, 256, 0.2, 0.1),
    "food101": ("food101.yaml", 1.0, None, 1, 256, 0.2, 1.0),
    "imagenet": ("imagenet.yaml", 1.0, None, 1, 256, 1.0, 0.0),
    "flowers102": ("oxford_flowers.yaml", 1.0, 5.0, 4, 256, 0.2, 0.1),
    "oxford-pets": ("oxford_pets.yaml", 0.02, 5.0, 1, 64, 0.2, 0.1),
    "stanford-cars": ("stanford_cars.yaml", 1.0, 5.0, 4, 256, 0.2, 0.1),
    "sun397": ("sun397.yaml", 1.0, 5.0, 4, 256, 0.2, 0.1),
    "ucf101": ("ucf101.yaml", 1.0, 5.0, 4, 256, 0.2, 0.1),
}

# Budgets by shots: main() overrides the yaml's budget (main_craft.py ~L256-262);
# the ImageNet script gives 2,000 to 1 shot and 4,000 above (main_craft_imagenet.py ~L261-268).
BUDGETS = {1: 2000, 2: 4000, 4: 4000, 8: 8000, 16: 8000}
IMAGENET_BUDGETS = {1: 2000, 2: 4000, 4: 4000, 8: 4000, 16: 4000}
SEEDS = [1, 2, 3]  # main_craft.py ~L265; ImageNet: [1] (main_craft_imagenet.py ~L269)

# The ImageNet script's own choices (main_craft_imagenet.py).
IMAGENET = {
    "hidden": (512, "~L192-194: head MLP C -> 512 -> C"),
    "head_prompt": ("xbest", "~L164-165: es.result.xbest"),
    "augment_scale": ((0.08, 1.0), "datasets/imagenet.py ~L209-214: RandomResizedCrop(0.08, 1)"),
    "refine_batch": (256, "~L282: batch size hard-coded 256"),
    "projection_init": (
        "uniform",
        "L88: nn.Linear(512, n_ctx * dim, bias=False) keeps torch's init (no normal_, "
        "cfg std unread)",
    ),
}
TEN_DATASETS = {
    "hidden": (256, "main_craft.py ~L185-189"),
    "head_prompt": ("sample_mean", "main_craft.py ~L157-160: mean of a fresh es.ask()"),
    "augment_scale": ((0.5, 1.0), "main_craft.py ~L21-26: RandomResizedCrop(scale=(0.5, 1))"),
    "projection_init": ("normal", "main_craft.py L83-86: nn.init.normal_(p, 0, cfg['std'])"),
}


def expected(dataset: str) -> dict[str, tuple[object, str]]:
    """Every official value of one dataset's paper config, with its source."""
    file, sigma, bound, n, batch, std, weight = CONFIG_FILES[dataset]
    source = f"craft_configs/{file}"
    rows = dict(SHARED)
    rows |= IMAGENET if dataset == "imagenet" else TEN_DATASETS
    rows |= {
        "sigma": (sigma, f"{source}: sigma"),
        "bounds": (bound, f"{source}: bound ({bound or 0}; 0 = no bounds, main_craft.py ~L178)"),
        "consistency_cutoff": (n, f"{source}: n"),
        "consistency_weight": (weight, f"{source}: weight"),
        "budget": (
            IMAGENET_BUDGETS if dataset == "imagenet" else BUDGETS,
            "main_craft_imagenet.py ~L261-268"
            if dataset == "imagenet"
            else "main_craft.py ~L256-262",
        ),
        "seeds": ([1] if dataset == "imagenet" else SEEDS, "main_craft*.py seeds loop"),
    }
    if dataset != "imagenet":
        rows["refine_batch"] = (batch, f"{source}: batch_size")
        rows["projection_std"] = (std, f"{source}: std (A ~ N(0, std), main_craft.py ~L85-86)")
    return rows
