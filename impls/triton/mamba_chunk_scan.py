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

from ._common import call_kernel, register, runnable, stride0, strides, tl, triton

if triton is not None:
    from ._ssd_kernels import (
        chunk_dt_kernel,
        chunk_plan_kernel,
        chunk_scan_kernel,
        chunk_state_kernel,
        state_pass_kernel,
    )

    _TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

MAX_CHUNK = 256  # the scan holds a chunk's decay sums in one block of this many tokens
MAX_DSTATE = 256  # one head's state row is one block
MAX_HEADDIM = 256
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Config:
    """Launch parameters of the kernels (see ``default_config``). The defaults and each
    alternative's cost are measured in docs/bench-chunk-scan.md (H100, 2026-11-23)."""

    # heads per step-size program: 4 is 4 us faster than 16 at 2k tokens, equal at 8k+
    dt_block_h: int = 4
    state_block_p: int = 64  # headdim rows per chunk-state program
    state_block_n: int = 256  # dstate columns per chunk-state program
    state_block_t: int = 32  # tokens per tensor-core step of the chunk-state program
    state_warps: int = 4
    state_stages: int = 3
    # registers per thread cap (0: the compiler's choice); with scan_block_k=64 -2 to -3 %
    # at every swept size (docs/bench-chunk-scan.md)
    state_maxnreg: int = 128
    # chunk contributions stored in the 16-bit input dtype: -50 us at 8k tokens
    contrib_half: bool = True
    pass_block_p: int = 16  # headdim rows per state-passing program (all of dstate)
    pass_warps: int = 4
    # a sequence of one chunk passed by its chunk-state programs, its contribution never
    # stored (many short sequences: every one is a 2 MiB contribution at Mamba2 sizes)
    single_chunk_pass: bool = True
    # C B^T is computed by programs after the chunk-state ones, in their launch
    cb_block: int = 64  # C B^T block (square)
    scan_block_m: int = 64  # output tokens per scan program
    scan_block_k: int = 64  # source tokens per tensor-core step of the scan
    scan_block_p: int = 64
    scan_warps: int = 4
    scan_stages: int = 1
    scan_maxnreg: int = 128  # more scan programs per SM: -104 us at 8k tokens (96, 168 slower)
    # source tokens per step on the diagonal block (0: scan_block_k): 32 keeps the exp
    # per pair's temporaries within the register cap, -2 % at 8k tokens
    scan_diag_k: int = 32
    # a per-head D enters the diagonal block's weights instead of an epilogue D x: -2 % at
    # 8k tokens (D of shape (nheads, headdim) keeps the epilogue)
    scan_d_diag: bool = True


