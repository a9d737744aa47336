"""The Mamba2 mixer: in_proj -> (z, xBC, dt), causal conv, SSM, gated norm, out_proj.

Every state access goes through the IR ops. Prefill runs ``causal_conv1d_fn`` and the
chunked scan ``mamba_chunk_scan`` over whole prompts; decode runs ``causal_conv1d_update``
and ``selective_state_update``. Both read and write each sequence's *running* slot.
Prefill first issues ``copy_state_blocks(src -> running)`` so a sequence can start from a
cached checkpoint (or from the all-zero slot): the compiler folds that copy into the
conv/scan call when the chosen provider can read from a source slot, and keeps it
otherwise.

Align-mode checkpoints inside a prefill step: the scan stores the SSM state at every block
boundary into the given checkpoint slots, and the conv window at a boundary -- the
``width - 1`` conv inputs before it -- is gathered from the step's own inputs, or from the
sequence's initial window for a boundary within its first ``width - 1`` tokens.

A quantized SSM state (``ssm_scale`` given) is read and written by decode's
``selective_state_update`` as it is. ``mamba_chunk_scan`` takes float states only, so
prefill runs it on float32 scratch rows: the running rows dequantized after the copy, and
the final and checkpoint states quantized back into their slots after the scan (rows the
scan does not write, and pads, go to the cache's scratch slot). This interim path costs one
float32 row per sequence and checkpoint for the step; a chunk scan reading and writing the
quantized rows itself would need none.

Replay decode (``ring``: the layer's ring tensors) runs ``replay_state_update`` instead of
``selective_state_update``: the SSM state row is a checkpoint and a ring of the inputs since
it. Prefill writes plain states and empties the ring of every row it writes (the running
rows and the block checkpoints), so a request never reads the ring of the request that had
its slot before; a block checkpoint taken during decode is the materialised state
(:meth:`Mamba2Mixer.materialize`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, ops
from ..ops._quant import quantize, values
from ..ops._rows import checkpoint_columns
from .cache import SCRATCH_SLOT
from .config import HybridConfig
from .tp import ShardPlan, plan_of, row_parallel, shared_group_mean

# the scan's chunk: the Triton provider's tile along tokens, vLLM's default for Mamba2
CHUNK_SIZE = 256


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm_per_group(x * silu(gate))`` in float32 (the norm after the gate).

    Under tensor parallelism with fewer groups than ranks (``plan.norm_ranks > 1``) this
    rank holds part of one group: the mean square is summed with the ranks sharing it."""

    def __init__(self, size: int, groups: int, eps: float, plan: ShardPlan | None = None
                 ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps
        # with a group shared by several ranks: the group this rank holds, of how many,
        # the process group and the group's width
        self.shared = None
        if plan is not None and plan.norm_ranks > 1:
            c = plan.config
            self.shared = (plan.first_group, c.mamba_n_groups, plan.tp.group,
                           c.intermediate_mamba // c.mamba_n_groups)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        h = h.unflatten(-1, (self.groups, -1))
        if self.shared is None:
            mean_square = h.pow(2).mean(-1, keepdim=True)
        else:
            mean_square = shared_group_mean(h.pow(2).sum(-1, keepdim=True), *self.shared)
        h = h * torch.rsqrt(mean_square + self.eps)
        return self.weight * h.flatten(-2).to(dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba2 layer over flat tokens ``(tokens, hidden)``; states live in the cache.

    With a :class:`~mamba_ir.models.tp.ShardPlan` of several ranks it is the rank's shard:
    its heads, groups and conv channels (the ops see a layer of that many), the gated norm
    over its channels and a row-parallel ``out_proj``."""

    def __init__(self, config: HybridConfig, plan: ShardPlan | None = None) -> None:
        super().__init__()
        c, plan = config, plan_of(config, None) if plan is None else plan
        self.heads, self.head_dim = plan.mamba_heads, c.mamba_d_head
        self.groups, self.d_state = plan.mamba_groups, c.mamba_d_state
        self.inner = plan.inner
        self.conv_dim = plan.conv_dim
        self.in_proj = nn.Linear(c.hidden_size, self.inner + self.conv_dim + self.heads,
                                 bias=c.mamba_proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, c.mamba_d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim)) if c.mamba_conv_bias else None
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.inner, self.groups, c.norm_eps, plan)
        self.out_proj = row_parallel(self.inner, c.hidden_size, c.mamba_proj_bias, plan)
        self.dt_limit = c.time_step_limit  # None: the default (0, inf), nothing to clamp
        nn.init.kaiming_uniform_(self.conv_weight, a=5**0.5)

    def _ssm_args(self, xbc: torch.Tensor, dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """SSU arguments in the per-head layout, parameters tied across head_dim (stride 0)."""
        n, h, p, s = xbc.shape[0], self.heads, self.head_dim, self.d_state
        x, b, c = xbc.split([self.inner, self.groups * s, self.groups * s], dim=-1)
        return {
            "x": x.unflatten(-1, (h, p)),
            "dt": dt[..., None].expand(n, h, p),
            "A": self._decay_rates(),
            "B": b.unflatten(-1, (self.groups, s)),
            "C": c.unflatten(-1, (self.groups, s)),
            "D": self.D[:, None].expand(h, p),
            "dt_bias": self.dt_bias[:, None].expand(h, p),
        }

    def _decay_rates(self) -> torch.Tensor:
        """``A = -exp(A_log)`` as the decode ops take it: ``(heads, head_dim, d_state)``,
        tied across head_dim and d_state (stride 0)."""
        A = -torch.exp(self.A_log.float())
        return A[:, None, None].expand(self.heads, self.head_dim, self.d_state)

    def _scan_args(self, xbc: torch.Tensor, dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mamba_chunk_scan`` arguments: Mamba2's per-head scalars as ``(heads,)``."""
        s = self.d_state
        x, b, c = xbc.split([self.inner, self.groups * s, self.groups * s], dim=-1)
        return {
            "x": x.unflatten(-1, (self.heads, self.head_dim)),
            "dt": dt,
            "A": -torch.exp(self.A_log.float()),
            "B": b.unflatten(-1, (self.groups, s)),
            "C": c.unflatten(-1, (self.groups, s)),
            "D": self.D,
            "dt_bias": self.dt_bias,
        }

    def _finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(y.flatten(-2), z).to(z.dtype))

    def forward(
        self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
        ssm_scale: torch.Tensor | None, *step: torch.Tensor | int, prefill: bool,
        ring: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """:meth:`prefill` or :meth:`decode` (``step``: their arguments after the states;
        ``ssm_scale``: a quantized SSM state's scales, None for a float state; ``ring``:
        the replay ring, None for standard decode).

        The decoder calls the mixer as a module, not its methods: TorchDynamo records the
        path of a module called so (``model.layers.3.mixer``) on the ops it calls, and the
        lowering report names call sites by it."""
        run = self.prefill if prefill else self.decode
        return run(hidden, conv_state, ssm_state, ssm_scale, *step, ring=ring)

    def prefill(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        ssm_scale: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        slots: torch.Tensor,
        src_slots: torch.Tensor,
        pad_slot_id: int,
        block_size: int,
        num_computed: torch.Tensor,
        checkpoint_slots: torch.Tensor,
        window_slots: torch.Tensor,
        window_index: torch.Tensor,
        ring: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """Varlen prefill of flat tokens; sequence i starts from ``src_slots[i]``'s state,
        ``num_computed[i]`` tokens into its request, and leaves its final state in
        ``slots[i]``.

        Checkpoints: ``checkpoint_slots`` ``(seqs, cols)`` get the SSM state at each block
        boundary the sequence crosses (``mamba_chunk_scan``); ``window_slots`` ``(n,)`` get
        the conv window at a boundary, whose inputs ``window_index`` ``(n, width-1)`` points
        at: ``i >= 0`` is flat token ``i``, ``-1 - j`` is row ``j`` of the sequences'
        initial windows flattened ``(seqs * (width-1))``.
        """
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.heads], dim=-1)
        # initial windows are read before the conv overwrites a continuing sequence's row
        initial = conv_state[src_slots.clamp(min=0)].transpose(1, 2).flatten(0, 1)
        ops.copy_state_blocks(conv_state, src_slots, slots, pad_slot_id)
        conv = ops.causal_conv1d_fn(
            xbc.transpose(0, 1), self.conv_weight, self.conv_bias, conv_state, cu_seqlens,
            cache_indices=slots, has_initial_state=src_slots != pad_slot_id,
            activation="silu", pad_slot_id=pad_slot_id,
        ).transpose(0, 1)
        own = window_index >= 0
        windows = torch.where(own[..., None], xbc[window_index.clamp(min=0)],
                              initial[(-1 - window_index).clamp(min=0)].to(xbc.dtype))
        conv_state[window_slots] = windows.transpose(1, 2).to(conv_state.dtype)
        ops.copy_state_blocks(ssm_state, src_slots, slots, pad_slot_id, state_scale=ssm_scale)
        scan = dict(**self._scan_args(conv, dt), chunk_size=CHUNK_SIZE, cu_seqlens=cu_seqlens,
                    dt_softplus=True, dt_limit=self.dt_limit, block_size=block_size,
                    num_computed_tokens=num_computed)
        if ssm_scale is None:
            y = ops.mamba_chunk_scan(ssm_state, **scan, state_batch_indices=slots,
                                     pad_slot_id=pad_slot_id,
                                     checkpoint_state_indices=checkpoint_slots)
        else:
            y = _scan_through_float_rows(ssm_state, ssm_scale, slots, checkpoint_slots,
                                         pad_slot_id, scan)
        if ring is not None:  # the rows the scan wrote are states: their rings are empty
            _empty_rings(ring[-1], torch.cat([slots, checkpoint_slots.flatten()]), pad_slot_id)
        return self._finish(y, z)

    def decode(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        ssm_scale: torch.Tensor | None,
        slots: torch.Tensor,
        pad_slot_id: int,
        rand_seed: torch.Tensor | None = None,
        ring: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """One token per sequence; pad rows (``pad_slot_id``) touch no state. With
        ``rand_seed`` the SSM state is stored rounded stochastically; with ``ring`` the
        token is appended to the ring (``replay_state_update``)."""
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc = ops.causal_conv1d_update(
            xbc, conv_state, self.conv_weight, self.conv_bias, activation="silu",
            conv_state_indices=slots, pad_slot_id=pad_slot_id,
        )
        if ring is not None:
            y = ops.replay_state_update(
                ssm_state, *ring, **self._ssm_args(xbc, dt), dt_softplus=True,
                dt_limit=self.dt_limit, state_batch_indices=slots, pad_slot_id=pad_slot_id,
            )
            return self._finish(y, z)
        y = ops.selective_state_update(
            ssm_state, **self._ssm_args(xbc, dt), dt_softplus=True, dt_limit=self.dt_limit,
            state_batch_indices=slots, pad_slot_id=pad_slot_id, state_scale=ssm_scale,
            rand_seed=rand_seed,
        )
        return self._finish(y, z)

    def materialize(self, ssm_state: torch.Tensor, ring: tuple[torch.Tensor, ...],
                    src: torch.Tensor, dst: torch.Tensor, pad_slot_id: int) -> None:
        """Row ``dst[i]`` of the replay rows becomes the state row ``src[i]`` stands for,
        with an empty ring (``replay_materialize``, at this layer's decay rates)."""
        ops.replay_materialize(ssm_state, *ring, self._decay_rates(), src, dst, pad_slot_id)


def _empty_rings(ring_len: torch.Tensor, rows: torch.Tensor, pad_slot_id: int) -> None:
    """``ring_len[rows] = 0`` for the real rows (pads go to the scratch slot, never read)."""
    real = checks.real_rows(rows, ring_len.shape[0], pad_slot_id)
    ring_len[torch.where(real, rows, SCRATCH_SLOT).long()] = 0


def _scan_through_float_rows(
    state: torch.Tensor,
    scale: torch.Tensor,
    slots: torch.Tensor,
    checkpoint_slots: torch.Tensor,
    pad_slot_id: int,
    scan: dict[str, Any],
) -> torch.Tensor:
    """``mamba_chunk_scan`` for a quantized ``state``: on float32 scratch rows, sequence
    ``i``'s running row and checkpoint columns at rows ``i * (1 + cols) + k`` (its running
    row dequantized in column 0), each written row quantized back into its slot."""
    seqs, cols = checkpoint_slots.shape
    rows = torch.cat([slots[:, None], checkpoint_slots], dim=1)
    real = checks.real_rows(rows, state.shape[0], pad_slot_id)
    running = torch.where(real[:, 0], slots, 0).long()
    h = torch.cat([values(state[running], scale[running])[:, None],
                   state.new_zeros((seqs, cols, *state.shape[1:]), dtype=torch.float32)],
                  dim=1).flatten(0, 1)
    scratch_pad = -1  # the scratch's own pad: its indices run from 0
    local = torch.arange(rows.numel(), dtype=rows.dtype, device=rows.device).view(rows.shape)
    local = torch.where(real, local, scratch_pad)
    y = ops.mamba_chunk_scan(h, **scan, state_batch_indices=local[:, 0],
                             pad_slot_id=scratch_pad, checkpoint_state_indices=local[:, 1:])
    # what the scan wrote: the running row of a sequence with tokens, its crossed boundaries
    cu = scan["cu_seqlens"]
    lengths = (cu[1:] - cu[:-1])[:seqs].long()
    used = checkpoint_columns(lengths, scan["num_computed_tokens"], scan["block_size"])
    column = torch.arange(1 + cols, device=rows.device)
    written = real & torch.where(column == 0, lengths[:, None] > 0, column <= used[:, None])
    dst = torch.where(written, rows, SCRATCH_SLOT).flatten().long()
    state[dst], scale[dst] = quantize(h, state.dtype)
    return y
