"""Triton selective_state_update: every argument form of the op, one kernel (``_ssu_kernel``).

The call is brought into one shape before launch: Mamba1 becomes Mamba2 with one head,
and the three token layouts ((batch,), (batch, T), varlen) become a per-sequence and a
per-token stride for each per-token tensor. Ties (stride 0 over headdim, as Mamba2 passes
dt, A, D and dt_bias) are detected from the strides and turn into scalar loads; dt stays a
scalar only when dt_bias is tied too (a per-channel bias makes dt per channel). Every
tensor is read through its strides, index tensors and ``cu_seqlens`` included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mamba_ir.ops.selective_state_update import one_head
from mamba_ir.ops.selective_state_update import selective_state_update as _op

from ._common import runnable, stride0, triton

if triton is not None:
    from ._ssu_kernel import ssu_kernel

# The widest state row one program holds (headdim rows are blocked, dstate is not).
MAX_DSTATE = 1024
_FEW_PROGRAMS = 1024


@dataclass(frozen=True)
class Config:
    """Launch parameters: headdim rows per program, warps, eviction hint on the state."""

    block_d: int
    num_warps: int
    stream: bool = False


def default_config(dim: int, block_n: int, state_bytes: int, heads: int = 1 << 20) -> Config:
    """Hand-tuned on an H100 (docs/bench-ssu.md): a 4 KiB state tile, 128 bytes per thread.

    Measured on Mamba2 decode (bf16 state, dstate 128) from batch 1 to 512 in two runs: a
    16 x 128 tile on one warp (eight 16-byte loads in flight per thread) was fastest or
    within noise of the fastest at every batch; fewer bytes per thread leave too few loads
    in flight, bigger tiles cost programs per SM. When ``heads`` (sequences x heads) give
    fewer than ~1000 programs, as at batch 1, halving the tile spreads the latency-bound
    work over more of them.
    """
    rows = max(1, 4096 // (block_n * state_bytes))
    block_d = min(triton.next_power_of_2(dim), triton.next_power_of_2(rows))
    if block_d > 1 and heads * triton.cdiv(dim, block_d) < _FEW_PROGRAMS:
        block_d //= 2
    warps = block_d * block_n * state_bytes // (128 * 32)
    return Config(block_d=block_d, num_warps=min(8, triton.next_power_of_2(max(1, warps))))


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    dstate = call["state"].shape[-1]
    if dstate == 0:
        return "dstate=0: the kernel's state tile needs at least one column"
    if dstate > MAX_DSTATE:
        return f"dstate={dstate} > {MAX_DSTATE}: one head's state row must fit one block"
    return True


def _tied(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    return all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims)


def _token_strides(t: torch.Tensor | None, lead: int, varlen: bool) -> tuple[int, int]:
    """(per-sequence, per-token) strides of a per-token tensor with ``lead`` leading dims."""
    if t is None:
        return 0, 0
    if varlen:
        return 0, t.stride(0)
    if lead == 2:
        return t.stride(0), t.stride(1)
    return t.stride(0), 0


def _index_strides(t: torch.Tensor | None) -> tuple[int, int]:
    if t is None:
        return 0, 0
    return t.stride(0), t.stride(1) if t.dim() == 2 else 0


def _columns(t: torch.Tensor | None) -> int:
    return 1 if t is None or t.dim() == 1 else t.shape[1]


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] | None = None,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    cu_seqlens: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> None:
    """The op on Triton; ``config`` overrides the tuned launch parameters (benchmarks)."""
    if state.dim() == 3:
        state, x, dt, A, B, C, D, z, dt_bias, out = one_head(
            state, x, dt, A, B, C, D, z, dt_bias, out
        )
    _, nheads, dim, dstate = state.shape
    varlen = cu_seqlens is not None
    lead = x.dim() - 2
    nseq = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    per_seq = x.shape[1] if lead == 2 and not varlen else 1
    if nseq == 0 or x.numel() == 0:  # no tokens: nothing is read or written
        return
    spec = num_accepted_tokens is not None
    one_token = not varlen and per_seq == 1 and not spec

    block_n = triton.next_power_of_2(dstate)
    cfg = config or default_config(dim, block_n, state.element_size(), nseq * nheads)
    block_d = min(cfg.block_d, triton.next_power_of_2(dim))
    grid = (nseq * nheads * triton.cdiv(dim, block_d),)
    dummy = state  # pointer for absent tensors; never dereferenced (constexpr flags)
    ssu_kernel[grid](
        state,
        x,
        dt,
        dummy if dt_bias is None else dt_bias,
        A,
        B,
        C,
        dummy if D is None else D,
        dummy if z is None else z,
        out,
        dummy if state_batch_indices is None else state_batch_indices,
        dummy if dst_state_batch_indices is None else dst_state_batch_indices,
        dummy if cu_seqlens is None else cu_seqlens,
        dummy if num_accepted_tokens is None else num_accepted_tokens,
        pad_slot_id,
        nheads,
        dim,
        dstate,
        nheads // B.shape[-2],
        per_seq,
        state.shape[0],
        x.shape[0],
        _columns(state_batch_indices),
        _columns(dst_state_batch_indices),
        float(dt_limit[0]) if dt_limit is not None else 0.0,
        float(dt_limit[1]) if dt_limit is not None else 0.0,
        stride0(cu_seqlens),
        stride0(num_accepted_tokens),
        *state.stride(),
        *_token_strides(x, lead, varlen),
        *x.stride()[-2:],
        *_token_strides(dt, lead, varlen),
        *dt.stride()[-2:],
        *_token_strides(z, lead, varlen),
        *(z.stride()[-2:] if z is not None else (0, 0)),
        *_token_strides(out, lead, varlen),
        *out.stride()[-2:],
        *_token_strides(B, lead, varlen),
        *B.stride()[-2:],
        *_token_strides(C, lead, varlen),
        *C.stride()[-2:],
        *A.stride(),
        *(D.stride() if D is not None else (0, 0)),
        *(dt_bias.stride() if dt_bias is not None else (0, 0)),
        *_index_strides(state_batch_indices),
        *_index_strides(dst_state_batch_indices),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus),
        HAS_LIMIT=dt_limit is not None,
        HAS_SRC=state_batch_indices is not None,
        HAS_DST=dst_state_batch_indices is not None,
        VARLEN=varlen,
        SPEC=spec,
        ONE_TOKEN=one_token,
        DT_TIED=_tied(dt, (-1,)) and (dt_bias is None or _tied(dt_bias, (-1,))),
        A_TIED=_tied(A, (-1, -2)),
        D_TIED=D is not None and _tied(D, (-1,)),
        BIAS_TIED=dt_bias is not None and _tied(dt_bias, (-1,)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        STREAM=cfg.stream,
        num_warps=cfg.num_warps,
        num_stages=1,
    )


_op.register_impl("triton", selective_state_update, supports=supports)
