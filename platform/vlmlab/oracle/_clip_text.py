"""CLIP's text tower for a population of soft prompts, without redundant work.

A CoOp prompt is ``[SOS] ctx_1..ctx_m <class tokens> . [EOS]``. CLIP's text
transformer is causal, so the prefix ``[SOS] ctx_1..ctx_m`` never sees the
class tokens: its hidden states (and so its keys and values in every layer)
are the same for all C classes of a candidate. :class:`PrefixSharingEncoder`
therefore runs one sequence per candidate::

    [SOS ctx_1..ctx_m | suffix of class a | suffix of class b | ...]

where each suffix token attends to the prefix and to the earlier tokens of its
own class only. The work saved compared with ``encode_text`` on C prompts
padded to 77 tokens:

- the prefix is projected and transformed once per candidate, not C times;
- nothing is padded: sequences stop at ``[EOS]``, and suffixes of equal length
  are batched together, so attention is computed only where the mask allows;
- class-token embeddings (with their positions) are looked up once per class
  list, not once per call;
- the last layer computes queries, attention output and MLP only at the
  ``[EOS]`` positions, the only ones pooled.

The result equals ``encode_text`` within float tolerance; the tests prove it
on several architectures, and :func:`encode_padded` (the reference used there
and in ``benchmarks/oracle_text_path.py``) runs the model's own ``encode_text``
with the contexts written into its token embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text tower the fast path reads."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    blocks: Sequence[Any]
    """open_clip residual attention blocks (``attn``, ``ln_1``, ``ls_1``, ``mlp`` ...)."""
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Module | None
    causal: bool
    pool_type: str
    eos_id: int | None
    """The id ``pool_type="eos"`` pools at (open_clip's ``eos_id``); unused by other poolings."""
    has_cls_embedding: bool
    context_length: int
    """Token rows the tower reads; CoCa's positional table has one more row, for the
    class embedding it appends after them."""
    encode_text: Any  # the model's own encode_text, for the reference path

    @classmethod
    def from_model(cls, model: nn.Module) -> TextTower:
        text = getattr(model, "text", None)
        if text is not None and not hasattr(text, "token_embedding"):
            raise NotImplementedError(
                f"{type(text).__name__} text towers (Hugging Face text models) are not supported; "
                "use an open_clip model with a native CLIP text transformer"
            )
        owner: Any = text if text is not None else model
        pool_type = getattr(owner, "pool_type", None) or getattr(owner, "text_pool_type", "argmax")
        eos_id = getattr(owner, "eos_id", getattr(owner, "text_eos_id", None))
        has_cls = getattr(owner, "cls_emb", None) is not None
        positions = int(owner.positional_embedding.shape[0])
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            blocks=list(owner.transformer.resblocks),
            ln_final=owner.ln_final,
            text_projection=owner.text_projection,
            causal=getattr(owner, "attn_mask", None) is not None,
            pool_type=str(pool_type),
            eos_id=None if eos_id is None else int(eos_id),
            has_cls_embedding=has_cls,
            context_length=int(getattr(owner, "context_length", positions - int(has_cls))),
            encode_text=model.encode_text,
        )

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.token_embedding.num_embeddings

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in: its blocks' weights' (open_clip's
        ``get_cast_dtype``), not the token table's, which mixed precision keeps in fp32."""
        weight_dtype = getattr(self.blocks[0], "get_weight_dtype", None) if self.blocks else None
        if weight_dtype is not None:
            dtype: torch.dtype = weight_dtype()
            return dtype
        return self.token_embedding.weight.dtype

    def pools_at(self, end_token: int) -> bool:
        """Whether the model pools a prompt's feature at its ``end_token``.

        ``argmax`` pools at the highest id of a row: the end token only when no
        other id can exceed it (CLIP's BPE puts [EOS] last in its vocabulary);
        ``eos`` pools at the first ``eos_id``: the end token only when they agree.
        """
        if self.pool_type == "argmax":
            return end_token == self.vocab_size - 1
        if self.pool_type == "eos":
            return self.eos_id == end_token
        return False

    def supports_prefix_sharing(self, end_token: int) -> str | None:
        """None when the fast path applies to prompts ending in ``end_token``, else
        the reason it does not.

        The fast path computes features only at each class's end token, through
        causal attention, with the standard residual blocks it re-implements; any
        other tower is served exactly by :func:`encode_padded` instead.
        """
        if not self.causal:
            return "the text transformer is bidirectional (no causal mask)"
        if self.has_cls_embedding:
            return "the text tower appends a class embedding (CoCa)"
        if not self.pools_at(end_token):
            return f"text pooling {self.pool_type!r} is not at the end token {end_token}"
        for block in self.blocks:
            attn = getattr(block, "attn", None)
            if (
                not isinstance(attn, nn.MultiheadAttention)
                or not attn._qkv_same_embed_dim
                or attn.in_proj_bias is None
                or hasattr(block, "ln_1_kv")
                or not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
            ):
                return f"{type(block).__name__} blocks are not standard residual attention blocks"
        return None

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        projection = self.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Module):
            projected: torch.Tensor = projection(pooled)
            return projected
        return pooled @ projection