def default_config(dim: int, dstate: int, chunk: int) -> Config:
    """Blocks clipped to the problem (16 is the smallest tensor-core tile)."""
    block_l = _pow2(chunk)
    block_p = min(64, _pow2(dim))
    return Config(
        state_block_p=block_p,
        state_block_t=min(32, block_l),
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


def _per_head(D: torch.Tensor | None) -> bool:
    """Whether ``D`` holds one value per head: ``(nheads,)`` or tied over headdim."""
    return D is not None and (D.dim() == 1 or D.stride(1) == 0)


def chunk_bound(ntok: int, nseq: int, chunk: int) -> int:
    """An upper bound of the chunk count from shapes alone: full chunks, plus a short first
    and last chunk per sequence, and never more chunks than tokens."""
    return min(ntok, ntok // chunk + 2 * nseq)


def launch(call: dict[str, Any], *, config: Config | None = None) -> None:
    """Run the kernels on a bound call (``out`` given: the op allocates it); ``config``
    overrides the launch parameters."""
    state, x, dt, A, B, C, D, z, dt_bias, cu_seqlens, out = (call[k] for k in (
        "state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "cu_seqlens", "out"))
    ntok, nheads, dim = x.shape
    dstate = state.shape[-1]
    nseq = cu_seqlens.shape[0] - 1
    if nseq == 0 or ntok == 0:  # no tokens: nothing is read or written
        return
    chunk, block_size = int(call["chunk_size"]), call["block_size"]
    cfg = config or default_config(dim, dstate, chunk)
    block_l, block_n = _pow2(chunk), _pow2(dstate)
    bound = chunk_bound(ntok, nseq, chunk)
    ngroups = B.shape[1]
    dev = x.device
    mm = _matmul_dtype(x, B, C)
    mm_tl, prec = _TL[mm], "ieee" if mm == torch.float32 else None
    f32 = torch.float32
    # chunk offsets per sequence, then (sequence, first token, length) per chunk
    ints = torch.empty(nseq + 1 + 3 * bound, dtype=torch.int32, device=dev)
    offs, table = ints.split([nseq + 1, 3 * bound])
    # the carried state is fp32 in registers; a chunk's own contribution may be rounded
    # once to the inputs' 16-bit dtype (it never carries another chunk's rounding)
    contrib = torch.empty(bound, nheads, dim, block_n, dtype=mm if cfg.contrib_half else f32,
                          device=dev)
    hin = torch.empty(bound, nheads, dim, block_n, dtype=mm, device=dev)
    # per token: decay sum from the chunk's start, dt, weight in the chunk's state
    cum, dts, wts = torch.empty(3, bound, nheads, block_l, dtype=f32, device=dev).unbind(0)
    decay = torch.empty(bound, nheads, dtype=f32, device=dev)
    cb = torch.empty(bound, ngroups, block_l, block_l, dtype=mm, device=dev)
    dt_limit = call["dt_limit"]
    limit = dict(dt_lo=None, dt_hi=None) if dt_limit is None else dict(
        dt_lo=float(dt_limit[0]), dt_hi=float(dt_limit[1]))
    ckpt = call["checkpoint_state_indices"] if block_size else None
    done = call["num_computed_tokens"]
    # the chunk table, read by every launch after it
    plan = dict(table_ptr=table, bound=bound)

    call_kernel(chunk_plan_kernel, (1,),
        cu_ptr=cu_seqlens, done_ptr=done, offs_ptr=offs, nseq=nseq, ntokens=ntok, **plan,
        chunk=chunk,
        s_cu=stride0(cu_seqlens), s_done=stride0(done),
        BLOCK=min(1024, triton.next_power_of_2(max(nseq, bound))),
        SEARCH_STEPS=max(1, nseq.bit_length()),
    )
    block_p = min(cfg.state_block_p, _pow2(dim))
    block_sn = min(cfg.state_block_n, block_n)
    tiles = triton.cdiv(dim, block_p) * (block_n // block_sn)
    step = dict(bias_ptr=dt_bias, s_bias=stride0(dt_bias), **limit,
                SOFTPLUS=bool(call["dt_softplus"]))
    blocks = dict(BLOCK_L=block_l, BLOCK_T=min(cfg.state_block_t, block_l), BLOCK_P=block_p,
                  BLOCK_N=block_sn, WIDTH_N=block_n, num_warps=cfg.state_warps,
                  num_stages=cfg.state_stages, maxnreg=cfg.state_maxnreg or None)
    shape = dict(nheads=nheads, dim=dim, dstate=dstate, heads_per_group=nheads // ngroups)
    src, dst = call["state_batch_indices"], call["dst_state_batch_indices"]
    # what passing a state takes: the rows, the decays, where entering states go
    rows = dict(
        state_ptr=state, decay_ptr=decay, hin_ptr=hin, done_ptr=done, src_ptr=src,
        dst_ptr=dst, ckpt_ptr=ckpt, offs_ptr=offs, pad_slot_id=call["pad_slot_id"],
        nslots=state.shape[0], chunk=chunk, block_size=block_size,
        ncols=0 if ckpt is None else ckpt.shape[1], s_state=state.stride(),
        s_done=stride0(done), s_src=stride0(src), s_dst=stride0(dst), s_ckpt=strides(ckpt, 2),
    )
    block_h = min(cfg.dt_block_h, triton.next_power_of_2(nheads))
    call_kernel(chunk_dt_kernel, (bound, triton.cdiv(nheads, block_h)),
        dt_ptr=dt, A_ptr=A, **plan, decay_ptr=decay, cum_ptr=cum, dts_ptr=dts,
        wts_ptr=wts, nheads=nheads, **step, s_dt=dt.stride(),
        s_A=A.stride(0), BLOCK_L=block_l, BLOCK_H=block_h,
    )
    cb_m = min(cfg.cb_block, block_l)
    cb_per_chunk = ngroups * (block_l // cb_m) ** 2
    call_kernel(chunk_state_kernel,
        (bound, nheads + cb_per_chunk, tiles),
        x_ptr=x, B_ptr=B, C_ptr=C, **plan, contrib_ptr=contrib, wts_ptr=wts,
        cb_ptr=cb, **rows, **shape, ngroups=ngroups, s_x=x.stride(), s_B=B.stride(),
        s_C=C.stride(), SINGLE=cfg.single_chunk_pass, PREC=prec,
        MM_DTYPE=mm_tl, **blocks, CB_M=cb_m,
    )
    pass_p = min(cfg.pass_block_p, _pow2(dim))
    call_kernel(state_pass_kernel, (nseq, nheads, triton.cdiv(dim, pass_p)),
        **rows, contrib_ptr=contrib, cu_ptr=cu_seqlens, nheads=nheads, dim=dim,
        dstate=dstate, ntokens=ntok, bound=bound, s_cu=stride0(cu_seqlens),
        SINGLE=cfg.single_chunk_pass,
        BLOCK_P=pass_p, WIDTH_N=block_n, num_warps=cfg.pass_warps,
    )
    block_m = min(cfg.scan_block_m, block_l)
    block_p = min(cfg.scan_block_p, _pow2(dim))
    block_k = min(cfg.scan_block_k, block_l)
    grid = (bound * (block_l // block_m) * nheads * triton.cdiv(dim, block_p),)
    call_kernel(chunk_scan_kernel, grid,
        x_ptr=x, C_ptr=C, D_ptr=D, z_ptr=z, out_ptr=out, **plan, hin_ptr=hin, cum_ptr=cum,
        dts_ptr=dts, cb_ptr=cb, **shape,
        s_x=x.stride(), s_C=C.stride(), s_z=strides(z, 3), s_out=out.stride(),
        s_D=(stride0(D), D.stride(1) if D is not None and D.dim() == 2 else 0),
        PREC=prec, MM_DTYPE=mm_tl, BLOCK_L=block_l, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_D=min(cfg.scan_diag_k or block_k, block_m), BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=cfg.scan_warps, num_stages=cfg.scan_stages,
        maxnreg=cfg.scan_maxnreg or None, D_DIAG=cfg.scan_d_diag and _per_head(D),
    )


mamba_chunk_scan = register(_op, launch, supports)
