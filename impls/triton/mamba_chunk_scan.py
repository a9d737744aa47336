"""Triton mamba_chunk_scan: the chunked SSD scan (kernels and their plan in ``_ssd_kernels``).

Every stride is passed through (x, B, C, z, dt as column slices of a projection, the state
as a view into a larger cache, index tensors as columns of 2-D tensors); nothing is made
contiguous. The chunk count is not known on the host: the grids are sized by its upper
bound and surplus programs exit at once, so the launch never syncs and graphs capture it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mamba_ir.ops.mamba_chunk_scan import mamba_chunk_scan as _op

from ._common import runnable, triton

if triton is not None:
    from ._ssd_kernels import chunk_offsets_kernel, chunk_scan_kernel, chunk_state_kernel

MAX_CHUNK = 256  # the scan holds a chunk's decay sums in one block of this many tokens
MAX_DSTATE = 256  # one head's state row is one block
MAX_HEADDIM = 256
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Config:
    """Launch parameters of the two kernels (see ``default_config``)."""

    state_block_p: int = 64  # headdim rows per state program
    state_block_t: int = 64  # tokens per tensor-core step of the state program
    state_warps: int = 4
    state_stages: int = 2
    scan_block_m: int = 64  # output tokens per scan program
    scan_block_k: int = 64  # source tokens per tensor-core step of the scan
    scan_block_p: int = 64
    scan_warps: int = 4
    scan_stages: int = 2


def default_config(dim: int, dstate: int, chunk: int) -> Config:
    """Blocks clipped to the problem (16 is the smallest tensor-core tile)."""
    block_l = _pow2(chunk)
    block_p = min(64, _pow2(dim))
    return Config(
        state_block_p=block_p,
        state_block_t=min(64, block_l),
        scan_block_m=min(64, block_l),
        scan_block_k=min(64, block_l),
        scan_block_p=block_p,
    )


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    state, chunk, block = call["state"], call["chunk_size"], call["block_size"]
    dim, dstate = state.shape[-2:]
    if chunk > MAX_CHUNK:
        return f"chunk_size={chunk} > {MAX_CHUNK}: a chunk's decay sums are one block"
    if block and block % chunk:
        return (
            f"block_size={block} is not a multiple of chunk_size={chunk}: checkpoints are "
            "written at chunk ends"
        )
    if dstate > MAX_DSTATE:
        return f"dstate={dstate} > {MAX_DSTATE}: one head's state row must fit one block"
    if dim > MAX_HEADDIM:
        return f"headdim={dim} > {MAX_HEADDIM}"
    return True


def _matmul_dtype(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.dtype:
    """The inputs' 16-bit dtype for the tensor-core products, else fp32 (IEEE products).

    Triton 3.9's interpreter multiplies bf16 tiles wrongly (errors of 1e10 on 16 x 16
    tiles), so there bf16 products run in fp32; the GPU tests cover the bf16 path.
    """
    if x.dtype in _HALF and x.dtype == B.dtype == C.dtype:
        if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            return torch.float32
        return x.dtype
    return torch.float32


def chunk_bound(ntok: int, nseq: int, chunk: int) -> int:
    """An upper bound of the chunk count from shapes alone: full chunks, plus a short first
    and last chunk per sequence, and never more chunks than tokens."""
    return min(ntok, ntok // chunk + 2 * nseq)


def mamba_chunk_scan(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    cu_seqlens: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: Any = None,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    block_size: int = 0,
    num_computed_tokens: torch.Tensor | None = None,
    checkpoint_state_indices: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> None:
    """The op on Triton (``out`` given: the op allocates it); ``config`` overrides the
    launch parameters (benchmarks)."""
    ntok, nheads, dim = x.shape
    dstate = state.shape[-1]
    nseq = cu_seqlens.shape[0] - 1
    if nseq == 0 or ntok == 0:  # no tokens: nothing is read or written
        return
    chunk = int(chunk_size)
    cfg = config or default_config(dim, dstate, chunk)
    block_l, block_n = _pow2(chunk), _pow2(dstate)
    bound = chunk_bound(ntok, nseq, chunk)
    dev = x.device
    mm_dtype = _matmul_dtype(x, B, C)
    prec = "ieee" if mm_dtype == torch.float32 else None
    # chunk offsets per sequence, then (sequence, first token, length) per chunk
    ints = torch.empty(nseq + 1 + 3 * bound, dtype=torch.int32, device=dev)
    offs, table = ints[: nseq + 1], ints[nseq + 1 :]
    hin = torch.empty(bound, nheads, dim, block_n, dtype=mm_dtype, device=dev)
    sums = torch.empty(2, bound, nheads, block_l, dtype=torch.float32, device=dev)
    lo, hi = (float(v) for v in dt_limit) if dt_limit is not None else (0.0, 0.0)
    ckpt = checkpoint_state_indices if block_size else None
    none = (0, 0)

    chunk_offsets_kernel[(1,)](
        cu_seqlens, num_computed_tokens if num_computed_tokens is not None else cu_seqlens,
        offs, nseq, chunk, cu_seqlens.stride(0),
        num_computed_tokens.stride(0) if num_computed_tokens is not None else 0,
        HAS_DONE=num_computed_tokens is not None,
        BLOCK=min(1024, triton.next_power_of_2(nseq)),
    )
    block_p = min(cfg.state_block_p, _pow2(dim))
    chunk_state_kernel[(nseq, nheads, triton.cdiv(dim, block_p))](
        state, x, dt, A, B,
        dt_bias if dt_bias is not None else A,
        cu_seqlens,
        num_computed_tokens if num_computed_tokens is not None else cu_seqlens,
        state_batch_indices if state_batch_indices is not None else cu_seqlens,
        dst_state_batch_indices if dst_state_batch_indices is not None else cu_seqlens,
        ckpt if ckpt is not None else cu_seqlens,
        offs, table, hin, sums[0], sums[1],
        pad_slot_id, nheads, dim, dstate, nheads // B.shape[1], chunk, block_size, bound,
        lo, hi,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        B.stride(0), B.stride(1), B.stride(2),
        A.stride(0),
        dt_bias.stride(0) if dt_bias is not None else 0,
        cu_seqlens.stride(0),
        num_computed_tokens.stride(0) if num_computed_tokens is not None else 0,
        state_batch_indices.stride(0) if state_batch_indices is not None else 0,
        dst_state_batch_indices.stride(0) if dst_state_batch_indices is not None else 0,
        *(ckpt.stride() if ckpt is not None else none),
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus),
        HAS_LIMIT=dt_limit is not None,
        HAS_DONE=num_computed_tokens is not None,
        HAS_SRC=state_batch_indices is not None,
        HAS_DST=dst_state_batch_indices is not None,
        HAS_CKPT=ckpt is not None,
        PREC=prec,
        BLOCK_L=block_l,
        BLOCK_T=min(cfg.state_block_t, block_l),
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        num_warps=cfg.state_warps,
        num_stages=cfg.state_stages,
    )
    block_m = min(cfg.scan_block_m, block_l)
    block_p = min(cfg.scan_block_p, _pow2(dim))
    grid = (bound * (block_l // block_m) * nheads * triton.cdiv(dim, block_p),)
    chunk_scan_kernel[grid](
        x, B, C,
        D if D is not None else A,
        z if z is not None else x,
        out, offs, table, hin, sums[0], sums[1],
        nseq, nheads, dim, dstate, nheads // B.shape[1], bound,
        *x.stride(),
        *B.stride(),
        *C.stride(),
        *(z.stride() if z is not None else (0, 0, 0)),
        *out.stride(),
        D.stride(0) if D is not None else 0,
        D.stride(1) if D is not None and D.dim() == 2 else 0,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        PREC=prec,
        BLOCK_L=block_l,
        BLOCK_M=block_m,
        BLOCK_K=min(cfg.scan_block_k, block_l),
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        num_warps=cfg.scan_warps,
        num_stages=cfg.scan_stages,
    )


_op.register_impl("triton", mamba_chunk_scan, supports=supports)
