"""CraFT's settings: :class:`CraftConfig`, the paper's defaults and the official scripts' options.

Apart from the loop (:mod:`vlmlab.methods.craft`) so the settings read as one page.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field

from vlmlab.methods._config import CropArea, MethodConfig
from vlmlab.methods._coop_config import CoOpSettings

Variant = Literal["craft", "prompt_only", "refine_only", "no_consistency"]
VARIANTS: tuple[str, ...] = get_args(Variant)
AugmentSource = Literal["original", "stored"]


class CraftConfig(MethodConfig):
    """CraFT and its ablations (Wang et al. 2024 and the official craft_configs; defaults
    are the paper's), and CoOp, the white-box reference (``coop``: its ``coop:``
    settings; m = the prompt's words). The budget and the initial prompt's words are
    the trial's (``Craft(budget=..., init_phrase=...)``), not settings."""

    name: Literal[Variant, "coop"] = "craft"
    latent_dim: int = Field(512, ge=1)
    projection_std: float = Field(0.2, gt=0)
    projection_init: Literal["normal", "uniform"] = "normal"
    """normal: A ~ N(0, projection_std) (main_craft.py); uniform: torch's default Linear
    init, U(+-1/sqrt(latent_dim)) (main_craft_imagenet.py, which ignores std)."""
    popsize: int = Field(40, ge=2)
    sigma: float = Field(1.0, gt=0)
    bounds: float | None = Field(5.0, gt=0)
    hidden: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    consistency_weight: float = Field(0.1, ge=0)
    consistency_cutoff: int = Field(1, ge=1)
    """n: the refinement loss's consistency term stays on while queries used <= budget / n
    (the fitness keeps its term throughout)."""
    refine_batch: int = Field(256, ge=1)
    head_data: Literal["views", "prompts"] = "views"
    """views (official): the head learns from one prompt's logits on augmented images;
    prompts (vlmlab's earlier reading): from every prompt's logits on the plain images."""
    head_prompt: Literal["sample_mean", "xbest", "mean"] = "sample_mean"
    """views: the head's and the result's prompt: the mean of a fresh ask() sample
    (main_craft.py), the best candidate so far (the ImageNet script) or the ES mean."""
    views: int | None = Field(None, ge=1)
    """Augmented views registered (once each) and cycled; None: a new one every
    generation, as the official code (the most images to encode)."""
    augment_scale: CropArea = (0.5, 1.0)
    """RandomResizedCrop's area range (the ImageNet script uses 0.08-1)."""
    augment_source: AugmentSource = "original"
    """What the crops cut: the full-resolution originals (official: the transform reads
    the photo), where the dataset keeps them (torchvision's CoOp sets, imagefolder); or
    the stored 224 px centre squares (``vlmlab.data.augmented_view``). Sets held in memory
    at their own size (Fashion-MNIST, CIFAR) have no other originals: both crop their
    stored pixels."""
    fitness_images: Literal["augmented", "plain"] = "augmented"
    """Candidates are scored on one fixed augmented view (official) or on the plain images."""
    coop: CoOpSettings = Field(default_factory=CoOpSettings)
    """``name: coop``'s settings (CoOp, the white-box reference)."""

    @property
    def queries_per_generation(self) -> int:
        """Budget queries a generation: P (views) or P + 1 (prompts: the ES mean too)."""
        return self.popsize + (1 if self.head_data == "prompts" else 0)

    def generations(self, budget: int) -> int:
        """``budget // queries_per_generation``: the official maxiter = budget // popsize."""
        return budget // self.queries_per_generation

    def record(self) -> dict[str, Any]:
        """What a checkpoint compares on resume: CraFT's settings (not CoOp's)."""
        return self.model_dump(exclude={"coop"})
