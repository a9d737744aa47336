"""Attention layers: GQA with partial rotary embeddings and a per-request KV cache.

The IR covers only the state-space layers, so attention is plain PyTorch SDPA. Each token
carries the KV row of its request and its position: its key/value are written at
``(row, position)`` and it attends to that row's positions ``<= position``. The same code
serves a varlen prefill chunk and a padded decode batch (pad tokens use a scratch row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig


def rotary(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, ``(tokens, dim)``, for the first ``dim`` channels of each head."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = rot.shape[-1] // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([rot * cos + turned * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        c = config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.attention_head_dim
        self.rotary_dim, self.theta = c.rotary_dim, c.rope_theta
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_rows: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        q = self.q_proj(hidden).unflatten(-1, (self.heads, self.head_dim))
        k = self.k_proj(hidden).unflatten(-1, (self.kv_heads, self.head_dim))
        v = self.v_proj(hidden).unflatten(-1, (self.kv_heads, self.head_dim))
        cos, sin = rotary(positions, self.rotary_dim, self.theta)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_cache.index_put_((kv_rows, positions), k.to(k_cache.dtype))
        v_cache.index_put_((kv_rows, positions), v.to(v_cache.dtype))

        # (tokens, kv_heads, max_len, head_dim): every token sees its request's whole row
        keys = k_cache[kv_rows].transpose(1, 2).to(q.dtype)
        values = v_cache[kv_rows].transpose(1, 2).to(q.dtype)
        visible = torch.arange(k_cache.shape[1], device=hidden.device) <= positions[:, None]
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=visible[:, None, None, :], enable_gqa=True
        )
        return self.o_proj(out.reshape(n, self.heads * self.head_dim))
