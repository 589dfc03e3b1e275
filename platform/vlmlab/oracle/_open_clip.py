"""The open_clip backend: real CLIP models, from a hub tag or a local checkpoint."""

from __future__ import annotations

import copy
import difflib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.ledger import QueryLedger
from vlmlab.oracle._base import (
    FineTunableImage,
    FineTunableText,
    LocalOracle,
    embedding_table_stats,
)
from vlmlab.oracle._clip_text import PrefixSharingEncoder, TextTower, encode_padded
from vlmlab.oracle._protocol import OracleMetadata, PixelSource, pixel_batches

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TEXT_PRECISIONS = ("fp32",)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


MODEL_CONFIGS = Path(__file__).with_name("model_configs")
"""open_clip model configs vlmlab ships (``vlmlab-tiny-fmnist``: the CLIP that
``vlmlab pretrain tiny-clip`` trains offline), registered with open_clip on first use."""
_registered = False


def register_model_configs() -> list[str]:
    """Register vlmlab's own open_clip architectures (idempotent); their names."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(MODEL_CONFIGS)
        _registered = True
    return sorted(path.stem for path in MODEL_CONFIGS.glob("*.json"))


def preprocess_pixels(
    pixels: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` -> the float batch an open_clip image tower reads
    (bicubic resize of the shorter side, centre crop, normalize): one function for
    the oracle and for pretraining, so a model trains on exactly what it is shown."""
    from torchvision.transforms.v2 import functional as TF

    batch = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    batch = TF.resize(batch, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    batch = TF.center_crop(batch, image_size).float().div(255)
    normalized: torch.Tensor = TF.normalize(batch, list(mean), list(std))
    return normalized


RANDOM_INIT = "random-init"
"""``pretrained`` for untrained weights (the model id ends in it)."""


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def unsupported_text_side(model_name: str) -> str | None:
    """Why the oracle cannot serve a built-in architecture's text side, or None.

    Read from the architecture's config alone, so a refusal comes before any
    weights, tokenizer files or Hugging Face configs are fetched. The oracle
    writes soft prompts into the token embeddings of open_clip's own text
    transformer, laid out as ``[SOS] ctx_1..ctx_m <class> . [EOS] 0...``: the
    layout of open_clip's CLIP BPE tokenizer, the only one implemented. The other
    tokenizers (SigLIP's SentencePiece, CLIPA's BERT WordPiece, the worldwide
    models' mT5/XLM-V) have no [SOS], end and pad rows their own way, and are
    fetched from the Hugging Face hub; a Hugging Face text model has no open_clip
    transformer at all.
    """
    import open_clip

    config = open_clip.get_model_config(model_name) or {}
    text_cfg = config.get("text_cfg", {})
    hf_model = text_cfg.get("hf_model_name")
    if hf_model:
        return (
            f"its text tower is the Hugging Face model {hf_model!r}; soft prompts are "
            "written into the token embeddings of open_clip's own text transformer only"
        )
    hf_tokenizer = text_cfg.get("hf_tokenizer_name")
    if hf_tokenizer or "siglip" in model_name.lower():
        source = (
            f"the Hugging Face tokenizer {hf_tokenizer!r}"
            if hf_tokenizer
            else "SigLIP's SentencePiece tokenizer"
        )
        return (
            f"it tokenizes with {source}, not open_clip's CLIP BPE tokenizer; soft prompts "
            "are laid out as CLIP BPE's '[SOS] contexts <class>. [EOS]', the only layout "
            "implemented"
        )
    return None


def precision_tag(precision: str, text_precision: str | None = None) -> str:
    """What a model id adds for its precision: ``""`` (fp32), ``/fp16-mixed`` (OpenAI's
    mixed rule), ``/fp16-mixed-text-fp32`` (an fp32 text tower beside it).

    The tag names the features: image features are cached under the model id, so
    another rule of computing them must never share an entry (the ``-mixed`` ids are
    new with the mixed rule; ``/fp16`` entries were cast whole)."""
    if precision == "fp32":
        return ""
    tag = f"/{precision}-mixed"
    if text_precision is not None and text_precision != precision:
        tag += f"-text-{text_precision}"
    return tag


def text_modules_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the text tower of an open_clip model (transformer, token and positional
    embeddings, final LayerNorm, projection) to ``dtype``, in place.

    The official CraFT code does this to its CLIP: ``TextEncoder(clip_model).float()``
    (``main_craft.py`` L101), whose parameters are the model's own.
    """
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP: the text tower is one module
        text.to(dtype=dtype)
        return
    owner: Any = model
    for name in ("transformer", "token_embedding", "ln_final"):
        getattr(owner, name).to(dtype=dtype)
    for name in ("positional_embedding", "text_projection"):
        part = getattr(owner, name, None)
        if isinstance(part, nn.Module):
            part.to(dtype=dtype)
        elif isinstance(part, torch.Tensor):
            part.data = part.data.to(dtype)


def resolve_open_clip_model(model_name: str, pretrained: str | None) -> tuple[str, str | None, str]:
    """Check a model name and weights source before building anything.

    Returns the model name, the ``pretrained`` argument for open_clip and a
    model id that identifies the weights (used in cache keys and reports).

    Raises:
        ValueError: an unknown name or tag, or an architecture whose text side the
            oracle cannot serve (:func:`unsupported_text_side` says why).
        FileNotFoundError: a checkpoint path that does not exist.
    """
    import open_clip

    register_model_configs()
    if not model_name.startswith(("hf-hub:", "local-dir:")):
        known = open_clip.list_models()
        if model_name not in known:
            close = difflib.get_close_matches(model_name, known, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown open_clip model {model_name!r}{hint} "
                f"(open_clip.list_models() lists all {len(known)})"
            )
        reason = unsupported_text_side(model_name)
        if reason is not None:
            raise ValueError(f"open_clip model {model_name!r} is not supported: {reason}")
    if pretrained is None or pretrained == RANDOM_INIT:
        return model_name, None, f"{model_name}/{RANDOM_INIT}"
    if _looks_like_path(pretrained) or Path(pretrained).exists():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            hint = (
                "; `vlmlab pretrain tiny-clip` trains it"
                if model_name in register_model_configs()
                else ""
            )
            raise FileNotFoundError(f"open_clip checkpoint file not found: {str(path)!r}{hint}")
        return model_name, str(path), f"{model_name}/{path.stem}-{_file_fingerprint(path)}"
    if not model_name.startswith(("hf-hub:", "local-dir:")):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for {model_name}; "
                f"known tags: {', '.join(tags) or 'none'}; or pass a checkpoint file path"
            )
    return model_name, pretrained, f"{model_name}/{pretrained}"


class OpenClipOracle(LocalOracle):
    """Any open_clip CLIP model as a black box.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``).
        pretrained: a pretrained tag (downloads from the hub when online), a local
            checkpoint file, or None for random initialization (tests).
        device: ``"cuda"``/``"cpu"``; CUDA when present by default.
        precision: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``: the towers' precision.
            fp16 and bf16 follow OpenAI's mixed rule (open_clip's ``precision``:
            weights of linear, convolution and attention layers in it; LayerNorm
            computed in fp32; embeddings and BatchNorm kept in fp32), as the
            official CLIP's ``convert_weights`` builds it.
        text_precision: ``"fp32"`` runs the text tower in fp32 beside a fp16 or bf16
            image tower (the official CraFT code's model); None: ``precision``.
        seed: torch seed for random initialization, so random-init models are
            reproducible (and their cached image features stay valid).
        prefix_sharing: use the fast text path (default); False forces the
            model's own ``encode_text`` on padded prompts.
        max_tokens_per_chunk: the most tokens the fast path puts through the
            tower at once (it bounds activation memory; ``benchmarks/oracle_memory.py``).

    Raises:
        ValueError: unknown model name or pretrained tag, or an architecture whose
            text side cannot take soft prompts (Hugging Face text towers and
            tokenizers: SigLIP, CLIPA, the worldwide and NLLB/XLM-R models).
        NotImplementedError: a hub or local-dir model whose tokenizer has no
            CLIP start/end tokens.
        FileNotFoundError: a checkpoint path that does not exist.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        *,
        pretrained: str | None = None,
        device: str | None = None,
        precision: str = "fp32",
        text_precision: str | None = None,
        seed: int = 0,
        prefix_sharing: bool = True,
        max_tokens_per_chunk: int = 8192,
        cache_dir: str | None = None,
        disk_cache: bool = True,
        ledger: QueryLedger | None = None,
    ) -> None:
        import open_clip

        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if text_precision is not None and text_precision not in _TEXT_PRECISIONS:
            raise ValueError(
                f"text_precision must be one of {list(_TEXT_PRECISIONS)} or None, "
                f"got {text_precision!r}"
            )
        if not isinstance(max_tokens_per_chunk, int) or max_tokens_per_chunk < 1:
            raise ValueError(
                f"max_tokens_per_chunk must be a positive int, got {max_tokens_per_chunk!r}"
            )
        name, weights, model_id = resolve_open_clip_model(model_name, pretrained)
        if weights is None:
            model_id = f"{model_id}-seed{seed}"
        super().__init__(cache_dir=cache_dir, disk_cache=disk_cache, ledger=ledger)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # The tokenizer first: a refusal of it comes before the model is built.
        self.tokenizer = open_clip.get_tokenizer(name)
        self._start, self._end = self._special_tokens(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(
                name, pretrained=weights, device=self.device, precision=precision
            )
        if text_precision is not None and text_precision != precision:
            text_modules_to(model, _DTYPES[text_precision])
        model = model.eval().requires_grad_(False)
        self.model = model
        self.precision, self.text_precision = precision, text_precision or precision
        self._image_dtype = _DTYPES[precision]
        self.tower = TextTower.from_model(model)
        self._placeholder = self._token_ids("X")[0]
        self._fast: PrefixSharingEncoder | None = None
        if prefix_sharing and self.tower.supports_prefix_sharing(self._end) is None:
            self._fast = PrefixSharingEncoder(
                self.tower, self._start, self._end, max_tokens_per_chunk=max_tokens_per_chunk
            )
        mean, std = embedding_table_stats(self.tower.token_embedding.weight)
        self._metadata = OracleMetadata(
            backend="open_clip",
            model=model_id + precision_tag(precision, text_precision),
            token_dim=self.tower.width,
            context_length=self.tower.context_length,
            embedding_mean=mean,
            embedding_std=std,
        )
        self._scale = float(model.logit_scale.exp())
        bias = getattr(model, "logit_bias", None)
        self._bias = float(bias) if bias is not None else 0.0
        preprocess = open_clip.get_model_preprocess_cfg(model)
        size = preprocess.get("size", 224)
        self._image_size = size if isinstance(size, int) else int(size[0])
        self._mean = torch.tensor(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self._std = torch.tensor(preprocess.get("std", open_clip.OPENAI_DATASET_STD))

    # ------------------------------------------------------------------ text
    def _special_tokens(self, model_name: str) -> tuple[int, int]:
        start = getattr(self.tokenizer, "sot_token_id", None)
        end = getattr(self.tokenizer, "eot_token_id", None)
        if start is None or end is None:
            raise NotImplementedError(
                f"open_clip model {model_name!r}: its tokenizer {type(self.tokenizer).__name__} "
                "has no start/end token ids; soft prompts are laid out for CLIP-style "
                "tokenizers only"
            )
        return int(start), int(end)

    def _token_ids(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens, never truncated."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            raise NotImplementedError(f"tokenizer {type(self.tokenizer).__name__} has no encode()")
        return list(encode(text))

    @property
    def _end_token(self) -> int:
        return self._end

    def _embed_tokens(self, ids: list[int]) -> torch.Tensor:
        table = self.tower.token_embedding.weight
        return table[torch.tensor(ids, device=table.device)]

    def padded_token_rows(self, class_names: Sequence[str], n_context: int) -> torch.Tensor:
        """``[SOS] X*m <class> . [EOS] 0...`` rows, as open_clip's tokenizer pads them.

        The padding matters beyond the end token: bidirectional towers (MobileCLIP)
        attend to it, and CoCa masks attention where a row holds the pad id 0.
        """
        rows = torch.zeros(len(class_names), self.tower.context_length, dtype=torch.long)
        for c, name in enumerate(class_names):
            tokens = [self._start, *[self._placeholder] * n_context, *self._suffix(name)]
            rows[c, : len(tokens)] = torch.tensor(tokens)
        return rows

    def text_features(
        self,
        contexts: torch.Tensor,
        class_names: Sequence[str],
        *,
        prefix_sharing: bool | None = None,
    ) -> torch.Tensor:
        """Projected text features ``P x C x E`` before normalization, on the model's device.

        ``prefix_sharing`` picks the path: the shared-prefix encoder (True), the
        model's own ``encode_text`` on padded prompts (False), or this oracle's
        setting (None). Both give the same features within float tolerance; the
        text-path benchmark times one against the other.
        """
        n_context = contexts.shape[1]
        fast = self._fast if prefix_sharing is not False else None
        if prefix_sharing and fast is None:
            raise ValueError("this architecture has no prefix-sharing path")
        with torch.inference_mode():
            if fast is not None:
                return fast.encode_classes(contexts, [self._suffix(name) for name in class_names])
            rows = self.padded_token_rows(class_names, n_context)
            return encode_padded(self.tower, contexts, rows, n_context)

    def _encode_population(
        self, contexts: torch.Tensor, class_names: Sequence[str]
    ) -> torch.Tensor:
        n_context = contexts.shape[1]
        if self._fast is not None:
            suffixes = [self._suffix(name) for name in class_names]
            features = self._fast.encode_classes(contexts, suffixes)
        else:
            rows = self.padded_token_rows(class_names, n_context)
            features = encode_padded(self.tower, contexts, rows, n_context)
        return F.normalize(features.float(), dim=-1).cpu()

    # ---------------------------------------------------------------- images
    def _encode_images(
        self, pixels: np.ndarray | PixelSource, batch_size: int = 64
    ) -> torch.Tensor:
        dtype = self._image_dtype  # the image tower's, which the text tower's may not be
        features = []
        with torch.inference_mode():
            for chunk in pixel_batches(pixels, batch_size):  # a lazy set decodes one at a time
                batch = preprocess_pixels(
                    chunk,
                    self._image_size,
                    self._mean.tolist(),
                    self._std.tolist(),
                )
                encoded = self.model.encode_image(batch.to(self.device, dtype))
                features.append(F.normalize(encoded.float(), dim=-1).cpu())
        return torch.cat(features)

    # -------------------------------------------------------------- metadata
    @property
    def metadata(self) -> OracleMetadata:
        return self._metadata

    @property
    def logit_scale(self) -> float:
        return self._scale

    @property
    def logit_bias(self) -> float:
        return self._bias

    def text_tower(self) -> FineTunableText:
        if self.tower.has_cls_embedding:
            raise NotImplementedError(
                f"{self.metadata.model}: CoCa text towers (a class embedding appended after "
                "the tokens, pooled there) cannot be fine-tuned here"
            )
        tower = OpenClipTextTower(self.model, self.tokenizer)
        owner = getattr(self.model, "text", None) or self.model
        projection = getattr(owner, "text_projection", None)
        if projection is None:
            return FineTunableText(tower, torch.eye(tower.token_embedding.embedding_dim))
        if isinstance(projection, nn.Linear):
            if projection.bias is not None:
                raise NotImplementedError("a text projection with a bias cannot be fine-tuned here")
            return FineTunableText(tower, projection.weight.detach().float().T.clone())
        return FineTunableText(tower, projection.detach().float().clone())

    def trainable_image_tower(self) -> FineTunableImage:
        """A private fp32 copy of the image tower and the preprocessing the oracle
        encodes with (resize, centre crop, normalize), for white-box methods."""
        tower = copy.deepcopy(self.model.visual).float()
        size, mean, std = self._image_size, self._mean.tolist(), self._std.tolist()

        def preprocess(pixels: np.ndarray) -> torch.Tensor:
            return preprocess_pixels(pixels, size, mean, std)

        return FineTunableImage(tower, preprocess)

    @property
    def uses_prefix_sharing(self) -> bool:
        return self._fast is not None


class OpenClipTextTower(nn.Module):
    """CLIP's text transformer up to the pooled token (a private copy; the projection is apart)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        from open_clip.transformer import text_global_pool

        owner: Any = getattr(model, "text", None) or model
        if not hasattr(owner, "token_embedding"):
            raise NotImplementedError(
                f"{type(owner).__name__} text towers (Hugging Face text models) cannot be "
                "fine-tuned here; use an open_clip model with a native CLIP text transformer"
            )
        self.token_embedding = copy.deepcopy(owner.token_embedding).float()
        self.positional_embedding = nn.Parameter(
            owner.positional_embedding.detach().float().clone()
        )
        self.transformer = copy.deepcopy(owner.transformer).float()
        self.ln_final = copy.deepcopy(owner.ln_final).float()
        mask = getattr(owner, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)
        self.pool_type = getattr(owner, "pool_type", None) or getattr(
            owner, "text_pool_type", "argmax"
        )
        self.eos_id = getattr(owner, "eos_id", getattr(owner, "text_eos_id", None))
        self.tokenizer = tokenizer
        self._pool = text_global_pool

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        device = self.positional_embedding.device
        tokens = self.tokenizer(list(prompts)).to(device)
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        pooled: torch.Tensor = self._pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        return pooled
