"""Attention layers: GQA with partial rotary embeddings over a per-request KV cache.

KV layout: per attention layer, K and V are ``(rows, max_len, kv_heads, head_dim)``; a live
request owns one row and its token at position ``p`` lives at ``[row, p]`` (rows are
contiguous, so a sequence's context is one slice and a kernel reads it in place). The last
row is scratch for pad tokens.

One op, :func:`kv_attention`, writes a step's new K/V into the cache and attends: sequence
``b`` holds ``n_b`` new tokens that end its context of ``context_lens[b]`` tokens, and its
token ``i`` sees the row's positions ``<= context_lens[b] - n_b + i``. Nothing is read
beyond a sequence's context, so time and memory grow with the context, never with
``max_len``. It is a custom op, opaque to ``torch.compile`` (every size inside it may vary
without recompiling):

* the default kernel (CPU and the fallback elsewhere) is a loop of float32 SDPA calls, one
  per sequence, over the row's context slice: the reference;
* on CUDA with fp16/bf16, FlashAttention (PyTorch's ``_flash_attention_forward``) reads the
  rows in place: ``cu_seqlens_k`` holds each row's start in the flattened cache and
  ``seqused_k`` its context length. Prefill is causal with the query block aligned to the
  end of the context; decode (``cu_seqlens=None``, one token per sequence) folds the query
  heads that share a KV head into that head's query rows, so every KV head's context is
  read once. Nothing in either path syncs with the host: decode can be captured in a CUDA
  graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig
from .tp import ShardPlan, plan_of, row_parallel


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


def _bounds(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[int]:
    return list(range(q.shape[0] + 1)) if cu_seqlens is None else cu_seqlens.tolist()


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    kv_rows: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    bounds = _bounds(q, cu_seqlens)
    nseq = len(bounds) - 1
    if kv_rows.shape != (nseq,) or context_lens.shape != (nseq,):
        raise ValueError(f"kv_rows and context_lens: expected ({nseq},) (one per sequence), "
                         f"got {tuple(kv_rows.shape)} and {tuple(context_lens.shape)}")
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(
            b > e for b, e in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {q.shape[0]}")
    rows, max_len = k_cache.shape[:2]
    for b, (row, length) in enumerate(zip(kv_rows.tolist(), context_lens.tolist(),
                                          strict=True)):
        n = bounds[b + 1] - bounds[b]
        if not 0 <= row < rows:
            raise ValueError(f"kv_rows[{b}]: expected a row in [0, {rows}), got {row}")
        if not n <= length <= max_len:
            raise ValueError(f"context_lens[{b}]: expected {n} (its new tokens) to max_len "
                             f"{max_len}, got {length}")


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    kv_rows: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write each sequence's new K/V at the end of its context, then attend causally.

    ``q`` ``(tokens, heads, head_dim)``, ``k``/``v`` ``(tokens, kv_heads, head_dim)``;
    ``cu_seqlens`` ``(nseq+1,)`` offsets of the sequences in the flat tokens, or None for
    one token per sequence; ``kv_rows``/``context_lens`` ``(nseq,)``: each sequence's cache
    row and its context length including the new tokens. Returns ``(tokens, heads,
    head_dim)`` in ``q``'s dtype.
    """
    _check(q, k_cache, cu_seqlens, kv_rows, context_lens)
    bounds = _bounds(q, cu_seqlens)
    out = torch.empty_like(q)
    for b, (row, length) in enumerate(zip(kv_rows.tolist(), context_lens.tolist(),
                                          strict=True)):
        start, end = bounds[b], bounds[b + 1]
        first = length - (end - start)
        if end == start:
            continue
        k_cache[row, first:length] = k[start:end].to(k_cache.dtype)
        v_cache[row, first:length] = v[start:end].to(v_cache.dtype)
        keys = k_cache[row, :length].float().transpose(0, 1)
        values = v_cache[row, :length].float().transpose(0, 1)
        query = q[start:end].float().transpose(0, 1)
        visible = (torch.arange(length, device=q.device)[None, :]
                   <= torch.arange(first, length, device=q.device)[:, None])
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible,
                                             scale=scale, enable_gqa=True)
        out[start:end] = att.transpose(0, 1).to(out.dtype)
    return out


