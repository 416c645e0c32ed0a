"""Attention for the Oscar trunk, padded or packed, and the token packing the training step runs on.

`attend` is the one attention function of every layer: `F.scaled_dot_product_attention` with the original's
additive bias (`(1 - mask) * -10000`, see oscar.additive_attention_mask), on CPU and GPU alike.

Packing (training only). A position that no query attends to (an all-zero mask column: caption padding, tag
padding, missing regions) never reaches another position's output: its keys and values are multiplied by
softmax weights of exp(-10000 + s) = 0 in fp32/bf16. Its own row of hidden states is therefore dead work, and a
loss that reads only live positions (captioning: the masked caption tokens) is the same whether the trunk
computes it or not. `Packing` keeps the live positions of a (B, N) batch as one flat (T, H) token list: the dense
parts of a layer (Q/K/V, output projections, feed-forward, LayerNorms) run on T ≤ B·N rows, and only the
attention itself scatters the tokens back into the padded (B, heads, N, d) layout. For the training layout of
the captioning card (70 text + 50 regions) about a quarter of the positions are padding.

`Queries` narrows the last layer further: when only a few positions are read out (the masked tokens), only
their rows need queries, attention output and feed-forward in the final layer; keys and values still come from
every live token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Packing:
    """The live positions of a (B, N) batch. `index` (T,): flat indices b·N + n of live positions, row-major."""

    index: torch.Tensor
    batch: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packing":
        """Live = attended by at least one query: a 2-D (B, N) 0/1 mask is its own answer, a 3-D (B, N, N) mask
        is live where its column holds any 1."""
        live = attention_mask if attention_mask.dim() == 2 else attention_mask.amax(dim=1)
        batch, length = live.shape
        return cls(torch.nonzero(live.reshape(-1) > 0).squeeze(1), batch, length)

    @property
    def tokens(self) -> int:
        return int(self.index.shape[0])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) → (T, ...), the live positions in row-major order."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) → (B, N, ...) with zeros at dead positions (differentiable in `x`)."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])

    def locate(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices into the packed tokens of `positions` (K,) flat b·N + n indices, each of which must be live."""
        slot = torch.full((self.batch * self.length,), -1, dtype=torch.long, device=self.index.device)
        slot[self.index] = torch.arange(self.tokens, device=self.index.device)
        found = slot[positions]
        if bool((found < 0).any()):
            raise ValueError("a position to read out is never attended (padding): it has no live hidden state")
        return found


@dataclass(frozen=True)
class Queries:
    """The rows the last layer computes: `token` (M,) indices into the packed tokens, `position` (M,) their flat
    b·N + n positions (to pick each one's key row and mask row)."""

    token: torch.Tensor
    position: torch.Tensor


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H) → (B, heads, N, H / heads)."""
    b, n, h = x.shape
    return x.view(b, n, heads, h // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) → (B, N, heads·d)."""
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, Nq, d) queries over (B, heads, Nk, d) keys/values with the
    additive bias (B, 1, 1|Nq, Nk); scale 1/sqrt(d) as the original. Returns (B, heads, Nq, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    dropout_p: float,
    packing: Packing,
    queries: Queries | None = None,
) -> torch.Tensor:
    """Attention over packed tokens. k, v: (T, H) for every live token; q: (T, H), or (M, H) for `queries` only.
    bias: the padded (B, 1, 1|N, N) additive mask. Returns the context, (T, H) or (M, H)."""
    keys, values = split_heads(packing.unpack(k), heads), split_heads(packing.unpack(v), heads)
    if queries is None:
        ctx = attend(split_heads(packing.unpack(q), heads), keys, values, bias, dropout_p)
        return packing.pack(merge_heads(ctx))
    # One query per selected row: batch the rows as (M, heads, 1, d) against their own row's keys.
    row = torch.div(queries.position, packing.length, rounding_mode="floor")
    col = queries.position - row * packing.length
    row_bias = bias[row, :, col if bias.shape[2] > 1 else torch.zeros_like(col)].unsqueeze(2)  # (M, 1, 1, N)
    m, h = q.shape
    ctx = attend(q.view(m, 1, heads, h // heads).transpose(1, 2), keys[row], values[row], row_bias, dropout_p)
    return ctx.reshape(m, h)
