"""The hybrid decoder: embeddings, Mamba2 / attention layers, final norm, LM head.

Two step functions, both over flat tokens and the :class:`~mamba_ir.models.cache.StateCache`:
:meth:`HybridModel.prefill` (varlen chunks, each sequence starting from a state slot) and
:meth:`HybridModel.decode` (one token per sequence, pad rows allowed). Both return float32
logits of each sequence's last token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .attention import Attention
from .cache import StateCache
from .config import ATTENTION, HybridConfig
from .mixer import Mamba2Mixer
from .tp import ShardPlan, TensorParallel, plan_of, row_parallel


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    def __init__(self, config: HybridConfig, plan: ShardPlan | None = None) -> None:
        super().__init__()
        plan = plan_of(config, None) if plan is None else plan
        c, size = config, plan.mlp_size
        self.gate_proj = nn.Linear(c.hidden_size, size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, size, bias=c.mlp_bias)
        self.down_proj = row_parallel(size, c.hidden_size, c.mlp_bias, plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """``norm -> mixer|attn -> +residual [-> ffn_norm -> mlp -> +residual]``."""

    def __init__(self, config: HybridConfig, kind: str, plan: ShardPlan | None = None
                 ) -> None:
        super().__init__()
        self.kind = kind
        self.residual_in_fp32 = config.residual_in_fp32
        self.residual_multiplier = config.residual_multiplier
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        if kind == ATTENTION:
            self.attn = Attention(config, plan)
        else:
            self.mixer = Mamba2Mixer(config, plan)
        if config.intermediate_size:
            self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.mlp = MLP(config, plan)

    def _residual(self, residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32:
            residual = residual.float()
        scale = self.residual_multiplier  # Granite-4-H; 1.0 elsewhere
        hidden = residual + out * scale if scale != 1.0 else residual + out
        if hasattr(self, "mlp"):
            mlp = self.mlp(self.ffn_norm(hidden))
            hidden = hidden + mlp * scale if scale != 1.0 else hidden + mlp
        return hidden

    def _in(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden.to(self.norm.weight.dtype))


class HybridModel(nn.Module):
    """The decoder; with ``tp`` (a :class:`~mamba_ir.models.tp.TensorParallel` of several
    ranks) this rank's shard of it (:mod:`mamba_ir.models.tp`): the same step functions,
    run on every rank with the same arguments, give every rank the unsharded logits."""

    def __init__(self, config: HybridConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.plan = plan_of(config, tp)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kind, self.plan)
                                    for kind in config.layer_types)
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        scale = self.config.embedding_multiplier  # Granite-4-H; 1.0 elsewhere
        return self.embed(tokens) * scale if scale != 1.0 else self.embed(tokens)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_norm(hidden)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        scaling = self.config.logits_scaling  # Granite-4-H; 1.0 elsewhere
        return logits / scaling if scaling != 1.0 else logits

    def prefill(
        self,
        cache: StateCache,
        block_size: int,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        kv_rows: torch.Tensor,
        context_lens: torch.Tensor,
        slots: torch.Tensor,
        src_slots: torch.Tensor,
        num_computed: torch.Tensor,
        checkpoint_slots: torch.Tensor,
        window_slots: torch.Tensor,
        window_index: torch.Tensor,
    ) -> torch.Tensor:
        """Run varlen chunks (``cu_seqlens`` over flat ``tokens``); logits ``(seqs, vocab)``.

        Sequence i's tokens sit at ``positions`` of KV row ``kv_rows[i]`` and end a context
        of ``context_lens[i]`` tokens. Its Mamba layers start from the state in
        ``src_slots[i]`` (a cached checkpoint, the zero slot for a fresh request, or
        ``slots[i]`` itself to continue), ``num_computed[i]`` tokens into the request, and
        leave their state in ``slots[i]``; block-boundary checkpoints go to
        ``checkpoint_slots`` / ``window_slots`` (see :meth:`Mamba2Mixer.prefill`).
        """
        hidden = self._embed(tokens)
        pad = cache.pad_slot_id
        for i, layer in enumerate(self.layers):
            x = layer._in(hidden)
            if layer.kind == ATTENTION:
                out = layer.attn(x, positions, *cache.kv(i), cu_seqlens, kv_rows, context_lens)
            else:
                out = layer.mixer(
                    x, *cache.states(i), cache.ssm_scale(i), cu_seqlens, slots, src_slots, pad,
                    block_size, num_computed, checkpoint_slots, window_slots, window_index,
                    prefill=True, ring=cache.ring(i),
                )
            hidden = layer._residual(hidden, out)
        return self._logits(hidden[cu_seqlens[1:] - 1])

    def decode(
        self,
        cache: StateCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv_rows: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One token per sequence at ``positions`` (its context is ``positions + 1``
        tokens); logits ``(batch, vocab)``. Pad rows carry ``pad_slot_id``."""
        hidden = self._embed(tokens)
        pad = cache.pad_slot_id
        context_lens = positions + 1
        cache.advance_seeds()
        for i, layer in enumerate(self.layers):
            x = layer._in(hidden)
            if layer.kind == ATTENTION:
                out = layer.attn(x, positions, *cache.kv(i), None, kv_rows, context_lens)
            else:
                out = layer.mixer(x, *cache.states(i), cache.ssm_scale(i), slots, pad,
                                  cache.rand_seed(i), prefill=False, ring=cache.ring(i))
            hidden = layer._residual(hidden, out)
        return self._logits(hidden)

    def save_slots(self, cache: StateCache, src: Sequence[int], dst: Sequence[int]) -> None:
        """Checkpoint running slots ``src`` into slots ``dst`` in every Mamba layer: a copy
        (:meth:`StateCache.copy_slots`), except that under replay decode each SSM row
        becomes the state its checkpoint and ring stand for, with an empty ring, so a
        prefix hit starts from the state itself."""
        if cache.decode != "replay":
            cache.copy_slots(src, dst)
            return
        device, pad = cache.conv_device, cache.pad_slot_id
        s = torch.tensor(src, dtype=torch.int32, device=device)
        d = torch.tensor(dst, dtype=torch.int32, device=device)
        for i in cache.mamba_layers:
            conv, ssm = cache.states(i)
            ops.copy_state_blocks(conv, s, d, pad)
            self.layers[i].mixer.materialize(ssm, cache.ring(i), s, d, pad)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