@dataclass(frozen=True)
class _Group:
    """Classes whose suffixes have the same length, contiguous in the sequence."""

    start: int  # first token of the group, counted from the start of the sequence
    count: int  # classes in the group
    length: int  # suffix tokens per class (end token included)


@dataclass(frozen=True)
class SuffixPlan:
    """Everything about a (class list, context length) pair that calls reuse."""

    n_context: int
    suffix_inputs: torch.Tensor  # (T, W): token + position embeddings, length-sorted order
    groups: tuple[_Group, ...]
    end_positions: torch.Tensor  # (C,) positions of each [EOS], length-sorted order
    restore_order: torch.Tensor  # (C,) index that puts sorted classes back in label order


class PrefixSharingEncoder:
    """Encodes ``P`` candidates x ``C`` classes with each prefix computed once.

    Args:
        tower: the text tower to run (its modules are used as they are).
        start_token: the [SOS] id.
        end_token: the [EOS] id every suffix ends with (where features are pooled).
        max_tokens_per_chunk: candidates are processed in chunks whose
            sequences hold at most this many tokens together, to bound memory;
            a class list too long for one sequence (C = 1,000 ImageNet classes:
            about 4,000 suffix tokens) is split into sequences that fit
            (:meth:`encode_classes`), each with its own copy of the prefix.
            Peak activation memory is then set by this bound, not by P or C.
    """

    def __init__(
        self,
        tower: TextTower,
        start_token: int,
        end_token: int,
        *,
        max_tokens_per_chunk: int = 8192,
    ):
        reason = tower.supports_prefix_sharing(end_token)
        if reason is not None:
            raise NotImplementedError(f"prefix sharing does not apply: {reason}")
        self.tower = tower
        self.start_token = start_token
        self.max_tokens_per_chunk = max_tokens_per_chunk
        self._plans: dict[tuple[tuple[tuple[int, ...], ...], int], SuffixPlan] = {}

    def plan(self, suffixes: Sequence[Sequence[int]], n_context: int) -> SuffixPlan:
        """Sort classes by suffix length and embed their tokens once (memoized)."""
        key = (tuple(tuple(s) for s in suffixes), n_context)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        order = sorted(range(len(suffixes)), key=lambda c: len(suffixes[c]))
        prefix_len = n_context + 1
        ids: list[int] = []
        positions: list[int] = []
        end_positions: list[int] = []
        groups: list[_Group] = []
        cursor = prefix_len
        for c in order:
            tokens = list(suffixes[c])
            length = len(tokens)
            if groups and groups[-1].length == length:
                last = groups[-1]
                groups[-1] = _Group(last.start, last.count + 1, length)
            else:
                groups.append(_Group(cursor, 1, length))
            ids.extend(tokens)
            positions.extend(range(prefix_len, prefix_len + length))
            cursor += length
            end_positions.append(cursor - 1)
        device = self.tower.token_embedding.weight.device
        # Normal tensors, not inference tensors, even when a logits call (in inference
        # mode) builds the plan: a differentiable encode (CoOp) reuses the cached plan.
        with torch.inference_mode(False), torch.no_grad():
            id_tensor = torch.tensor(ids, device=device)
            suffix_inputs = self.tower.token_embedding(id_tensor).to(self.tower.dtype)
            suffix_inputs = suffix_inputs + self.tower.positional_embedding[positions].to(
                self.tower.dtype
            )
            restore = torch.empty(len(order), dtype=torch.long)
            restore[torch.tensor(order)] = torch.arange(len(order))
            plan = SuffixPlan(
                n_context=n_context,
                suffix_inputs=suffix_inputs,
                groups=tuple(groups),
                end_positions=torch.tensor(end_positions, device=device),
                restore_order=restore.to(device),
            )
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def encode_classes(
        self, contexts: torch.Tensor, suffixes: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Text features ``P x C x E`` of every class, the class list split into
        sequences of at most ``max_tokens_per_chunk`` tokens where it is longer.

        Exact: a class's tokens attend only to the prefix and to themselves, so
        which other classes share its sequence changes nothing but the float
        summation order of the batched products.
        """
        n_context = contexts.shape[1]
        room = max(1, self.max_tokens_per_chunk - (n_context + 1))
        parts: list[list[Sequence[int]]] = [[]]
        used = 0
        for suffix in suffixes:
            if parts[-1] and used + len(suffix) > room:
                parts.append([])
                used = 0
            parts[-1].append(suffix)
            used += len(suffix)
        features = [self.encode(contexts, self.plan(part, n_context)) for part in parts]
        return features[0] if len(features) == 1 else torch.cat(features, dim=1)

    def encode(self, contexts: torch.Tensor, plan: SuffixPlan) -> torch.Tensor:
        """Text features ``P x C x E`` (projected, not normalized)."""
        population, n_context, _ = contexts.shape
        if n_context != plan.n_context:
            raise ValueError(f"plan was built for {plan.n_context} context tokens, got {n_context}")
        sequence_len = n_context + 1 + plan.suffix_inputs.shape[0]
        chunk = max(1, self.max_tokens_per_chunk // sequence_len)
        outputs = [
            self._encode_chunk(contexts[i : i + chunk], plan) for i in range(0, population, chunk)
        ]
        return torch.cat(outputs, dim=0)

    def _encode_chunk(self, contexts: torch.Tensor, plan: SuffixPlan) -> torch.Tensor:
        tower = self.tower
        dtype, device = tower.dtype, tower.token_embedding.weight.device
        population, n_context, width = contexts.shape
        prefix_len = n_context + 1
        positional = tower.positional_embedding.to(dtype)

        start = tower.token_embedding(torch.tensor([self.start_token], device=device)).to(dtype)
        prefix = torch.cat(
            [
                (start + positional[:1]).expand(population, 1, width),
                contexts.to(device=device, dtype=dtype) + positional[1:prefix_len],
            ],
            dim=1,
        )
        x = torch.cat([prefix, plan.suffix_inputs.expand(population, -1, -1)], dim=1)

        last = len(tower.blocks) - 1
        for i, block in enumerate(tower.blocks):
            if i < last:
                x = x + block.ls_1(self._attention(block, block.ln_1(x), plan, prefix_len))
            else:
                ends = x[:, plan.end_positions]
                x = ends + block.ls_1(
                    self._attention(block, block.ln_1(x), plan, prefix_len, ends_only=True)
                )
            x = x + block.ls_2(block.mlp(block.ln_2(x)))

        pooled = tower.ln_final(x)  # (P, C, W): one row per class, length-sorted
        features = tower.project(pooled)
        return features[:, plan.restore_order].float()

    @staticmethod
    def _attention(
        block: nn.Module,
        hidden: torch.Tensor,
        plan: SuffixPlan,
        prefix_len: int,
        *,
        ends_only: bool = False,
    ) -> torch.Tensor:
        """Multi-head attention of the packed sequence, block-sparse by construction.

        With ``ends_only`` only the [EOS] queries are computed (last layer), and the
        result has one row per class instead of one per token.
        """
        attn: Any = block.attn  # nn.MultiheadAttention
        heads = attn.num_heads
        population, seq_len, width = hidden.shape
        head_dim = width // heads
        scale = 1.0 / math.sqrt(head_dim)
        weight, bias = attn.in_proj_weight, attn.in_proj_bias

        if ends_only:
            # Keys and values everywhere, queries only where the features are pooled.
            kv = F.linear(hidden, weight[width:], bias[width:])
            key, value = kv.view(population, seq_len, 2, heads, head_dim).unbind(2)
            query = None
        else:
            qkv = F.linear(hidden, weight, bias)
            query, key, value = qkv.view(population, seq_len, 3, heads, head_dim).unbind(2)

        # (P, H, prefix, d) views of the prefix keys and values, shared by all classes.
        key_prefix = key[:, :prefix_len].transpose(1, 2)
        value_prefix = value[:, :prefix_len].transpose(1, 2)
        pieces: list[torch.Tensor] = []
        if not ends_only:
            assert query is not None
            prefix_out = F.scaled_dot_product_attention(
                query[:, :prefix_len].transpose(1, 2), key_prefix, value_prefix, is_causal=True
            )
            pieces.append(prefix_out.transpose(1, 2).reshape(population, prefix_len, width))

        key_prefix_b = key_prefix.unsqueeze(2)  # (P, H, 1, prefix, d): broadcast over classes
        value_prefix_b = value_prefix.unsqueeze(2)
        for group in plan.groups:
            n, length = group.count, group.length
            span = slice(group.start, group.start + n * length)
            # (P, H, n, L, d)
            key_g = (
                key[:, span].reshape(population, n, length, heads, head_dim).permute(0, 3, 1, 2, 4)
            )
            value_g = (
                value[:, span]
                .reshape(population, n, length, heads, head_dim)
                .permute(0, 3, 1, 2, 4)
            )
            if ends_only:
                end_rows = hidden[:, span].reshape(population, n, length, width)[:, :, -1]
                query_g = F.linear(end_rows, weight[:width], bias[:width])
                query_g = query_g.view(population, n, 1, heads, head_dim).permute(0, 3, 1, 2, 4)
            else:
                assert query is not None
                query_g = (
                    query[:, span]
                    .reshape(population, n, length, heads, head_dim)
                    .permute(0, 3, 1, 2, 4)
                )
            query_g = query_g * scale
            scores_prefix = query_g @ key_prefix_b.transpose(-1, -2)  # (P, H, n, Lq, prefix)
            scores_self = query_g @ key_g.transpose(-1, -2)  # (P, H, n, Lq, L)
            if not ends_only and length > 1:
                causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
                scores_self = scores_self.masked_fill(causal, float("-inf"))
            weights = torch.softmax(torch.cat([scores_prefix, scores_self], dim=-1), dim=-1)
            out = weights[..., :prefix_len] @ value_prefix_b + weights[..., prefix_len:] @ value_g
            rows = 1 if ends_only else length
            pieces.append(out.permute(0, 2, 3, 1, 4).reshape(population, n * rows, width))

        merged = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        projected: torch.Tensor = attn.out_proj(merged)
        return projected


def encode_padded(
    tower: TextTower,
    contexts: torch.Tensor,
    token_rows: torch.Tensor,
    n_context: int,
) -> torch.Tensor:
    """Reference path: the model's own ``encode_text``, one candidate at a time.

    ``token_rows`` (C x context_length) hold ``[SOS] X..X <class> . [EOS] 0..``;
    a forward hook writes each candidate's contexts over the X embeddings.
    Works for any open_clip text tower with a token embedding.
    """
    device = tower.token_embedding.weight.device
    current: dict[str, torch.Tensor] = {}

    def overwrite_contexts(
        _module: nn.Module, _inputs: object, output: torch.Tensor
    ) -> torch.Tensor:
        output = output.clone()
        output[:, 1 : 1 + n_context] = current["ctx"].to(output.dtype)
        return output

    handle = tower.token_embedding.register_forward_hook(overwrite_contexts)
    try:
        features = []
        for candidate in contexts:
            current["ctx"] = candidate.to(device)
            features.append(tower.encode_text(token_rows.to(device)).float())
    finally:
        handle.remove()
    return torch.stack(features)
