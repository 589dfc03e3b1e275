"""White-box access to a backend, for methods that train the model itself.

Black-box methods see an :class:`~vlmlab.oracle.Oracle` (logits only). Model
Developmental Safety trains the model, so it needs its parts. A
:class:`FineTunableModel` wraps an in-process backend (open_clip or the ConSE
stand-in) as a dual encoder whose text side trains:

- the **image tower is frozen**: its features come from the backend's
  feature cache, computed once per image set (so an epoch costs a matrix
  product, not an image-tower pass; fine-tuning the image tower is left out);
- the **text tower** (CLIP's text transformer, or ConSE's MiniLM) is a
  private copy that may train;
- the **text projection** ``W`` (CLIP's ``text_projection``; an identity for
  ConSE, whose text and image features share MiniLM's space) may train;
- **per-class low-rank heads** on the projection: class ``c``'s embedding is
  ``pooled_c (W + A_c B_c)``, with ``B_c = 0`` at the start, so a fresh model
  reproduces the backend's zero-shot classifier exactly.

What trains is one setting (:data:`TRAINABLE`), from the target classes'
heads alone up to the whole text side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.data import ImageDataset
from vlmlab.oracle import LocalOracle

Trainable = Literal["target_heads", "heads", "projection", "all"]
TRAINABLE: tuple[str, ...] = ("target_heads", "heads", "projection", "all")
"""``target_heads``: only the target classes' heads; ``heads``: every class's
head; ``projection``: heads and the shared projection; ``all``: those and the
text tower."""


class FineTunableModel(nn.Module):
    """A backend's classifier over ``class_names`` with a trainable text side.

    Args:
        oracle: an in-process backend (``create_oracle("conse")`` or an open_clip
            one); its image features and feature cache are reused, its own
            weights are never modified.
        class_names: the classes, in label order.
        rank: rank of each class's head ``A_c B_c``.
        prompt: the class prompt template.
        seed: draws the heads' ``A`` (``B`` starts at zero).
    """

    def __init__(
        self,
        oracle: LocalOracle,
        class_names: Sequence[str],
        *,
        rank: int = 32,
        prompt: str = "a photo of a {}.",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if "{}" not in prompt:
            raise ValueError(f"prompt must contain '{{}}' for the class name, got {prompt!r}")
        self.oracle = oracle
        self.class_names = list(class_names)
        self.prompts = [prompt.format(name) for name in self.class_names]
        text = oracle.text_tower()
        self.tower, projection = text.tower, text.projection
        self.projection = nn.Parameter(projection)
        width, dim = projection.shape
        generator = torch.Generator().manual_seed(seed)
        n_classes = len(self.class_names)
        self.head_a = nn.Parameter(
            torch.randn(n_classes, width, rank, generator=generator) / width**0.5
        )
        self.head_b = nn.Parameter(torch.zeros(n_classes, rank, dim))
        self.logit_scale = float(oracle.logit_scale)
        self.logit_bias = float(oracle.logit_bias)
        self.device = torch.device(oracle.device)
        self.to(self.device)
        self._trainable: Trainable = "all"
        self._pooled_cache: torch.Tensor | None = None
        self._head_mask: torch.Tensor | None = None

    # ------------------------------------------------------------- training
    def set_trainable(self, trainable: Trainable, target: Sequence[int] = ()) -> list[nn.Parameter]:
        """Freeze everything but ``trainable``'s parts; return the parameters that train."""
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        self._trainable = trainable
        self.requires_grad_(False)
        params: list[nn.Parameter] = [self.head_a, self.head_b]
        mask = torch.ones(len(self.class_names), 1, 1, device=self.device)
        if trainable == "target_heads":
            if not target:
                raise ValueError("trainable='target_heads' needs the target classes")
            mask.zero_()
            mask[list(target)] = 1.0
        self._head_mask = mask
        if trainable in ("projection", "all"):
            params.append(self.projection)
        if trainable == "all":
            params += list(self.tower.parameters())
        for param in params:
            param.requires_grad_(True)
        self._pooled_cache = None
        return params

    def tower_parameters(self) -> list[nn.Parameter]:
        return list(self.tower.parameters())

    # ------------------------------------------------------------ inference
    def _pooled(self) -> torch.Tensor:
        if self._trainable == "all" and torch.is_grad_enabled():
            pooled: torch.Tensor = self.tower(self.prompts)
            return pooled
        if self._pooled_cache is None or self._trainable == "all":
            # A frozen tower gives the same pooled text every step: compute it once.
            with torch.no_grad():
                self._pooled_cache = self.tower(self.prompts).float()
        return self._pooled_cache

    def class_embeddings(self) -> torch.Tensor:
        """Unit-norm class embeddings ``C x E`` (differentiable in what trains)."""
        pooled = self._pooled()
        head_b = self.head_b if self._head_mask is None else self.head_b * self._head_mask
        text = pooled @ self.projection + torch.einsum(
            "cw,cwr,cre->ce", pooled, self.head_a, head_b
        )
        return F.normalize(text, dim=-1)

    def logits(
        self, image_features: torch.Tensor, class_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled cosine similarities ``N x C`` of unit-norm image features."""
        text = self.class_embeddings() if class_embeddings is None else class_embeddings
        return image_features @ text.T * self.logit_scale + self.logit_bias

    def image_features(self, images: ImageDataset) -> torch.Tensor:
        """Frozen image-tower features of ``images`` (cached by the backend), on this device."""
        ref = self.oracle.register_images(images.image_set())
        return self.oracle.image_features(ref).to(self.device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors that can differ from the backend: heads, projection, tower if it trains."""
        state = {
            "projection": self.projection.detach().cpu().clone(),
            "head_a": self.head_a.detach().cpu().clone(),
            "head_b": (
                self.head_b * self._head_mask if self._head_mask is not None else self.head_b
            )
            .detach()
            .cpu()
            .clone(),
        }
        if self._trainable == "all":
            state.update(
                {f"tower.{k}": v.detach().cpu().clone() for k, v in self.tower.state_dict().items()}
            )
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.projection.copy_(state["projection"])
            self.head_a.copy_(state["head_a"])
            self.head_b.copy_(state["head_b"])
            tower = {
                k.removeprefix("tower."): v for k, v in state.items() if k.startswith("tower.")
            }
            if tower:
                self.tower.load_state_dict(tower)
        self._pooled_cache = None
