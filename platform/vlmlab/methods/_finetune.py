"""White-box access to a backend, for methods that train the model itself.

Black-box methods see an :class:`~vlmlab.oracle.Oracle` (logits only). Model
Developmental Safety trains the model, so it needs its parts. A
:class:`FineTunableModel` wraps an in-process backend (open_clip or the ConSE
stand-in) as a dual encoder whose text side trains:

- the **image tower is frozen** unless ``trainable="full"``: its features come
  from the backend's feature cache, computed once per image set (so an epoch
  costs a matrix product, not an image-tower pass). ``full`` trains a private
  copy of it too (open_clip only: :meth:`~vlmlab.oracle.LocalOracle.trainable_image_tower`),
  made when that setting is first chosen; images are then encoded by it
  (:meth:`FineTunableModel.encode_pixels`), never read from the cache;
- the **text tower** (CLIP's text transformer, or ConSE's MiniLM) is a
  private copy that may train;
- the **text projection** ``W`` (CLIP's ``text_projection``; an identity for
  ConSE, whose text and image features share MiniLM's space) may train;
- **per-class low-rank heads** on the projection: class ``c``'s embedding is
  ``pooled_c (W + A_c B_c)``, with ``B_c = 0`` at the start, so a fresh model
  reproduces the backend's zero-shot classifier exactly;
- with ``negative_head``, one more head (row ``-1``, the official
  ``projection_fn_A[-1]``, ``src/main.py`` L54-56): the captions of negative
  images go through it (:meth:`FineTunableModel.negative_embeddings`), never
  through a class's own head, and it never scores a class.

What trains is one setting (:data:`TRAINABLE`), from the target classes'
heads alone up to the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.data import ImageDataset
from vlmlab.oracle import LocalOracle, pixel_batches

Trainable = Literal["target_heads", "heads", "projection", "all", "full"]
TRAINABLE: tuple[str, ...] = ("target_heads", "heads", "projection", "all", "full")
"""``target_heads``: only the target classes' heads; ``heads``: every class's
head; ``projection``: heads and the shared projection; ``all``: those and the
text tower; ``full``: all of it and the image tower (the official DevSafety
runs: every parameter of CLIP trains)."""
_TEXT_TRAINS = ("all", "full")


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
        negative_head: add the extra head (row ``-1``) that negative captions go
            through (official DevSafety); its ``A`` is drawn after the classes'
            heads, so theirs are the same either way.
    """

    def __init__(
        self,
        oracle: LocalOracle,
        class_names: Sequence[str],
        *,
        rank: int = 32,
        prompt: str = "a photo of a {}.",
        seed: int = 0,
        negative_head: bool = False,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if "{}" not in prompt:
            raise ValueError(f"prompt must contain '{{}}' for the class name, got {prompt!r}")
        self.oracle = oracle
        self.class_names = list(class_names)
        self.prompt = prompt
        self.prompts = [prompt.format(name) for name in self.class_names]
        text = oracle.text_tower()
        self.tower, projection = text.tower, text.projection
        self.projection = nn.Parameter(projection)
        width, dim = projection.shape
        generator = torch.Generator().manual_seed(seed)
        n_classes = len(self.class_names)
        self.negative_head = negative_head
        heads = [torch.randn(n_classes, width, rank, generator=generator)]
        if negative_head:  # drawn last: the classes' heads do not depend on it
            heads.append(torch.randn(1, width, rank, generator=generator))
        self.head_a = nn.Parameter(torch.cat(heads) / width**0.5)
        self.head_b = nn.Parameter(torch.zeros(len(self.head_a), rank, dim))
        self.logit_scale = float(oracle.logit_scale)
        self.logit_bias = float(oracle.logit_bias)
        self.device = torch.device(oracle.device)
        self.to(self.device)
        self._trainable: Trainable = "all"
        self._pooled_cache: torch.Tensor | None = None
        self._head_mask: torch.Tensor | None = None
        self.visual: nn.Module | None = None
        """The private image tower (``trainable="full"`` makes it); None: cached features."""
        self._preprocess: Callable[[np.ndarray], torch.Tensor] | None = None

    # ------------------------------------------------------------- training
    def set_trainable(self, trainable: Trainable, target: Sequence[int] = ()) -> list[nn.Parameter]:
        """Freeze everything but ``trainable``'s parts; return the parameters that train."""
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        self._trainable = trainable
        self.requires_grad_(False)
        params: list[nn.Parameter] = [self.head_a, self.head_b]
        mask = torch.ones(len(self.head_b), 1, 1, device=self.device)
        if trainable == "target_heads":
            if not target:
                raise ValueError("trainable='target_heads' needs the target classes")
            mask.zero_()
            mask[list(target)] = 1.0
            if self.negative_head:
                mask[-1] = 1.0  # the negative head always trains (official)
        self._head_mask = mask
        if trainable in ("projection", *_TEXT_TRAINS):
            params.append(self.projection)
        if trainable in _TEXT_TRAINS:
            params += list(self.tower.parameters())
        if trainable == "full":
            if self.visual is None:  # made once: other settings pay no memory for it
                image = self.oracle.trainable_image_tower()
                self.visual, self._preprocess = image.tower.to(self.device), image.preprocess
            params += list(self.visual.parameters())
        for param in params:
            param.requires_grad_(True)
        self._pooled_cache = None
        return params

    def tower_parameters(self) -> list[nn.Parameter]:
        """The text tower's parameters."""
        return list(self.tower.parameters())

    def image_tower_parameters(self) -> list[nn.Parameter]:
        """The private image tower's parameters ([] until ``trainable="full"``)."""
        return [] if self.visual is None else list(self.visual.parameters())

    # ------------------------------------------------------------ inference
    def _pooled(self) -> torch.Tensor:
        if self._trainable in _TEXT_TRAINS and torch.is_grad_enabled():
            pooled: torch.Tensor = self.tower(self.prompts)
            return pooled
        if self._pooled_cache is None or self._trainable in _TEXT_TRAINS:
            # A frozen tower gives the same pooled text every step: compute it once.
            with torch.no_grad():
                self._pooled_cache = self.tower(self.prompts).float()
        return self._pooled_cache

    def _masked_head_b(self) -> torch.Tensor:
        return self.head_b if self._head_mask is None else self.head_b * self._head_mask

    def class_embeddings(self) -> torch.Tensor:
        """Unit-norm class embeddings ``C x E`` (differentiable in what trains)."""
        pooled = self._pooled()
        n_classes = len(self.class_names)
        text = pooled @ self.projection + torch.einsum(
            "cw,cwr,cre->ce", pooled, self.head_a[:n_classes], self._masked_head_b()[:n_classes]
        )
        return F.normalize(text, dim=-1)

    def negative_embeddings(self) -> torch.Tensor:
        """Each class's prompt through the negative head, ``pooled_c (W + A_-1 B_-1)``:
        unit-norm ``C x E``, the captions of negative images (official ``cls_ids = -1``).

        Raises:
            ValueError: the model was built without ``negative_head``.
        """
        if not self.negative_head:
            raise ValueError("this model has no negative head: build it with negative_head=True")
        pooled = self._pooled()
        head = self.head_a[-1] @ self._masked_head_b()[-1]
        return F.normalize(pooled @ (self.projection + head), dim=-1)

    def logits(
        self, image_features: torch.Tensor, class_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled cosine similarities ``N x C`` of unit-norm image features."""
        text = self.class_embeddings() if class_embeddings is None else class_embeddings
        return image_features @ text.T * self.logit_scale + self.logit_bias

    def image_features(self, images: ImageDataset, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm image features of ``images`` on this device: the frozen tower's
        (cached by the backend), or with ``trainable="full"`` the private tower's as it
        is now (encoded in batches, no gradients)."""
        if self.visual is None:
            ref = self.oracle.register_images(images.image_set())
            return self.oracle.image_features(ref).to(self.device)
        with torch.no_grad():
            return torch.cat(
                [self.encode_pixels(chunk) for chunk in pixel_batches(images.images, batch_size)]
            )

    def encode_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """Unit-norm features ``N x E`` of uint8 ``N x H x W x 3`` pixels through the private
        image tower, differentiable in it.

        Raises:
            RuntimeError: no private image tower (only ``trainable="full"`` makes one).
        """
        if self.visual is None or self._preprocess is None:
            raise RuntimeError("the image tower is frozen: set_trainable('full') makes it train")
        batch = self._preprocess(np.asarray(pixels)).to(self.device)
        features: torch.Tensor = self.visual(batch)
        return F.normalize(features.float(), dim=-1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors that can differ from the backend: heads, projection, tower if it trains."""
        state = {
            "projection": self.projection.detach().cpu().clone(),
            "head_a": self.head_a.detach().cpu().clone(),
            "head_b": self._masked_head_b().detach().cpu().clone(),
        }
        if self._trainable in _TEXT_TRAINS:
            state.update(
                {f"tower.{k}": v.detach().cpu().clone() for k, v in self.tower.state_dict().items()}
            )
        if self.visual is not None:
            state.update(
                {
                    f"visual.{k}": v.detach().cpu().clone()
                    for k, v in self.visual.state_dict().items()
                }
            )
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state`'s tensors (from a model of the same shape).

        Raises:
            ValueError: the saved heads' count differs from this model's (one more or
                less: saved with the other ``negative_head`` setting).
        """
        if state["head_a"].shape != self.head_a.shape:
            raise ValueError(
                f"saved heads {tuple(state['head_a'].shape)} do not fit this model's "
                f"{tuple(self.head_a.shape)} (negative_head={self.negative_head}); restore "
                "with the settings the state was saved under"
            )
        with torch.no_grad():
            self.projection.copy_(state["projection"])
            self.head_a.copy_(state["head_a"])
            self.head_b.copy_(state["head_b"])
            tower = {
                k.removeprefix("tower."): v for k, v in state.items() if k.startswith("tower.")
            }
            if tower:
                self.tower.load_state_dict(tower)
            visual = {
                k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")
            }
            if visual:
                if self.visual is None:
                    raise ValueError(
                        "the state holds an image tower: set_trainable('full') before loading"
                    )
                self.visual.load_state_dict(visual)
        self._pooled_cache = None


def warmup_cosine(total_steps: int, warm: int) -> Callable[[int], float]:
    """Linear warm-up over ``warm`` steps, then a cosine decay to zero (official ``cosine_lr``)."""
    warm = max(1, warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
