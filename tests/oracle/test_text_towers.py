"""Every open_clip text tower the oracle can be asked for: exact logits, or a refusal up front.

``open_clip.list_models()`` (with vlmlab's own configs registered, as the oracle
sees it) is grouped into families by what decides how a soft prompt becomes a
text feature (the tokenizer, causal or bidirectional attention, the pooling,
the projection, CoCa's appended class token) and by the code of the image
tower (open_clip's ViT or ModifiedResNet, or the timm module of a timm tower).
Each family's smallest member is built with random weights through the path a
user takes (``create_oracle("open_clip:<name>")``), and its logits for soft
contexts equal to the token embeddings of real words must equal the model's own
``encode_image``/``encode_text`` on the plain prompts, or the oracle must refuse
the architecture before building anything, with a message that names it and
says why. An error from inside open_clip fails the test either way.

Run with ``pytest -s -v`` to see the family table.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmlab.oracle import ImageSet, create_oracle, preprocess_pixels, register_model_configs

NAMES = ["cat", "aquarium fish", "sweet pepper"]
PHRASES = ["a photo of a", "a drawing of the"]
"""The contexts of a population of two: the token embeddings of these words, so
each candidate's prompts are the plain text ``"<phrase> <class>."``."""
ATOL = 1e-4
"""On the logits themselves, ``logit_scale * cosine + logit_bias``. With a
random-init scale of 1/0.07 this asks cosines to agree within 7e-6: stricter than
a bound on cosines, and still far above float32 noise (about 1e-6 here), so a
layout error (a shifted position, a missing pad, the wrong pooled token) cannot
pass while both text paths do."""


@dataclass(frozen=True)
class Family:
    """Architectures whose text side the oracle must treat alike."""

    text: str
    image: str
    members: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.text}+{self.image}"

    @property
    def expected(self) -> str:
        """``"refused"`` for text sides outside open_clip's CLIP BPE tokenizer and
        text transformer (no layout for soft prompts is implemented there), else
        ``"exact"``."""
        return "refused" if "hf-" in self.text else "exact"


def _config(name: str) -> dict[str, Any]:
    import open_clip

    config: dict[str, Any] = open_clip.get_model_config(name) or {}
    return config


def _text_kind(name: str, config: dict[str, Any]) -> str:
    text = config.get("text_cfg", {})
    coca = ["coca"] if "multimodal_cfg" in config else []
    if text.get("hf_model_name"):
        return "/".join([*coca, "hf-text-model"])
    # open_clip.get_tokenizer's own rule: a named HF tokenizer, else SigLIP's by name.
    hf_tokenizer = text.get("hf_tokenizer_name") or "siglip" in name.lower()
    attention = "bidirectional" if text.get("no_causal_mask") else "causal"
    pooling = "cls-appended" if text.get("embed_cls") else text.get("pool_type", "argmax")
    if text.get("proj_type") == "none":
        projection = "no-proj"
    else:
        projection = "linear-proj" if text.get("proj_bias") else "matrix-proj"
    tokenizer = "hf-tokenizer" if hf_tokenizer else "clip-bpe"
    return "/".join([*coca, tokenizer, attention, pooling, projection])


def _image_kind(config: dict[str, Any]) -> str:
    vision = config.get("vision_cfg", {})
    timm_name = vision.get("timm_model_name")
    if timm_name:
        import timm

        if not timm.is_model(timm_name):
            return f"timm-unknown-{timm_name}"
        return "timm-" + timm.models.model_entrypoint(timm_name).__module__.rsplit(".", 1)[-1]
    if isinstance(vision.get("layers"), list | tuple):
        return "open_clip-resnet"
    return "open_clip-vit"


def _families() -> list[Family]:
    import open_clip

    register_model_configs()
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in open_clip.list_models():
        config = _config(name)
        groups[(_text_kind(name, config), _image_kind(config))].append(name)
    return [Family(text, image, tuple(names)) for (text, image), names in sorted(groups.items())]


FAMILIES = _families()


def _text_size(name: str) -> int:
    """Roughly the text tower's parameters, from its config (0 for HF text models,
    which are not described there)."""
    text = _config(name).get("text_cfg", {})
    if text.get("hf_model_name"):
        return 0
    width, layers = text.get("width", 512), text.get("layers", 12)
    embeddings = (text.get("vocab_size", 49408) + text.get("context_length", 77)) * width
    return embeddings + int(layers * (4 + 2 * text.get("mlp_ratio", 4.0)) * width * width)


