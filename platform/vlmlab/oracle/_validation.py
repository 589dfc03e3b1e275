"""Input checks of the Oracle contract, shared by every implementation.

Each raises a built-in exception whose message names what is wrong, and runs
before a call reserves budget or does any work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmlab.oracle._protocol import ImageSet, ImageSetRef, OracleMetadata


def validate_contexts(
    contexts: torch.Tensor | np.ndarray, metadata: OracleMetadata
) -> torch.Tensor:
    """Shape ``P x m x D`` with D the model's, floating point, finite; returns float32 CPU."""
    if isinstance(contexts, np.ndarray):
        contexts = torch.from_numpy(contexts)
    if not isinstance(contexts, torch.Tensor):
        raise TypeError(
            f"contexts must be a torch.Tensor or numpy array, got {type(contexts).__name__}"
        )
    dim = metadata.token_dim
    if contexts.ndim != 3:
        raise ValueError(
            f"contexts must have shape (population, context tokens, {dim}); got shape {tuple(contexts.shape)}"
        )
    population, n_context, width = contexts.shape
    if width != dim:
        raise ValueError(
            f"contexts have token dimension {width}, but {metadata.display_name} "
            f"takes token embeddings of dimension {dim}"
        )
    if population == 0 or n_context == 0:
        raise ValueError(
            "contexts must hold at least one candidate and one context token; "
            f"got shape {tuple(contexts.shape)}"
        )
    if not contexts.is_floating_point():
        raise TypeError(f"contexts must be floating point, got dtype {contexts.dtype}")
    finite = torch.isfinite(contexts)
    if not bool(finite.all()):
        bad = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"contexts contain {int((~finite).sum())} NaN/inf values "
            f"(candidates {bad[:10]}{'...' if len(bad) > 10 else ''})"
        )
    return contexts.detach().to(torch.float32).cpu()


def validate_class_names(class_names: Sequence[str]) -> list[str]:
    """A non-empty sequence of non-blank strings."""
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(
            f"class_names must be a sequence of strings, got {type(class_names).__name__}"
        )
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty: give at least one class name")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names[{i}] must be a non-empty string, got {name!r}")
    return names


def check_prompt_length(
    names: list[str], suffix_counts: list[int], n_context: int, limit: int
) -> None:
    """``[SOS] + m contexts + the longest class suffix`` must fit the text tower."""
    longest = max(range(len(names)), key=suffix_counts.__getitem__)
    if 1 + n_context + suffix_counts[longest] > limit:
        raise ValueError(
            f"prompt too long: 1 start token + {n_context} context tokens + "
            f"{suffix_counts[longest]} tokens of class {names[longest]!r} exceed the text tower's "
            f"context length {limit}; use at most {limit - 1 - suffix_counts[longest]} context tokens"
        )


def image_set_ref(images: ImageSet) -> ImageSetRef:
    """The reference of a set to register; anything but an ImageSet is a TypeError."""
    if not isinstance(images, ImageSet):
        raise TypeError(
            f"register_images expects a vlmlab.oracle.ImageSet, got {type(images).__name__}"
        )
    return images.ref


def scoped_image_set_id(scope: str, content_id: str) -> str:
    """The id a set registered for ``scope`` (an API key) is held under: one per scope."""
    return "s" + hashlib.sha256(f"{scope}\x00{content_id}".encode()).hexdigest()[:31]


def image_set_id(image_set: ImageSetRef | str) -> str:
    set_id = image_set.id if isinstance(image_set, ImageSetRef) else image_set
    if not isinstance(set_id, str):
        raise TypeError(
            f"image_set must be an ImageSetRef or its id string, got {type(image_set).__name__}"
        )
    return set_id


def unknown_image_set(set_id: str, registered: Collection[str]) -> KeyError:
    known = ", ".join(sorted(registered)) or "none"
    return KeyError(
        f"unknown image set {set_id!r}: register it with register_images() first (registered: {known})"
    )


def validate_indices(indices: Sequence[int] | np.ndarray | None, size: int) -> torch.Tensor | None:
    """None (all images) or a non-empty 1-D integer index within ``size``."""
    if indices is None:
        return None
    index = torch.as_tensor(np.asarray(indices))
    if index.ndim != 1 or index.numel() == 0:
        raise ValueError(
            f"indices must be a non-empty 1-D sequence, got shape {tuple(index.shape)}"
        )
    if index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got dtype {index.dtype}")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"indices out of range for an image set of {size} images: min {low}, max {high}"
        )
    return index.long()


@dataclass(frozen=True)
class CheckedCall:
    """A ``logits`` call that passed every check, with what it will be charged."""

    contexts: torch.Tensor
    names: list[str]
    set_id: str
    index: torch.Tensor | None
    n_images: int

    @property
    def charges(self) -> dict[str, int]:
        """The ledger's counts for this call (``metered``'s keyword arguments)."""
        population = self.contexts.shape[0]
        return {
            "queries": population,
            "images_scored": population * self.n_images,
            "prompts_encoded": population * len(self.names),
        }


def check_call(
    contexts: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    image_set: ImageSetRef | str,
    indices: Sequence[int] | np.ndarray | None,
    metadata: OracleMetadata,
    set_sizes: Mapping[str, int],
) -> CheckedCall:
    """Every check of a remote oracle's ``logits`` call, in the contract's order.

    ``set_sizes`` maps the ids of the image sets this client registered to
    their sizes; the server checks the prompt length itself.
    """
    checked = validate_contexts(contexts, metadata)
    names = validate_class_names(class_names)
    set_id = image_set_id(image_set)
    if set_id not in set_sizes:
        raise unknown_image_set(set_id, set_sizes)
    index = validate_indices(indices, set_sizes[set_id])
    n_images = set_sizes[set_id] if index is None else len(index)
    return CheckedCall(checked, names, set_id, index, n_images)
