"""OscarModel: BERT over `[text ; regions]` (microsoft/Oscar `oscar/modeling/modeling_bert.py` `BertImgModel`), with
an optional key/value cache.

Text goes through the BERT embeddings (word + position + token type, LayerNorm, dropout). Each region's
2054-d vector goes through Linear(img_feature_dim → hidden) [+ LayerNorm] + dropout, with no position or
segment embedding. The concatenation runs through post-LN BERT layers (`modeling/bert.py`), whose attention is
`F.scaled_dot_product_attention` with the original's additive mask: Oscar's 2-D or 3-D 0/1 masks become
`(1 - mask) * -10000`, which also keeps fully-masked padding rows finite. The cache holds the keys/values of
positions that later steps attend to, used by decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mengzi_ray.modeling.attention import Packing, Queries, packed_attention
from mengzi_ray.modeling.bert import BertLayer, KeyValues, Pooler, TextEmbeddings
from mengzi_ray.modeling.config import OscarConfig

# One (keys, values) per layer, each (batch, heads, cached_positions, head_dim).
KVCache = list[KeyValues]


@dataclass
class OscarOutput:
    last_hidden_state: torch.Tensor  # (B, T+R, H)
    pooler_output: torch.Tensor  # (B, H), tanh(Linear(h[:, 0]))
    layer_kv: KVCache | None = None  # keys/values of this call's positions, when asked for


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 mask (B, N) or (B, N, N) → additive bias (B, 1, 1, N) or (B, 1, N, N): 0 where allowed, -10000 not."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, :, :]
    else:
        raise ValueError(f"attention_mask must be 2-D (B, N) or 3-D (B, N, N), got shape {tuple(mask.shape)}")
    return (1.0 - mask.to(dtype)) * -10000.0


class OscarModel(nn.Module):
    """The shared trunk. State-dict keys are the original's `bert.*` keys without the `bert.` prefix."""

    def __init__(self, config: OscarConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(
            config.vocab_size, config.hidden_size, config.max_position_embeddings, config.type_vocab_size,
            config.layer_norm_eps, config.hidden_dropout_prob,
        )
        # Regions: no position/segment embedding. Original keys: bert.img_embedding.*, bert.LayerNorm.* (image LN).
        self.img_embedding = nn.Linear(config.img_feature_dim, config.hidden_size)
        self.LayerNorm = (
            nn.LayerNorm(config.hidden_size, eps=config.img_layer_norm_eps) if config.use_img_layernorm else None
        )
        self.img_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(
                config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                config.layer_norm_eps, config.hidden_dropout_prob, config.attention_probs_dropout_prob,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.pooler = Pooler(config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.gradient_checkpointing = False  # set by the training step (optim.gradient_checkpointing)

    def embed_regions(self, img_feats: torch.Tensor) -> torch.Tensor:
        if img_feats.dim() != 3 or img_feats.shape[-1] != self.config.img_feature_dim:
            raise ValueError(
                f"img_feats must be (B, R, {self.config.img_feature_dim}), got {tuple(img_feats.shape)}"
            )
        x = self.img_embedding(img_feats)
        if self.LayerNorm is not None:
            x = self.LayerNorm(x)
        return self.img_dropout(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        img_feats: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        return_kv: bool = False,
    ) -> OscarOutput:
        """Encode text (B, T) followed by regions (B, R, D).

        attention_mask: 0/1, (B, K) or (B, N, K) where N = T + R queries and K = cached + N keys; with `past_kv`,
        the mask's last K columns are [cached positions, then this call's positions]. Returns hidden states of
        this call's positions; with `return_kv` also each layer's keys/values of those positions.
        """
        hidden = self._embed(input_ids, attention_mask, token_type_ids, img_feats, position_ids, past_kv)
        bias = additive_attention_mask(attention_mask, hidden.dtype)
        layer_kv: KVCache = []
        for i, layer in enumerate(self.encoder.layer):
            hidden, kv = self._run(layer, hidden, bias, past_kv[i] if past_kv else None)
            layer_kv.append(kv)
        pooled = self.pooler(hidden)
        return OscarOutput(hidden, pooled, layer_kv if return_kv else None)

    def forward_read_out(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        read_out: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        img_feats: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training forward that returns only the final hidden states at `read_out` (B, T) or (B, T+R) 0/1
        positions, as (M, H) in row-major order (what `last_hidden_state[read_out == 1]` would give).

        The trunk runs packed (attention.Packing: positions nobody attends are skipped) and the last layer
        computes only the read-out rows; no pooler. Same values as `forward`, less work; ValueError when a
        read-out position is padding."""
        hidden = self._embed(input_ids, attention_mask, token_type_ids, img_feats, position_ids, None)
        bias = additive_attention_mask(attention_mask, hidden.dtype)
        packing = Packing.from_mask(attention_mask)
        wanted = F.pad(read_out, (0, hidden.shape[1] - read_out.shape[1])).reshape(-1)
        position = torch.nonzero(wanted == 1).squeeze(1)
        queries = Queries(packing.locate(position), position)
        hidden = packing.pack(hidden)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            hidden = self._run(self._packed_layer, layer, hidden, bias, packing, queries if i == last else None)
        return hidden

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), recomputed in the backward pass instead of stored when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _packed_layer(
        self, layer: BertLayer, hidden: torch.Tensor, bias: torch.Tensor, packing: Packing, queries: Queries | None
    ) -> torch.Tensor:
        """One post-LN BERT layer on packed tokens (T, H); with `queries` only their rows come out (M, H)."""
        attn = layer.attention.self
        rows = hidden if queries is None else hidden.index_select(0, queries.token)
        dropout = self.attention_dropout if self.training else 0.0
        ctx = packed_attention(
            attn.query(rows), attn.key(hidden), attn.value(hidden), bias, self.config.num_attention_heads, dropout,
            packing, queries,
        )
        rows = layer.attention.output(ctx, rows)
        return layer.output(layer.intermediate(rows), rows)

    def _embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        img_feats: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_kv: KVCache | None,
    ) -> torch.Tensor:
        """(B, T+R, H) embeddings of text then regions, after checking the mask fits them (and the cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        if img_feats is not None:
            hidden = torch.cat([hidden, self.embed_regions(img_feats.to(hidden.dtype))], dim=1)
        num_keys = hidden.shape[1] + (past_kv[0][0].shape[2] if past_kv else 0)
        if attention_mask.shape[-1] != num_keys or attention_mask.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not fit batch {hidden.shape[0]} with "
                f"{num_keys} attended positions (text {input_ids.shape[1]} + regions "
                f"{0 if img_feats is None else img_feats.shape[1]} + cached)"
            )
        return hidden