kv_attention = torch.library.custom_op(
    "mamba_ir_models::kv_attention", mutates_args=("k_cache", "v_cache")
)(reference)


@kv_attention.register_fake
def _fake(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return torch.empty_like(q)


def flash_refusal(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the FlashAttention path cannot serve these tensors, or None."""
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return f"needs fp16/bf16 q and cache of the same dtype, got {q.dtype}, {k_cache.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (needs a multiple of 8, at most 256)"
    if not k_cache.is_contiguous():
        return "the KV cache is not contiguous (rows are read in place)"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) < (8, 0):
        return "needs a CUDA device of compute capability 8.0 or newer"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this PyTorch build has no FlashAttention"
    return None


@kv_attention.register_kernel("cuda")
def _flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    kv_rows: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if flash_refusal(q, k_cache) is not None or not v_cache.is_contiguous():
        return reference(q, k, v, k_cache, v_cache, cu_seqlens, kv_rows, context_lens, scale)
    tokens, heads, dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    i32 = torch.int32
    ids = torch.arange(tokens, device=q.device)
    if cu_seqlens is None:
        seq, pos = ids, context_lens.long() - 1
    else:
        cu = cu_seqlens.long()
        seq = torch.searchsorted(cu, ids, right=True) - 1
        pos = context_lens.long()[seq] - cu[seq + 1] + ids
    rows = kv_rows.long()[seq]
    k_cache.index_put_((rows, pos), k.to(k_cache.dtype))
    v_cache.index_put_((rows, pos), v.to(v_cache.dtype))
    starts = kv_rows.to(i32) * max_len
    cu_k = torch.cat([starts, starts[-1:]])
    keys, values = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    used = context_lens.to(i32)
    flash = torch.ops.aten._flash_attention_forward
    if cu_seqlens is not None:
        return flash(q.contiguous(), keys, values, cu_seqlens.to(i32), cu_k, tokens, max_len,
                     0.0, True, False, scale=scale, seqused_k=used)[0]
    # decode: the `group` query heads of one KV head become that head's query rows
    group = heads // kv_heads
    packed = q.reshape(tokens, kv_heads, group, dim).transpose(1, 2).reshape(-1, kv_heads, dim)
    cu_q = torch.arange(0, tokens * group + 1, group, device=q.device, dtype=i32)
    out = flash(packed, keys, values, cu_q, cu_k, group, max_len, 0.0, False, False,
                scale=scale, seqused_k=used)[0]
    return out.reshape(tokens, group, kv_heads, dim).transpose(1, 2).reshape(tokens, heads, dim)


class Attention(nn.Module):
    """GQA over the KV rows; with a :class:`~mamba_ir.models.tp.ShardPlan` of several ranks
    the rank's query heads and the KV heads they read, and a row-parallel ``o_proj``."""

    def __init__(self, config: HybridConfig, plan: ShardPlan | None = None) -> None:
        super().__init__()
        c, plan = config, plan_of(config, None) if plan is None else plan
        self.heads, self.kv_heads = plan.attention_heads, plan.kv_heads
        self.head_dim = c.attention_head_dim
        self.rotary_dim, self.theta = c.rotary_dim, c.rope_theta
        # Granite-4-H scales scores by attention_multiplier
        self.scale = c.attention_multiplier or self.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = row_parallel(self.heads * self.head_dim, c.hidden_size, c.attention_bias,
                                   plan)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        kv_rows: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Flat tokens at ``positions`` (for the rotary embedding); see :func:`kv_attention`
        for the sequence arguments (``cu_seqlens`` None: one token per sequence)."""
        n = hidden.shape[0]
        q = self.q_proj(hidden).unflatten(-1, (self.heads, self.head_dim))
        k = self.k_proj(hidden).unflatten(-1, (self.kv_heads, self.head_dim))
        v = self.v_proj(hidden).unflatten(-1, (self.kv_heads, self.head_dim))
        cos, sin = rotary(positions, self.rotary_dim, self.theta)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = kv_attention(q, k, v, k_cache, v_cache, cu_seqlens, kv_rows, context_lens,
                           self.scale)
        return self.o_proj(out.reshape(n, self.heads * self.head_dim))