def _parameter_count(name: str) -> int:
    """Exact, from a model built on the meta device: no memory, no initialization."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    return sum(p.numel() for p in model.parameters())


def representative(family: Family) -> str:
    """The family's cheapest member to build: the smallest text tower (what the test
    is about), ties broken by the whole model's parameter count. Refused families
    are never built, so only their text size and name order count."""
    smallest = min(_text_size(name) for name in family.members)
    tied = sorted(name for name in family.members if _text_size(name) == smallest)
    if len(tied) == 1 or family.expected == "refused":
        return tied[0]
    return min(tied, key=lambda name: (_parameter_count(name), name))


@pytest.fixture(scope="module")
def table() -> Iterator[Callable[[Family, str, str], None]]:
    """Collects one row per family; prints the table when the module's tests end."""
    rows: dict[str, tuple[str, str, str]] = {}

    def add(family: Family, model: str, outcome: str) -> None:
        rows[family.id] = (model, f"{len(family.members)} models", outcome)
        print(f"\n{family.id}: {model} -> {outcome}")

    yield add
    width = max(len(family.id) for family in FAMILIES)
    lines = [f"{'family':<{width}}  {'representative':<34} {'size':<10} outcome"]
    for family in FAMILIES:
        model, size, outcome = rows.get(family.id, ("-", "-", "not run"))
        lines.append(f"{family.id:<{width}}  {model:<34} {size:<10} {outcome}")
    print("\nopen_clip text-tower families\n" + "\n".join(lines))


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread() -> Iterator[None]:
    """One thread (the CPUs are shared) and no "initialized randomly" warnings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    torch.set_num_threads(threads)


def test_families_partition_the_model_list():
    import open_clip

    register_model_configs()
    listed = [name for family in FAMILIES for name in family.members]
    assert sorted(listed) == sorted(open_clip.list_models())
    assert len(set(listed)) == len(listed)
    kinds = {family.text for family in FAMILIES}
    # The kinds this test exists for; a renamed config key would silently merge them.
    for kind in (
        "clip-bpe/causal/argmax/matrix-proj",
        "clip-bpe/bidirectional/argmax/matrix-proj",
        "coca/clip-bpe/causal/cls-appended/matrix-proj",
        "hf-tokenizer/bidirectional/last/linear-proj",
        "hf-text-model",
    ):
        assert kind in kinds, sorted(kinds)


def _reference_logits(model: Any, tokenizer: Any, pixels: np.ndarray) -> torch.Tensor:
    """``P x N x C`` logits from the model's own towers on the plain prompts."""
    import open_clip

    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess["size"] if isinstance(preprocess["size"], int) else preprocess["size"][0]
    batch = preprocess_pixels(pixels, size, preprocess["mean"], preprocess["std"])
    bias = 0.0 if getattr(model, "logit_bias", None) is None else model.logit_bias
    with torch.inference_mode():
        image = F.normalize(model.encode_image(batch).float(), dim=-1)
        logits = []
        for phrase in PHRASES:
            tokens = tokenizer([f"{phrase} {name}." for name in NAMES])
            text = F.normalize(model.encode_text(tokens).float(), dim=-1)
            logits.append(model.logit_scale.exp() * image @ text.T + bias)
    return torch.stack(logits)


def _refuse_to_build(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the oracle built the model before refusing it")


@pytest.mark.slow  # about 45 s on 2 shared cores: a dozen models built and run on CPU
@pytest.mark.parametrize("family", FAMILIES, ids=[family.id for family in FAMILIES])
def test_oracle_logits_equal_the_models_own(family, table, monkeypatch):
    import open_clip

    name = representative(family)
    if family.expected == "refused":
        monkeypatch.setattr(open_clip, "create_model", _refuse_to_build)
        monkeypatch.setattr(open_clip, "get_tokenizer", _refuse_to_build)
        with pytest.raises(ValueError, match="not supported") as refusal:
            create_oracle(f"open_clip:{name}", disk_cache=False)
        message = str(refusal.value)
        assert name in message and "Hugging Face" in message  # which model, and why
        # Raised by vlmlab's own check, not by something inside open_clip.
        assert refusal.traceback[-1].frame.f_globals["__name__"].startswith("vlmlab.")
        table(family, name, f"refused: {message}")
        return

    oracle = create_oracle(f"open_clip:{name}", disk_cache=False, device="cpu")
    contexts = torch.stack([oracle.phrase_embeddings(phrase) for phrase in PHRASES])
    pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    images = oracle.register_images(ImageSet(pixels, {"dataset": "noise"}))

    logits = oracle.logits(contexts, NAMES, images)
    expected = _reference_logits(oracle.model, open_clip.get_tokenizer(name), pixels)
    assert logits.shape == expected.shape == (len(PHRASES), len(pixels), len(NAMES))
    diff = float((logits - expected).abs().max())

    # The other text path too: the model's own encode_text on padded rows.
    padded = F.normalize(oracle.text_features(contexts, NAMES, prefix_sharing=False).cpu(), dim=-1)
    padded_logits = (
        torch.einsum("ne,pce->pnc", oracle.image_features(images), padded) * oracle.logit_scale
        + oracle.logit_bias
    )
    padded_diff = float((padded_logits - expected).abs().max())
    path = "prefix-sharing" if oracle.uses_prefix_sharing else "padded encode_text"
    table(
        family,
        name,
        f"exact via {path}: max |dlogit| {diff:.1e} (padded path {padded_diff:.1e})",
    )
    assert diff <= ATOL, f"{name}: oracle logits differ from the model's own by {diff:.2e}"
    assert padded_diff <= ATOL, f"{name}: padded text path differs by {padded_diff:.2e}"
