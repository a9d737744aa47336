"""Triton selective_state_update: every argument form of the op, one kernel (``_ssu_kernel``).

The call is brought into one shape before launch: Mamba1 becomes Mamba2 with one head,
and the three token layouts ((batch,), (batch, T), varlen) become a per-sequence and a
per-token stride for each per-token tensor. Ties (stride 0 over headdim, as Mamba2 passes
dt, A, D and dt_bias) are detected from the strides and turn into scalar loads; dt stays a
scalar only when dt_bias is tied too (a per-channel bias makes dt per channel). Every
tensor is read through its strides, index tensors and ``cu_seqlens`` included.

A quantized state (int16, int8, float8 e4m3 with ``state_scale``) runs the same kernel with
dequantization fused into its load and quantization into its store (``QUANT``); its tile
is sized by the quantized element, so it holds as many state bytes as a bf16 tile, and
spread over warps so that a thread holds no more float32 values than in a bf16 tile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from mamba_ir.ops._quant import FLOAT_GRIDS, QMAX
from mamba_ir.ops.selective_state_update import one_head
from mamba_ir.ops.selective_state_update import selective_state_update as _op

from ._common import call_kernel, index_strides, register, runnable, stride0, strides, triton

if triton is not None:
    from ._ssu_kernel import ssu_kernel

# The widest state row one program holds (headdim rows are blocked, dstate is not).
MAX_DSTATE = 1024
_FEW_PROGRAMS = 1024
# The most float32 state values one thread holds: the measured 16-bit tile's (16 x 128 on
# one warp). A one-byte state's 4 KiB tile on one warp held 128 (255 registers, an eighth
# of an SM's warps resident, 54 % of the copy roof on an H100), so it takes more warps.
_VALUES_PER_THREAD = 64


@dataclass(frozen=True)
class Config:
    """Launch parameters: headdim rows per program, warps, eviction hint on the state."""

    block_d: int
    num_warps: int
    stream: bool = False


def default_config(dim: int, block_n: int, state_bytes: int, heads: int = 1 << 20) -> Config:
    """Hand-tuned on an H100 (docs/bench-ssu.md): a 4 KiB state tile, 128 bytes per thread,
    and at most 64 float32 values per thread (two warps for a one-byte state's tile).

    Measured on Mamba2 decode (bf16 state, dstate 128) from batch 1 to 512 in two runs: a
    16 x 128 tile on one warp (eight 16-byte loads in flight per thread) was fastest or
    within noise of the fastest at every batch; fewer bytes per thread leave too few loads
    in flight, bigger tiles cost programs per SM. When ``heads`` (sequences x heads) give
    fewer than ~1000 programs, as at batch 1, halving the tile spreads the latency-bound
    work over more of them.

    The tile is dequantized into float32 registers, so a one-byte state's 4 KiB holds
    twice a bf16 tile's values; its warps follow the values (compiled for sm_90, not yet
    timed: docs/bench-ssu.md).
    """
    rows = max(1, 4096 // (block_n * state_bytes))
    block_d = min(triton.next_power_of_2(dim), triton.next_power_of_2(rows))
    if block_d > 1 and heads * triton.cdiv(dim, block_d) < _FEW_PROGRAMS:
        block_d //= 2
    by_bytes = block_d * block_n * state_bytes // (128 * 32)
    by_values = block_d * block_n // (_VALUES_PER_THREAD * 32)
    warps = max(1, by_bytes, by_values)
    return Config(block_d=block_d, num_warps=min(8, triton.next_power_of_2(warps)))


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    state = call["state"]
    if state.dtype == torch.float8_e4m3fn and state.device.type == "cuda":
        major, minor = _capability(state.device.index or 0)
        if (major, minor) < (8, 9):
            return (f"float8_e4m3fn state on compute capability {major}.{minor}: Triton "
                    "converts to and from float8 e4m3 from 8.9 (Ada, Hopper) on")
    dstate = call["state"].shape[-1]
    if dstate == 0:
        return "dstate=0: the kernel's state tile needs at least one column"
    if dstate > MAX_DSTATE:
        return f"dstate={dstate} > {MAX_DSTATE}: one head's state row must fit one block"
    return True


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tied(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    return all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims)


def _per_token(t: torch.Tensor | None, lead: int, varlen: bool) -> tuple[int, ...]:
    """Strides of a per-token tensor with ``lead`` leading dims: per sequence, per token
    (varlen: tokens are the first dimension, sequences have no stride of their own), then
    its two inner dimensions."""
    if t is None:
        return 0, 0, 0, 0
    if varlen:
        return 0, *t.stride()
    if lead == 2:
        return t.stride()
    return t.stride(0), 0, *t.stride()[1:]


def _columns(t: torch.Tensor | None) -> int:
    return 1 if t is None or t.dim() == 1 else t.shape[1]


def launch(call: dict[str, Any], *, config: Config | None = None) -> None:
    """Run the kernel on a bound call; ``config`` overrides the tuned launch parameters."""
    state, x, dt, A, B, C, D, z, dt_bias, out = (call[k] for k in (
        "state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "out"))
    cu_seqlens, nacc, dt_limit = call["cu_seqlens"], call["num_accepted_tokens"], call["dt_limit"]
    src, dst = call["state_batch_indices"], call["dst_state_batch_indices"]
    scale = call["state_scale"]
    if state.dim() == 3:
        state, x, dt, A, B, C, D, z, dt_bias, out = one_head(
            state, x, dt, A, B, C, D, z, dt_bias, out
        )
        scale = None if scale is None else scale.unsqueeze(1)
    _, nheads, dim, dstate = state.shape
    varlen = cu_seqlens is not None
    lead = x.dim() - 2
    nseq = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    per_seq = x.shape[1] if lead == 2 and not varlen else 1
    if nseq == 0 or x.numel() == 0:  # no tokens: nothing is read or written
        return

    block_n = triton.next_power_of_2(dstate)
    cfg = config or default_config(dim, block_n, state.element_size(), nseq * nheads)
    block_d = min(cfg.block_d, triton.next_power_of_2(dim))
    call_kernel(ssu_kernel, (nseq * nheads * triton.cdiv(dim, block_d),),
        state_ptr=state, x_ptr=x, dt_ptr=dt, bias_ptr=dt_bias, A_ptr=A, B_ptr=B, C_ptr=C,
        D_ptr=D, z_ptr=z, out_ptr=out, src_ptr=src, dst_ptr=dst, cu_ptr=cu_seqlens,
        nacc_ptr=nacc, scale_ptr=scale, seed_ptr=call["rand_seed"],
        pad_slot_id=call["pad_slot_id"], nheads=nheads, dim=dim, dstate=dstate,
        heads_per_group=nheads // B.shape[-2], tokens_per_seq=per_seq,
        nslots=state.shape[0], ntokens=x.shape[0],
        src_cols=_columns(src), dst_cols=_columns(dst),
        dt_lo=None if dt_limit is None else float(dt_limit[0]),
        dt_hi=None if dt_limit is None else float(dt_limit[1]),
        s_cu=stride0(cu_seqlens), s_nacc=stride0(nacc),
        s_state=state.stride(), s_x=_per_token(x, lead, varlen),
        s_dt=_per_token(dt, lead, varlen), s_z=_per_token(z, lead, varlen),
        s_out=_per_token(out, lead, varlen), s_B=_per_token(B, lead, varlen),
        s_C=_per_token(C, lead, varlen), s_A=A.stride(), s_D=strides(D, 2),
        s_bias=strides(dt_bias, 2), s_src=index_strides(src), s_dst=index_strides(dst),
        # absent scales pass no stride parameters: a float state's launch is unchanged
        s_scale=(None, None, None) if scale is None else scale.stride(),
        SOFTPLUS=bool(call["dt_softplus"]),
        ONE_TOKEN=not varlen and per_seq == 1 and nacc is None,
        DT_TIED=_tied(dt, (-1,)) and (dt_bias is None or _tied(dt_bias, (-1,))),
        A_TIED=_tied(A, (-1, -2)),
        D_TIED=D is not None and _tied(D, (-1,)),
        BIAS_TIED=dt_bias is not None and _tied(dt_bias, (-1,)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        STREAM=cfg.stream,
        QMAX=QMAX.get(state.dtype, 0.0),
        **_rounding(state.dtype, scale is not None),
        # one Philox per four columns where no quad of elements straddles two tile rows
        SR_QUADS=dstate % 4 == 0,
        num_warps=cfg.num_warps,
        num_stages=1,
    )


def _rounding(dtype: torch.dtype, quantized: bool) -> dict[str, Any]:
    """The grid a float state's stochastic round targets (a quantized one's is the
    quantizer's), as the kernel's constants."""
    if quantized or dtype not in FLOAT_GRIDS:
        return dict(SR_MBITS=0, SR_EMIN=0, SR_FMAX=0.0)
    mbits, emin = FLOAT_GRIDS[dtype]
    return dict(SR_MBITS=mbits, SR_EMIN=emin, SR_FMAX=torch.finfo(dtype).max)


selective_state_update = register(_op, launch, supports)
