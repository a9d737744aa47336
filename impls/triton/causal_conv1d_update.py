"""Triton causal_conv1d_update: one launch of ``_conv_update_kernel``, one program per
(sequence, channel block) walking its tokens in order over the sequence's history (cached
window, then tokens) and rewriting its destination row in place.

Every layout of the op is passed through its strides: ``x`` as ``(batch, dim)``,
``(batch, dim, T)`` or varlen ``(tokens, dim)`` becomes (sequence, token, channel)
strides; index tensors, ``query_start_loc`` and ``bias`` are read through theirs. Rows
outside ``[0, nslots)`` are neither read nor written and no column past ``state_len`` is
touched, whatever an unchecked (compiled) call passes.
"""

from __future__ import annotations

from typing import Any

import torch

from mamba_ir.ops.causal_conv1d_update import causal_conv1d_update as _op

from ._common import call_kernel, register, runnable_conv, stride0, triton

if triton is not None:
    from ._conv_update_kernel import update_kernel


def _block_d(count: int, dim: int) -> int:
    """Channels per program: wide blocks for big batches, narrow ones to fill the GPU at batch 1."""
    block = 256
    while block > 64 and count * triton.cdiv(dim, block) < 512:
        block //= 2
    return min(block, triton.next_power_of_2(dim))


def supports(**call: Any) -> bool | str:
    return runnable_conv(call)


def launch(call: dict[str, Any], *, block_d: int | None = None, num_warps: int | None = None
           ) -> torch.Tensor:
    """Run the kernel on a bound call; ``block_d``/``num_warps`` override the heuristic."""
    x, state, weight = call["x"], call["conv_state"], call["weight"]
    qsl = call["query_start_loc"]
    out = torch.empty_like(x)
    if x.dim() == 3:  # (batch, dim, T)
        count, per_seq = x.shape[0], x.shape[2]
        sx, so = ((t.stride(0), t.stride(2), t.stride(1)) for t in (x, out))
    else:  # (batch, dim), or (tokens, dim) with query_start_loc
        count = x.shape[0] if qsl is None else qsl.shape[0] - 1
        per_seq = 1
        sx, so = ((t.stride(0), t.stride(0), t.stride(1)) for t in (x, out))
    dim = weight.shape[0]
    if count == 0 or dim == 0 or x.numel() == 0:
        return out
    block_d = block_d or _block_d(count, dim)
    bias, dst, src, nacc, offset = (call[k] for k in (
        "bias", "conv_state_indices", "src_conv_state_indices", "num_accepted_tokens",
        "src_token_offset"))
    call_kernel(update_kernel, (count, triton.cdiv(dim, block_d)),
        x_ptr=x, out_ptr=out, state_ptr=state, w_ptr=weight, b_ptr=bias,
        dst_ptr=dst, src_ptr=src, nacc_ptr=nacc, offset_ptr=offset, qsl_ptr=qsl,
        dim=dim, per_seq=per_seq, pad_slot_id=call["pad_slot_id"], nslots=state.shape[0],
        state_len=state.shape[2], ntokens=x.shape[0],
        s_x=sx, s_out=so, s_state=state.stride(), s_w=weight.stride(),
        s_b=stride0(bias), s_dst=stride0(dst), s_src=stride0(src), s_nacc=stride0(nacc),
        s_off=stride0(offset), s_qsl=stride0(qsl),
        W=weight.shape[1], SILU=call["activation"] in ("silu", "swish"), BLOCK_D=block_d,
        num_warps=num_warps or max(1, block_d // 128),
    )
    return out


causal_conv1d_update = register(_op, launch, supports)
