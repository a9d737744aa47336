"""Triton selective_scan: Mamba1 prefill, one launch for any mix of sequence lengths.

One program per (sequence, block of channels) runs the sequence in chunks of tokens, each
chunk's tiles loaded at once and its tokens stepped in registers (``_selective_scan_kernel``).
Every tensor is read through its strides, so channel-first tensors contiguous along tokens
and transposed views of ``(tokens, dim)`` projections need no copy; 2-D ``B``/``C`` are one
group. Per-sequence tensors may be longer than the call's sequences (the tail is never
read); rows outside ``[0, slots)``, tokens past the call and checkpoint columns past the
index tensor are neither read nor written, whatever an unchecked (compiled) call passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mamba_ir.ops.selective_scan import selective_scan as _op

from ._common import PROVIDER, runnable, triton

if triton is not None:
    from ._selective_scan_kernel import scan_kernel

# One program holds (channels x dstate x tokens) fp32 tiles; beyond this dstate even one
# channel's tiles would not fit registers.
MAX_DSTATE = 256
# Elements of one (channels x dstate x tokens) tile. Not yet measured on a GPU: a starting
# point sized like the SSU's 4 KiB state tile times a 16-token chunk.
_TILE = 4096
_MAX_GRID_Y = 65535  # channel blocks run on the grid's second axis


@dataclass(frozen=True)
class Config:
    """Launch parameters: channels per program, tokens per chunk, warps."""

    block_d: int
    block_t: int
    num_warps: int


def default_config(dim: int, dstate: int) -> Config:
    """Channels and chunk length so one program's 3-D tile holds about ``_TILE`` elements."""
    block_n = triton.next_power_of_2(dstate)
    block_t = max(1, min(16, _TILE // block_n))
    block_d = max(1, min(triton.next_power_of_2(dim), _TILE // (block_n * block_t)))
    return Config(block_d=block_d, block_t=block_t, num_warps=4)


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    dim, dstate = call["ssm_states"].shape[1:]
    if dstate == 0:
        return "dstate=0: the kernel's state tile needs at least one column"
    if dstate > MAX_DSTATE:
        return f"dstate={dstate} > {MAX_DSTATE}: one channel's state tiles must fit a program"
    blocks = triton.cdiv(dim, default_config(dim, dstate).block_d)
    if blocks > _MAX_GRID_Y:
        return f"dim={dim}: {blocks} channel blocks exceed the grid's {_MAX_GRID_Y}"
    return True


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if t is None else tuple(t.stride())


def selective_scan(
    u: torch.Tensor,
    ssm_states: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    query_start_loc: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    block_size: int = 0,
    src_cache_indices: torch.Tensor | None = None,
    num_computed_tokens: torch.Tensor | None = None,
    checkpoint_state_indices: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> None:
    """The op on Triton; ``config`` overrides the launch parameters (benchmarks)."""
    nseq = query_start_loc.shape[0] - 1
    if nseq == 0 or u.shape[1] == 0:  # no tokens: every sequence is empty, nothing is written
        return
    B, C = (t if t.dim() == 3 else t[None] for t in (B, C))
    dim, dstate = u.shape[0], ssm_states.shape[2]
    per_group = dim // B.shape[0]
    cfg = config or default_config(dim, dstate)
    block_d = min(cfg.block_d, triton.next_power_of_2(dim))
    # no chunk longer than the call's tokens: a short call steps no padding tokens
    block_t = min(cfg.block_t, triton.next_power_of_2(u.shape[1]))
    dummy = ssm_states  # pointer for absent tensors; never dereferenced (constexpr flags)
    checkpoints = bool(block_size)
    scan_kernel[(nseq, triton.cdiv(dim, block_d))](
        u, delta, dummy if z is None else z, out, ssm_states, A, B, C,
        dummy if D is None else D, dummy if delta_bias is None else delta_bias,
        query_start_loc,
        dummy if cache_indices is None else cache_indices,
        dummy if src_cache_indices is None else src_cache_indices,
        dummy if has_initial_state is None else has_initial_state,
        dummy if num_computed_tokens is None else num_computed_tokens,
        dummy if checkpoint_state_indices is None else checkpoint_state_indices,
        dim, dstate, per_group, pad_slot_id, max(1, block_size), ssm_states.shape[0], u.shape[1],
        0 if checkpoint_state_indices is None else checkpoint_state_indices.shape[1],
        *u.stride(), *delta.stride(), *_strides(z, 2), *out.stride(),
        *ssm_states.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 1), *_strides(delta_bias, 1),
        *query_start_loc.stride(), *_strides(cache_indices, 1),
        *_strides(src_cache_indices, 1), *_strides(has_initial_state, 1),
        *_strides(num_computed_tokens, 1), *_strides(checkpoint_state_indices, 2),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        HAS_DST=cache_indices is not None,
        HAS_SRC=src_cache_indices is not None,
        HAS_INIT=has_initial_state is not None,
        HAS_DONE=num_computed_tokens is not None,
        CHECKPOINTS=checkpoints,
        ONE_GROUP=B.shape[0] == 1 or per_group % block_d == 0,
        BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(dstate),
        BLOCK_T=block_t,
        num_warps=cfg.num_warps,
    )


_op.register_impl(PROVIDER, selective_scan, supports=supports)
