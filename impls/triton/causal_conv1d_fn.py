"""Triton causal_conv1d_fn: varlen prefill in two launches (kernels in ``_conv_fn_kernels``).

1. A conv kernel over the flat token axis, so one launch serves any mix of long prompts and
   one-token sequences: the streaming kernel for widths up to 4, the tiled one beyond.
2. The final-window kernel writes each sequence's last ``width - 1`` history columns into
   its destination row.

The split is what makes redirection safe: a sequence's window may be read by two conv
programs (its first tokens can straddle a chunk or tile boundary), so no conv program may
write a row that is read; after the first launch has finished, every window read is done.

``query_start_loc``, the index tensors, ``has_initial_state`` and ``bias`` are read through
their strides. Rows outside ``[0, nslots)`` are neither read nor written whatever an
unchecked (compiled) call passes.
"""

from __future__ import annotations

from typing import Any

import torch

from mamba_ir.ops.causal_conv1d_fn import causal_conv1d_fn as _op

from ._common import call_kernel, register, runnable_conv, stride0, triton

if triton is not None:
    from ._conv_fn_kernels import final_window_kernel, stream_kernel, tile_kernel

MAX_TILE_STRIDE = 2**31 // 1024  # token/channel strides whose in-tile offsets fit in 32 bits
STREAM_MAX_WIDTH = 4  # the streaming kernel keeps width-1 history rows in named registers


def _blocks(ntokens: int, dim: int) -> tuple[int, int]:
    """Tiles of the tiled kernel: short, wide tiles (16 tokens): each tap reloads the tile
    shifted by one token, and taller tiles either spill their accumulators or lose
    parallelism (H100 sweep in docs/bench-conv1d.md); 512 channels pay off once there are
    enough tiles."""
    block_d = min(512 if ntokens >= 4096 else 256, triton.next_power_of_2(dim))
    block_t = min(16, triton.next_power_of_2(max(ntokens, 1)))
    return block_t, block_d


def _stream_blocks(ntokens: int, dim: int, nseq: int) -> tuple[int, int, int, int]:
    """(chunk, block_d, num_warps, queue depth) of the streaming kernel. H100 sweep
    (docs/bench-conv1d.md): 256 channels on 2 warps beat 512 on 2; 8-token chunks win below
    16k tokens (the most programs in flight: 10-15 % at 2k tokens, up to 6 % at 8k),
    16-token chunks at 32k with several sequences (fewer rows loaded twice before chunk
    starts; since the kernel reads indices through their strides, 3 % faster there than
    the 128-token chunks that won before). With one sequence a program has no binary
    search ahead of its work, and 8-token chunks with all 8 rows loaded up front win at
    every size (5 % at 32k); with 8 and 64 sequences that deeper queue loses 1-5 %."""
    block_d = min(256, triton.next_power_of_2(dim))
    warps = 2 if block_d >= 128 else 1
    if nseq == 1:
        return 8, block_d, warps, 8
    return (8 if ntokens < 16384 else 16), block_d, warps, 4


def supports(**call: Any) -> bool | str:
    ok = runnable_conv(call)
    if ok is not True:
        return ok
    x = call["x"]
    # the output copies x's layout when it is dense, else is dense: strides <= max(shape)
    if max(*map(abs, x.stride()), *x.shape) > MAX_TILE_STRIDE:
        return (f"x of shape {tuple(x.shape)}, strides {x.stride()}: sizes and strides above "
                f"{MAX_TILE_STRIDE} elements overflow 32-bit tile offsets; split the call")
    return True


def launch(call: dict[str, Any], *, kernel: str | None = None, block_t: int | None = None,
           block_d: int | None = None, num_warps: int | None = None,
           depth: int | None = None) -> torch.Tensor:
    """Run the conv and the final-window kernels on a bound call. ``kernel`` is "stream"
    (one program per chunk of tokens and channel block, history kept in registers) or
    "tile" (tiles of tokens x channels, each tap a shifted reload); ``block_t`` is the
    chunk or tile height, ``depth`` the streaming kernel's x rows loaded ahead (4 or 8).
    The keywords override the heuristics."""
    x, weight, states, qsl = call["x"], call["weight"], call["conv_states"], call["query_start_loc"]
    dim, ntokens = x.shape
    nseq = qsl.shape[0] - 1
    out = torch.empty_like(x)
    if nseq <= 0 or dim == 0 or ntokens == 0:
        return out
    width = weight.shape[1]
    bias, dst, src, init = (call[k] for k in (
        "bias", "cache_indices", "src_cache_indices", "has_initial_state"))
    init = None if init is None else init.view(torch.uint8)
    if kernel is None:
        kernel = "stream" if width <= STREAM_MAX_WIDTH else "tile"
    # without cache_indices sequence b reads row b, as does the native op
    src_for_read = src if src is not None else dst
    args = dict(
        x_ptr=x, out_ptr=out, state_ptr=states, w_ptr=weight, b_ptr=bias, qsl_ptr=qsl,
        src_ptr=src_for_read, init_ptr=init,
        ntokens=ntokens, dim=dim, nseq=nseq, search_steps=(nseq - 1).bit_length(),
        pad_slot_id=call["pad_slot_id"], nslots=states.shape[0],
        s_x=x.stride(), s_out=out.stride(), s_state=states.stride(), s_w=weight.stride(),
        s_b=stride0(bias), s_qsl=stride0(qsl), s_src=stride0(src_for_read), s_init=stride0(init),
        W=width, SILU=call["activation"] in ("silu", "swish"),
    )
    if kernel == "stream":
        chunk, d, warps, ahead = _stream_blocks(ntokens, dim, nseq)
        chunk, d, warps = block_t or chunk, block_d or d, num_warps or warps
        ahead = depth or ahead
        if ahead not in (4, 8):
            raise ValueError(f"depth must be 4 or 8, not {ahead}")
        call_kernel(stream_kernel, (triton.cdiv(ntokens, chunk), triton.cdiv(dim, d)),
            **args, CHUNK=chunk, BLOCK_D=d, DEPTH=ahead, num_warps=warps)
    else:
        t, d = _blocks(ntokens, dim)
        t, d = block_t or t, block_d or d
        call_kernel(tile_kernel, (triton.cdiv(ntokens, t), triton.cdiv(dim, d)),
            **args, BLOCK_T=t, BLOCK_D=d, num_warps=num_warps or 4)
    window_block = min(256, triton.next_power_of_2(dim))
    call_kernel(final_window_kernel, (nseq, triton.cdiv(dim, window_block)),
        x_ptr=x, state_ptr=states, qsl_ptr=qsl, dst_ptr=dst, src_ptr=src, init_ptr=init,
        dim=dim, pad_slot_id=call["pad_slot_id"], nslots=states.shape[0], ntokens=ntokens,
        s_x=x.stride(), s_state=states.stride(),
        s_qsl=stride0(qsl), s_dst=stride0(dst), s_src=stride0(src), s_init=stride0(init),
        W=width, BLOCK_D=window_block, num_warps=max(1, min(4, window_block // 64)),
    )
    return out


causal_conv1d_fn = register(_op, launch, supports)
