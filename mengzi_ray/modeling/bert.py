"""The BERT blocks OscarModel is built from, written here so the model does not depend on transformers' internals.

Parameter names are those of Google's BERT as the original Oscar (pytorch_transformers 1.x,
`modeling_bert.BertEmbeddings` / `BertLayer` / `BertPooler` / `BertPredictionHeadTransform`) saved them, so original
state dicts load unchanged: `embeddings.{word,position,token_type}_embeddings`, `embeddings.LayerNorm`,
`attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`, `intermediate.dense`,
`output.{dense,LayerNorm}`, `pooler.dense`, `transform.{dense,LayerNorm}`. Layers are post-LN:
LayerNorm(x + dropout(dense(y))). Submodules are created in the original's order, so a seeded model draws the same
initial weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mengzi_ray.modeling.attention import attend

# The activations pytorch_transformers' BERT accepted by name in config.json (`hidden_act`); "gelu" is the exact
# erf form, as in the original.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config's `hidden_act` names; ValueError naming the accepted ones otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported (one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# Per layer: (keys, values), each (batch, heads, positions, head_dim).
KeyValues = tuple[torch.Tensor, torch.Tensor]


class TextEmbeddings(nn.Module):
    """LayerNorm(word + token type + position) then dropout: ids (B, T) → (B, T, hidden). [PAD] is id 0."""

    def __init__(
        self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int, eps: float, dropout: float
    ):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """position_ids (B, T) or None for 0..T-1."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over [cached keys/values ; this call's positions]."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, hidden_size // num_heads, dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, past: KeyValues | None
    ) -> tuple[torch.Tensor, KeyValues]:
        """hidden (B, N, H); bias additive, broadcastable to (B, heads, N, cached + N). Returns the context
        (B, N, H) and this call's own keys/values (not the cached ones), for the caller to cache."""
        b, n, _ = hidden.shape
        q, k, v = (
            proj(hidden).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        ctx = attend(q, k, v, bias, self.dropout if self.training else 0.0)
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim), new_kv


class AddNorm(nn.Module):
    """LayerNorm(residual + dropout(dense(x))): BERT's `attention.output` and `output` blocks."""

    def __init__(self, in_size: int, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """`attention.self` then `attention.output`."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float, hidden_dropout: float, attention_dropout: float):
        super().__init__()
        self.self = SelfAttention(hidden_size, num_heads, attention_dropout)
        self.output = AddNorm(hidden_size, hidden_size, eps, hidden_dropout)


class Intermediate(nn.Module):
    """activation(dense(x)): hidden → intermediate size."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN encoder layer: self-attention + add & norm, feed-forward + add & norm."""

    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, activation: str, eps: float,
        hidden_dropout: float, attention_dropout: float,
    ):
        super().__init__()
        self.attention = Attention(hidden_size, num_heads, eps, hidden_dropout, attention_dropout)
        self.intermediate = Intermediate(hidden_size, intermediate_size, activation)
        self.output = AddNorm(intermediate_size, hidden_size, eps, hidden_dropout)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, past: KeyValues | None = None
    ) -> tuple[torch.Tensor, KeyValues]:
        """hidden (B, N, H), bias as SelfAttention's → (new hidden (B, N, H), this call's keys/values)."""
        ctx, kv = self.attention.self(hidden, bias, past)
        hidden = self.attention.output(ctx, hidden)
        return self.output(self.intermediate(hidden), hidden), kv


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): (B, N, H) → (B, H)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class HeadTransform(nn.Module):
    """LayerNorm(activation(dense(x))): the MLM head's `predictions.transform`."""

    def __init__(self, hidden_size: int, activation: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = activation_fn(activation)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))
