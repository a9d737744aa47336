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

from mamba_ir.ops.selective_scan import selective_scan as _op

from ._common import call_kernel, register, runnable, stride0, strides, triton

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


def launch(call: dict[str, Any], *, config: Config | None = None) -> None:
    """Run the kernel on a bound call; ``config`` overrides the launch parameters."""
    u, states, delta, A, B, C, D, z, bias, qsl, out = (call[k] for k in (
        "u", "ssm_states", "delta", "A", "B", "C", "D", "z", "delta_bias", "query_start_loc",
        "out"))
    nseq = qsl.shape[0] - 1
    if nseq == 0 or u.shape[1] == 0:  # no tokens: every sequence is empty, nothing is written
        return
    B, C = (t if t.dim() == 3 else t.unsqueeze(0) for t in (B, C))
    dim, dstate = u.shape[0], states.shape[2]
    per_group = dim // B.shape[0]
    cfg = config or default_config(dim, dstate)
    block_d = min(cfg.block_d, triton.next_power_of_2(dim))
    # no chunk longer than the call's tokens: a short call steps no padding tokens
    block_t = min(cfg.block_t, triton.next_power_of_2(u.shape[1]))
    block_size = call["block_size"]
    ckpt = call["checkpoint_state_indices"] if block_size else None
    dst, src, init, done = (call[k] for k in (
        "cache_indices", "src_cache_indices", "has_initial_state", "num_computed_tokens"))
    call_kernel(scan_kernel, (nseq, triton.cdiv(dim, block_d)),
        u_ptr=u, delta_ptr=delta, z_ptr=z, out_ptr=out, state_ptr=states, A_ptr=A, B_ptr=B,
        C_ptr=C, D_ptr=D, bias_ptr=bias, qsl_ptr=qsl, dst_ptr=dst, src_ptr=src,
        init_ptr=init, done_ptr=done, ckpt_ptr=ckpt,
        dim=dim, dstate=dstate, per_group=per_group, pad_slot_id=call["pad_slot_id"],
        block_size=max(1, block_size), nslots=states.shape[0], ntok=u.shape[1],
        ncols=0 if ckpt is None else ckpt.shape[1],
        s_u=u.stride(), s_delta=delta.stride(), s_z=strides(z, 2), s_out=out.stride(),
        s_state=states.stride(), s_A=A.stride(), s_B=B.stride(), s_C=C.stride(),
        s_D=stride0(D), s_bias=stride0(bias), s_qsl=stride0(qsl), s_dst=stride0(dst),
        s_src=stride0(src), s_init=stride0(init), s_done=stride0(done),
        s_ckpt=strides(ckpt, 2),
        SOFTPLUS=bool(call["delta_softplus"]),
        ONE_GROUP=B.shape[0] == 1 or per_group % block_d == 0,
        BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(dstate),
        BLOCK_T=block_t,
        num_warps=cfg.num_warps,
    )


selective_scan = register(_op, launch, supports)
