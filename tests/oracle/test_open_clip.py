"""open_clip backend: the prefix-sharing text path equals encode_text, weights load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmlab.oracle import ImageSet, create_oracle
from vlmlab.oracle._clip_text import encode_padded

# Class names whose suffixes span 3 to 8+ tokens, so several length groups form.
NAMES = [
    "cat",
    "aquarium fish",
    "dog",
    "sweet pepper",
    "lawn-mower",
    "a very long and oddly specific hyphenated-class name",
    "tulip",
    "willow tree",
]


def _contexts(oracle, population: int, n_context: int, seed: int = 0) -> torch.Tensor:
    meta = oracle.metadata
    g = torch.Generator().manual_seed(seed)
    return meta.embedding_mean + meta.embedding_std * torch.randn(
        population, n_context, meta.token_dim, generator=g
    )


def _reference(oracle, contexts, names):
    rows = oracle.padded_token_rows(names, contexts.shape[1])
    return encode_padded(oracle.tower, contexts, rows, contexts.shape[1])


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50", "ViT-S-32-alt"])
@pytest.mark.parametrize(
    ("population", "n_context", "n_classes"), [(1, 1, 1), (3, 4, 8), (5, 16, 5), (2, 8, 3)]
)
def test_fast_text_path_equals_encode_text(clip_factory, arch, population, n_context, n_classes):
    oracle = clip_factory(arch)
    assert oracle.uses_prefix_sharing
    names = NAMES[:n_classes]
    contexts = _contexts(oracle, population, n_context, seed=population * 31 + n_context)
    fast = oracle._fast.encode(
        contexts, oracle._fast.plan([oracle._suffix(n) for n in names], n_context)
    )
    reference = _reference(oracle, contexts, names)
    assert fast.shape == reference.shape == (population, n_classes, fast.shape[-1])
    assert float((fast - reference).abs().max()) <= 1e-4


def test_fast_path_with_real_word_contexts_equals_plain_tokenized_prompts(vit_b32):
    """With the embeddings of "a photo of a" as contexts, CLIP sees ordinary text."""
    import open_clip

    contexts = vit_b32.phrase_embeddings("a photo of a").unsqueeze(0)
    assert contexts.shape == (1, 4, 512)
    fast = vit_b32._fast.encode(
        contexts, vit_b32._fast.plan([vit_b32._suffix(n) for n in NAMES], 4)
    )
    tokens = open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {n}." for n in NAMES])
    with torch.inference_mode():
        plain = vit_b32.model.encode_text(tokens)
    assert float((fast[0] - plain).abs().max()) <= 1e-4


def test_chunked_population_equals_single_chunk(vit_b32):
    names = NAMES[:5]
    contexts = _contexts(vit_b32, 6, 4, seed=7)
    plan = vit_b32._fast.plan([vit_b32._suffix(n) for n in names], 4)
    whole = vit_b32._fast.encode(contexts, plan)
    old = vit_b32._fast.max_tokens_per_chunk
    vit_b32._fast.max_tokens_per_chunk = 1  # one candidate per chunk
    try:
        chunked = vit_b32._fast.encode(contexts, plan)
    finally:
        vit_b32._fast.max_tokens_per_chunk = old
    assert float((whole - chunked).abs().max()) <= 1e-5


def test_a_class_list_too_long_for_one_sequence_is_split_exactly(vit_b32):
    """C = 1,000 classes do not fit one bounded sequence: they go in several, same features."""
    names = NAMES[:5]
    suffixes = [vit_b32._suffix(n) for n in names]
    contexts = _contexts(vit_b32, 3, 4, seed=8)
    whole = vit_b32._fast.encode(contexts, vit_b32._fast.plan(suffixes, 4))
    old = vit_b32._fast.max_tokens_per_chunk
    vit_b32._fast.max_tokens_per_chunk = 5 + 2 * max(len(s) for s in suffixes)  # two classes
    try:
        split = vit_b32._fast.encode_classes(contexts, suffixes)
        calls: list[int] = []
        original = vit_b32._fast.plan
        vit_b32._fast.plan = lambda part, n: calls.append(len(part)) or original(part, n)
        try:
            vit_b32._fast.encode_classes(contexts, suffixes)
        finally:
            del vit_b32._fast.plan
    finally:
        vit_b32._fast.max_tokens_per_chunk = old
    assert len(calls) >= 2 and sum(calls) == 5  # really split, every class once
    assert split.shape == whole.shape
    assert float((whole - split).abs().max()) <= 1e-5


def test_logits_equal_between_fast_and_padded_oracles(clip_factory, cache_dir):
    fast = clip_factory("ViT-B-32")
    slow = clip_factory("ViT-B-32", prefix_sharing=False)
    assert not slow.uses_prefix_sharing
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (6, 40, 48, 3), dtype=np.uint8), {"dataset": "noise"})
    ref_fast, ref_slow = fast.register_images(images), slow.register_images(images)
    contexts = _contexts(fast, 3, 4)
    a = fast.logits(contexts, NAMES[:4], ref_fast)
    b = slow.logits(contexts, NAMES[:4], ref_slow)
    assert a.shape == (3, 6, 4)
    assert float((a - b).abs().max()) <= 1e-3 * fast.logit_scale


def test_image_features_cached_on_disk_and_reused(vit_b32, cache_dir, tmp_path):
    from vlmlab.oracle._open_clip import OpenClipOracle

    rng = np.random.default_rng(1)
    images = ImageSet(
        rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
        {"dataset": "noise", "split": "test", "indices": [3, 1, 4, 1, 5]},
    )
    ref = vit_b32.register_images(images)
    from pathlib import Path

    files = list(Path(cache_dir).glob("features/open_clip/*/noise-test-*.npy"))
    assert len(files) == 1 and not list(Path(cache_dir).glob("**/*.tmp"))
    stored = np.load(files[0])
    assert np.allclose(stored, vit_b32.image_features(ref).numpy())
    # A new oracle on the same weights reads the file instead of encoding again.
    other = OpenClipOracle("ViT-B-32", cache_dir=cache_dir)
    other._encode_images = lambda pixels: pytest.fail("features should come from the disk cache")
    other.register_images(images)
    assert torch.equal(other.image_features(ref), vit_b32.image_features(ref))


def test_loads_a_local_checkpoint_file(vit_b32, tmp_path, cache_dir):
    path = tmp_path / "finetuned-vit-b-32.pt"
    state = {k: v.clone() for k, v in vit_b32.model.state_dict().items()}
    state["text_projection"] = state["text_projection"] * 2.0  # weights unlike random init
    torch.save(state, path)
    loaded = create_oracle("open_clip:ViT-B-32", pretrained=str(path), cache_dir=cache_dir)
    assert loaded.metadata.model.startswith("ViT-B-32/finetuned-vit-b-32-")
    assert torch.equal(loaded.model.text_projection, state["text_projection"])
    assert torch.equal(loaded.model.visual.conv1.weight, vit_b32.model.visual.conv1.weight)


def test_missing_checkpoint_unknown_model_and_tag(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        create_oracle("open_clip:ViT-B-32", pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        create_oracle("open_clip:ViT-B-33")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'not-a-tag'.*openai"):
        create_oracle("open_clip:ViT-B-32", pretrained="not-a-tag")
    with pytest.raises(ValueError, match=r"unknown backend 'clip'.*conse.*open_clip"):
        create_oracle("clip:ViT-B-32")


def test_metadata(vit_b32):
    meta = vit_b32.metadata
    table = vit_b32.model.token_embedding.weight
    assert meta.backend == "open_clip" and meta.model == "ViT-B-32/random-init-seed0"
    assert (meta.token_dim, meta.context_length) == (512, 77)
    assert torch.allclose(meta.embedding_mean, table.mean(0))
    assert meta.embedding_std == pytest.approx(float(table.std()))
    assert vit_b32.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_image_features_are_cached_per_precision(tmp_path):
    """bf16 features are computed in bf16 and kept under a key that names it."""
    from pathlib import Path

    pixels = np.random.default_rng(5).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    images = ImageSet(pixels, {"dataset": "noise-precision"})
    full = create_oracle("open_clip:vlmlab-tiny-fmnist", cache_dir=str(tmp_path))
    half = create_oracle("open_clip:vlmlab-tiny-fmnist", cache_dir=str(tmp_path), precision="bf16")
    assert half.metadata.model.endswith("/bf16-mixed") and half.tower.dtype == torch.bfloat16
    a, b = full.register_images(images), half.register_images(images)
    files = sorted(Path(tmp_path).glob("features/open_clip/**/noise-precision-*.npy"))
    assert len(files) == 2  # one per precision: neither is served the other's features
    low, high = half.image_features(b), full.image_features(a)
    assert not torch.equal(low, high) and float((low - high).abs().max()) < 0.05


def _input_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_pre_hook(lambda _module, args: seen.append(args[0].dtype))
    return seen


def test_an_fp16_image_tower_beside_an_fp32_text_tower(tmp_path):
    """``precision: fp16, text_precision: fp32``: the official CraFT model (clip.load's fp16
    CLIP, main_craft.py L101 ``TextEncoder(clip_model).float()``), from a spec."""
    from vlmlab.specs._sections import BackendSpec

    backend = BackendSpec(
        name="open_clip:vlmlab-tiny-fmnist",
        pretrained="random-init",
        precision="fp16",
        text_precision="fp32",
    )
    assert backend.oracle_kwargs() == {"precision": "fp16", "text_precision": "fp32"}
    oracle = create_oracle(backend.name, cache_dir=str(tmp_path), **backend.oracle_kwargs())
    model = oracle.model
    assert model.visual.conv1.weight.dtype == torch.float16
    assert model.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
    assert model.visual.ln_pre.weight.dtype == torch.float32  # OpenAI's rule: LayerNorm fp32
    text = [
        model.token_embedding.weight,
        model.positional_embedding,
        model.text_projection,
        *model.transformer.parameters(),
        *model.ln_final.parameters(),
    ]
    assert {p.dtype for p in text} == {torch.float32}
    assert oracle.tower.dtype == torch.float32 and oracle.uses_prefix_sharing
    assert oracle.metadata.model.endswith("/random-init-seed0/fp16-mixed-text-fp32")
    contexts = _contexts(oracle, 3, 4, seed=7)
    fast = oracle.text_features(contexts, NAMES[:5], prefix_sharing=True)
    reference = oracle.text_features(contexts, NAMES[:5], prefix_sharing=False)
    assert fast.dtype == torch.float32 and float((fast - reference).abs().max()) <= 1e-4
    # Pixels go to the image tower in its own dtype, not the text tower's.
    seen = _input_dtypes(model.visual)
    pixels = np.random.default_rng(2).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    ref = oracle.register_images(ImageSet(pixels, {"dataset": "noise-mixed"}))
    assert seen == [torch.float16]
    logits = oracle.logits(contexts, NAMES[:5], ref)
    assert logits.dtype == torch.float32 and logits.shape == (3, 3, 5)
    with pytest.raises(ValueError, match=r"text_precision must be one of \['fp32'\]"):
        create_oracle("open_clip:vlmlab-tiny-fmnist", text_precision="fp8")


def test_fp16_follows_openais_mixed_rule(tmp_path):
    """fp16 as clip.load builds it (convert_weights): the token table, embeddings and
    LayerNorm stay fp32; the transformer computes in fp16 (the dtype both text paths use)."""
    oracle = create_oracle(
        "open_clip:vlmlab-tiny-fmnist", cache_dir=str(tmp_path), precision="fp16"
    )
    model = oracle.model
    assert model.token_embedding.weight.dtype == torch.float32
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16
    assert oracle.tower.dtype == torch.float16  # the blocks', not the fp32 token table's
    assert oracle.metadata.embedding_mean.dtype == torch.float32
    assert oracle.metadata.model.endswith("/fp16-mixed")  # never /fp16's cache entries
    contexts = _contexts(oracle, 2, 4, seed=3)
    fast = oracle.text_features(contexts, NAMES[:4], prefix_sharing=True)
    reference = oracle.text_features(contexts, NAMES[:4], prefix_sharing=False)
    assert float((fast - reference).abs().max()) <= 1e-2 * float(reference.abs().max())
