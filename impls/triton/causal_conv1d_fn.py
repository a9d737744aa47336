"""Triton causal_conv1d_fn: varlen prefill in two launches.

1. The conv kernel tiles the flat token axis, so one launch serves any mix of long prompts
   and one-token sequences. Each token finds its sequence by binary search over
   ``query_start_loc``; a tap that falls before the sequence's first token reads the cached
   window of its source row (or zero).
2. The final-window kernel, one program per (sequence, channel block), writes the last
   ``width - 1`` history columns into the destination row.

The split is what makes redirection safe: a sequence's window may be read by two conv
programs (its first tokens can straddle a tile boundary), so no conv program may write a
row that is read; after the first launch has finished, every window read is done.
"""

from __future__ import annotations

from typing import Any

import torch

from mamba_ir.ops.causal_conv1d_fn import causal_conv1d_fn as _op

from ._common import PROVIDER, runnable, tl, triton

MAX_WIDTH = 8  # the taps are unrolled; wider windows are refused rather than compiled huge
MAX_TILE_STRIDE = 2**31 // 1024  # token/channel strides whose in-tile offsets fit in 32 bits


if triton is not None:

    @triton.jit
    def _conv_kernel(
        x_ptr, out_ptr, state_ptr, w_ptr, b_ptr, qsl_ptr, src_ptr, init_ptr,
        ntokens, dim, nseq, search_steps, pad_slot_id,
        sx_d, sx_t, so_d, so_t, ss_row, ss_d, ss_c, sw_d, sw_k,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        first = tl.program_id(0) * BLOCK_T
        rows = tl.arange(0, BLOCK_T)
        lanes = tl.arange(0, BLOCK_D)
        toks = first + rows
        chans = tl.program_id(1) * BLOCK_D + lanes
        tok_ok = toks < ntokens
        chan_ok = chans < dim
        ok = tok_ok[:, None] & chan_ok[None, :]
        # 64-bit tile bases, 32-bit offsets inside the tile (the predicate bounds the strides)
        tok0 = first.to(tl.int64)
        chan0 = (tl.program_id(1) * BLOCK_D).to(tl.int64)
        x_tile = x_ptr + tok0 * sx_t + chan0 * sx_d
        x_offs = rows[:, None] * sx_t + lanes[None, :] * sx_d

        if HAS_BIAS:
            bias = tl.load(b_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)

        # the plain stencil over the flat token axis: right for every token at least W-1
        # tokens into its sequence, which is nearly all of them; its loads need no index
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(W):
            w = tl.load(w_ptr + chans * sw_d + k * sw_k, mask=chan_ok, other=0.0)
            v = tl.load(x_tile + x_offs + (k - (W - 1)) * sx_t,
                        mask=ok & (toks + (k - (W - 1)) >= 0)[:, None], other=0.0)
            acc += w.to(tl.float32)[None, :] * v.to(tl.float32)

        # each token's sequence: the last b with qsl[b] <= token, which skips empty sequences
        lo = tl.zeros([BLOCK_T], dtype=tl.int32)
        hi = lo + nseq - 1
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            below = tl.load(qsl_ptr + mid) <= toks
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid - 1)
        start = tl.load(qsl_ptr + lo).to(tl.int32)
        near_start = (toks - start < W - 1) & tok_ok
        if tl.max(near_start.to(tl.int32), axis=0) > 0:
            # some token's taps reach before its sequence: redo the tile with windows
            if HAS_INIT:
                if HAS_SRC:
                    src = tl.load(src_ptr + lo).to(tl.int64)
                else:
                    src = lo.to(tl.int64)
                has_window = (tl.load(init_ptr + lo) != 0) & (src != pad_slot_id) & tok_ok
                state_rows = state_ptr + src[:, None] * ss_row + chans[None, :] * ss_d
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + bias[None, :]
            for k in tl.static_range(W):
                tap = toks - (W - 1) + k
                hist = tl.load(x_tile + x_offs + (k - (W - 1)) * sx_t,
                               mask=ok & (tap >= start)[:, None], other=0.0).to(tl.float32)
                in_window = tap < start
                if HAS_INIT:
                    col = tap - start + (W - 1)
                    cached = tl.load(state_rows + col[:, None] * ss_c,
                                     mask=(in_window & has_window)[:, None] & chan_ok[None, :],
                                     other=0.0)
                    hist = tl.where(in_window[:, None], cached.to(tl.float32), hist)
                tap_w = tl.load(w_ptr + chans * sw_d + k * sw_k, mask=chan_ok, other=0.0)
                acc += tap_w.to(tl.float32)[None, :] * hist
        if SILU:
            acc = acc * tl.sigmoid(acc)
        out_tile = out_ptr + tok0 * so_t + chan0 * so_d
        tl.store(out_tile + rows[:, None] * so_t + lanes[None, :] * so_d,
                 acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _final_window_kernel(
        x_ptr, state_ptr, qsl_ptr, dst_ptr, src_ptr, init_ptr,
        dim, pad_slot_id, sx_d, sx_t, ss_row, ss_d, ss_c,
        W: tl.constexpr, HAS_DST: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        chan_ok = chans < dim
        start = tl.load(qsl_ptr + b).to(tl.int64)
        length = (tl.load(qsl_ptr + b + 1) - start).to(tl.int32)
        if HAS_DST:
            dst = tl.load(dst_ptr + b).to(tl.int64)
        else:
            dst = b.to(tl.int64)
        if HAS_SRC:
            src = tl.load(src_ptr + b).to(tl.int64)
        else:
            src = dst
        if (dst != pad_slot_id) & (length > 0):
            lanes = tl.zeros_like(chans)  # scalar flags become vectors: the interpreter needs it
            if HAS_INIT:
                has_window = ((tl.load(init_ptr + b) + lanes) != 0) & ((src + lanes) != pad_slot_id)
            else:
                has_window = lanes != 0
            src_row = state_ptr + src * ss_row + chans * ss_d
            dst_row = state_ptr + dst * ss_row + chans * ss_d
            x_tok = x_ptr + start * sx_t + chans * sx_d
            # the new window is history columns length..length+W-2; written in ascending
            # order, a column is overwritten only after every thread has read it
            for j in tl.static_range(W - 1):
                h = length + j + lanes
                in_window = h < W - 1
                cached = tl.load(src_row + h * ss_c, mask=chan_ok & in_window & has_window,
                                 other=0.0)
                token = tl.load(x_tok + (h - (W - 1)).to(tl.int64) * sx_t,
                                mask=chan_ok & ~in_window, other=0.0)
                v = tl.where(in_window, cached.to(tl.float32), token.to(tl.float32))
                tl.debug_barrier()
                tl.store(dst_row + j * ss_c, v.to(state_ptr.dtype.element_ty), mask=chan_ok)


def _blocks(ntokens: int, dim: int) -> tuple[int, int]:
    """Short, wide tiles (16 tokens): each tap reloads the tile shifted by one token, and
    taller tiles either spill their accumulators or lose parallelism (H100 sweep in
    docs/bench-conv1d.md); 512 channels pay off once there are enough tiles."""
    block_d = min(512 if ntokens >= 4096 else 256, triton.next_power_of_2(dim))
    block_t = min(16, triton.next_power_of_2(max(ntokens, 1)))
    return block_t, block_d


def launch(call: dict[str, Any], *, block_t: int | None = None, block_d: int | None = None,
           num_warps: int | None = None) -> torch.Tensor:
    """Run both kernels on a bound call; the keywords override the tile heuristic."""
    x, weight, states, qsl = call["x"], call["weight"], call["conv_states"], call["query_start_loc"]
    dim, ntokens = x.shape
    nseq = qsl.shape[0] - 1
    out = torch.empty_like(x)
    if nseq <= 0 or dim == 0:
        return out
    width = weight.shape[1]
    bias, dst, src, init = (call[k] for k in (
        "bias", "cache_indices", "src_cache_indices", "has_initial_state"))
    init = None if init is None else init.view(torch.uint8)
    dummy = qsl  # never read: the matching HAS_* flag is off
    pad = call["pad_slot_id"]
    heuristic = _blocks(ntokens, dim)
    block_t = block_t or heuristic[0]
    block_d = block_d or heuristic[1]
    if ntokens > 0:
        # without cache_indices sequence b reads row b, as does the native op
        src_for_read = src if src is not None else dst
        _conv_kernel[(triton.cdiv(ntokens, block_t), triton.cdiv(dim, block_d))](
            x, out, states, weight, weight if bias is None else bias, qsl,
            dummy if src_for_read is None else src_for_read, dummy if init is None else init,
            ntokens, dim, nseq, (nseq - 1).bit_length(), pad,
            *x.stride(), *out.stride(), *states.stride(), *weight.stride(),
            W=width, HAS_BIAS=bias is not None, HAS_SRC=src_for_read is not None,
            HAS_INIT=init is not None, SILU=call["activation"] in ("silu", "swish"),
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps or 4,
        )
        window_block = min(256, triton.next_power_of_2(dim))
        _final_window_kernel[(nseq, triton.cdiv(dim, window_block))](
            x, states, qsl, dummy if dst is None else dst, dummy if src is None else src,
            dummy if init is None else init, dim, pad,
            *x.stride(), *states.stride(),
            W=width, HAS_DST=dst is not None, HAS_SRC=src is not None, HAS_INIT=init is not None,
            BLOCK_D=window_block, num_warps=max(1, min(4, window_block // 64)),
        )
    return out


def causal_conv1d_fn(**call: Any) -> torch.Tensor:
    return launch(call)


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    width = call["weight"].shape[1]
    if not 2 <= width <= MAX_WIDTH:
        return f"conv width {width}: the Triton kernel handles widths 2..{MAX_WIDTH}"
    x = call["x"]
    # the output copies x's layout when it is dense, else is dense: strides <= max(shape)
    if max(*map(abs, x.stride()), *x.shape) > MAX_TILE_STRIDE:
        return (f"x of shape {tuple(x.shape)}, strides {x.stride()}: sizes and strides above "
                f"{MAX_TILE_STRIDE} elements overflow 32-bit tile offsets; split the call")
    return True


_op.register_impl(PROVIDER, causal_conv1d_fn, supports=supports)
