"""Triton causal_conv1d_fn: varlen prefill in two launches.

1. A conv kernel over the flat token axis, so one launch serves any mix of long prompts and
   one-token sequences. For widths up to 4 the streaming kernel runs one program per
   (chunk of consecutive tokens, channel block): it finds its first token's sequence by
   binary search over ``query_start_loc``, loads the width-1 inputs before the chunk once,
   then walks its tokens loading each x row once and keeping the history in registers,
   switching to the next sequence's cached window (or zeros) at each sequence start. Wider
   windows use the tiled kernel: tiles of tokens x channels, each tap a shifted reload,
   tiles holding a sequence start recomputed with the cached windows.
2. The final-window kernel, one program per (sequence, channel block), writes the last
   ``width - 1`` history columns into the destination row.

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

from ._common import PROVIDER, runnable_conv, stride0, tl, triton

MAX_TILE_STRIDE = 2**31 // 1024  # token/channel strides whose in-tile offsets fit in 32 bits


if triton is not None:

    @triton.jit
    def _conv_kernel(
        x_ptr, out_ptr, state_ptr, w_ptr, b_ptr, qsl_ptr, src_ptr, init_ptr,
        ntokens, dim, nseq, search_steps, pad_slot_id, nslots,
        sx_d, sx_t, so_d, so_t, ss_row, ss_d, ss_c, sw_d, sw_k, s_b, s_qsl, s_src, s_init,
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
            bias = tl.load(b_ptr + chans * s_b, mask=chan_ok, other=0.0).to(tl.float32)
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
            below = tl.load(qsl_ptr + mid * s_qsl) <= toks
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid - 1)
        start = tl.load(qsl_ptr + lo * s_qsl).to(tl.int32)
        near_start = (toks - start < W - 1) & tok_ok
        if tl.max(near_start.to(tl.int32), axis=0) > 0:
            # some token's taps reach before its sequence: redo the tile with windows
            if HAS_INIT:
                if HAS_SRC:
                    src = tl.load(src_ptr + lo * s_src).to(tl.int64)
                else:
                    src = lo.to(tl.int64)
                has_window = ((tl.load(init_ptr + lo * s_init) != 0) & (src != pad_slot_id)
                              & (src >= 0) & (src < nslots) & tok_ok)
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
                                     mask=(in_window & has_window & (col >= 0))[:, None]
                                     & chan_ok[None, :],
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
    def _history(x_chans, s_row, tap, start, sx_t, ss_c, chan_ok, win_ok, W: tl.constexpr,
                 HAS_INIT: tl.constexpr):
        """Input at token ``tap`` of a sequence starting at ``start``: from x inside the
        sequence, else the cached window column (or zero)."""
        lanes = tl.zeros_like(chan_ok.to(tl.int32)) + tap
        inside = lanes >= start
        v = tl.load(x_chans + tap.to(tl.int64) * sx_t, mask=chan_ok & inside,
                    other=0.0).to(tl.float32)
        if HAS_INIT:
            col = tap - start + (W - 1)
            in_row = lanes - start + (W - 1) >= 0  # a sequence start past its tokens reads none
            cached = tl.load(s_row + col * ss_c, mask=win_ok & ~inside & in_row, other=0.0)
            v = tl.where(inside, v, cached.to(tl.float32))
        return v

    @triton.jit
    def _window_row(state_ptr, src_ptr, init_ptr, seq, chans, chan_ok, pad_slot_id, nslots,
                    ss_row, ss_d, s_src, s_init, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr):
        """The cached window's row pointers of ``seq`` and the lanes that may read it."""
        lanes = tl.zeros_like(chans)
        if HAS_INIT:
            if HAS_SRC:
                src = tl.load(src_ptr + seq * s_src).to(tl.int64)
            else:
                src = seq.to(tl.int64)
            src_v = src + lanes
            ok = (((tl.load(init_ptr + seq * s_init) + lanes) != 0) & (src_v != pad_slot_id)
                  & (src_v >= 0) & (src_v < nslots))
            row = state_ptr + src * ss_row + chans * ss_d
        else:
            ok = lanes != 0
            row = state_ptr + chans * ss_d
        return row, ok & chan_ok

    @triton.jit
    def _stream_kernel(
        x_ptr, out_ptr, state_ptr, w_ptr, b_ptr, qsl_ptr, src_ptr, init_ptr,
        ntokens, dim, nseq, search_steps, pad_slot_id, nslots,
        sx_d, sx_t, so_d, so_t, ss_row, ss_d, ss_c, sw_d, sw_k, s_b, s_qsl, s_src, s_init,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        SILU: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DEPTH: tl.constexpr,
    ):
        first = tl.program_id(0) * CHUNK
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        chan_ok = chans < dim
        count = tl.minimum(ntokens - first, CHUNK)
        left = tl.zeros_like(chans) + count  # vector, not scalar, masks: the interpreter needs it
        x_chans = x_ptr + chans * sx_d
        o_chans = out_ptr + chans * so_d

        if HAS_BIAS:
            bias = tl.load(b_ptr + chans * s_b, mask=chan_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        # wj multiplies the input j tokens back
        w_row = w_ptr + chans * sw_d
        w0 = tl.load(w_row + (W - 1) * sw_k, mask=chan_ok, other=0.0).to(tl.float32)
        w1 = tl.load(w_row + (W - 2) * sw_k, mask=chan_ok, other=0.0).to(tl.float32)
        w2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        w3 = tl.zeros([BLOCK_D], dtype=tl.float32)
        if W > 2:
            w2 = tl.load(w_row + (W - 3) * sw_k, mask=chan_ok, other=0.0).to(tl.float32)
        if W > 3:
            w3 = tl.load(w_row + (W - 4) * sw_k, mask=chan_ok, other=0.0).to(tl.float32)

        # the sequence of the first token: the last b with qsl[b] <= first (skips empty ones)
        lo = first * 0
        hi = lo + nseq - 1
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            below = tl.load(qsl_ptr + mid * s_qsl).to(tl.int32) <= first
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid - 1)
        seq = lo
        start = tl.load(qsl_ptr + seq * s_qsl).to(tl.int32)
        nxt = tl.load(qsl_ptr + (seq + 1) * s_qsl).to(tl.int32)

        # the inputs 1..W-1 tokens before the chunk, loaded once
        s_row, win_ok = _window_row(state_ptr, src_ptr, init_ptr, seq, chans, chan_ok,
                                    pad_slot_id, nslots, ss_row, ss_d, s_src, s_init,
                                    HAS_SRC, HAS_INIT)
        a1 = _history(x_chans, s_row, first - 1, start, sx_t, ss_c, chan_ok, win_ok, W, HAS_INIT)
        a2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        a3 = tl.zeros([BLOCK_D], dtype=tl.float32)
        if W > 2:
            a2 = _history(x_chans, s_row, first - 2, start, sx_t, ss_c, chan_ok, win_ok, W,
                          HAS_INIT)
        if W > 3:
            a3 = _history(x_chans, s_row, first - 3, start, sx_t, ss_c, chan_ok, win_ok, W,
                          HAS_INIT)

        # a queue of the next DEPTH (4 or 8) token rows keeps loads in flight ahead of their
        # use: with few programs per SM, the rows in flight per program set the bandwidth
        x_first = x_chans + first.to(tl.int64) * sx_t
        p1 = tl.load(x_first, mask=chan_ok & (left > 0), other=0.0)
        p2 = tl.load(x_first + sx_t, mask=chan_ok & (left > 1), other=0.0)
        p3 = tl.load(x_first + 2 * sx_t, mask=chan_ok & (left > 2), other=0.0)
        p4 = tl.load(x_first + 3 * sx_t, mask=chan_ok & (left > 3), other=0.0)
        p5 = p4
        p6 = p4
        p7 = p4
        p8 = p4
        if DEPTH > 4:
            p5 = tl.load(x_first + 4 * sx_t, mask=chan_ok & (left > 4), other=0.0)
            p6 = tl.load(x_first + 5 * sx_t, mask=chan_ok & (left > 5), other=0.0)
            p7 = tl.load(x_first + 6 * sx_t, mask=chan_ok & (left > 6), other=0.0)
            p8 = tl.load(x_first + 7 * sx_t, mask=chan_ok & (left > 7), other=0.0)
        for i in range(0, count):
            t = first + i
            cur = p1.to(tl.float32)
            p1 = p2
            p2 = p3
            p3 = p4
            if DEPTH > 4:
                p4 = p5
                p5 = p6
                p6 = p7
                p7 = p8
                p8 = tl.load(x_first + (i + 8) * sx_t, mask=chan_ok & (left > i + 8),
                             other=0.0)
            else:
                p4 = tl.load(x_first + (i + 4) * sx_t, mask=chan_ok & (left > i + 4),
                             other=0.0)
            if t == nxt:
                # a sequence starts here: its history is the cached window (or zero)
                seq = tl.minimum(seq + 1, nseq - 1)
                while (seq < nseq - 1) & (tl.load(qsl_ptr + (seq + 1) * s_qsl).to(tl.int32) <= t):
                    seq += 1
                nxt = tl.load(qsl_ptr + (seq + 1) * s_qsl).to(tl.int32)
                s_row, win_ok = _window_row(state_ptr, src_ptr, init_ptr, seq, chans, chan_ok,
                                            pad_slot_id, nslots, ss_row, ss_d, s_src, s_init,
                                            HAS_SRC, HAS_INIT)
                a1 = tl.load(s_row + (W - 2) * ss_c, mask=win_ok, other=0.0).to(tl.float32)
                if W > 2:
                    a2 = tl.load(s_row + (W - 3) * ss_c, mask=win_ok, other=0.0).to(tl.float32)
                if W > 3:
                    a3 = tl.load(s_row + (W - 4) * ss_c, mask=win_ok, other=0.0).to(tl.float32)
            acc = bias + w0 * cur + w1 * a1
            if W > 2:
                acc += w2 * a2
            if W > 3:
                acc += w3 * a3
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(o_chans + t.to(tl.int64) * so_t, acc.to(out_ptr.dtype.element_ty),
                     mask=chan_ok)
            a3 = a2
            a2 = a1
            a1 = cur

    @triton.jit
    def _final_window_kernel(
        x_ptr, state_ptr, qsl_ptr, dst_ptr, src_ptr, init_ptr,
        dim, pad_slot_id, nslots, ntokens, sx_d, sx_t, ss_row, ss_d, ss_c,
        s_qsl, s_dst, s_src, s_init,
        W: tl.constexpr, HAS_DST: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        chan_ok = chans < dim
        # offsets outside [0, ntokens] (unchecked, compiled) shorten the sequence
        start = tl.maximum(tl.load(qsl_ptr + b * s_qsl).to(tl.int64), 0)
        end = tl.minimum(tl.load(qsl_ptr + (b + 1) * s_qsl).to(tl.int64), ntokens)
        length = tl.maximum(end - start, 0).to(tl.int32)
        if HAS_DST:
            dst = tl.load(dst_ptr + b * s_dst).to(tl.int64)
        else:
            dst = b.to(tl.int64)
        if HAS_SRC:
            src = tl.load(src_ptr + b * s_src).to(tl.int64)
        else:
            src = dst
        if (dst != pad_slot_id) & (dst >= 0) & (dst < nslots) & (length > 0):
            lanes = tl.zeros_like(chans)  # scalar flags become vectors: the interpreter needs it
            if HAS_INIT:
                src_v = src + lanes
                has_window = (((tl.load(init_ptr + b * s_init) + lanes) != 0)
                              & (src_v != pad_slot_id) & (src_v >= 0) & (src_v < nslots))
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
    128-token chunks at 32k with several sequences (fewer rows loaded twice before chunk
    starts). With one sequence a program has no binary search ahead of its work, and 8-token
    chunks with all 8 rows loaded up front win at every size (5 % at 32k); with 8 and 64
    sequences that deeper queue loses 1-5 %."""
    block_d = min(256, triton.next_power_of_2(dim))
    warps = 2 if block_d >= 128 else 1
    if nseq == 1:
        return 8, block_d, warps, 8
    return (8 if ntokens < 16384 else 128), block_d, warps, 4


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
    if nseq <= 0 or dim == 0:
        return out
    width = weight.shape[1]
    bias, dst, src, init = (call[k] for k in (
        "bias", "cache_indices", "src_cache_indices", "has_initial_state"))
    init = None if init is None else init.view(torch.uint8)
    dummy = qsl  # never read: the matching HAS_* flag is off
    pad = call["pad_slot_id"]
    if kernel is None:
        kernel = "stream" if width <= STREAM_MAX_WIDTH else "tile"
    if ntokens > 0:
        # without cache_indices sequence b reads row b, as does the native op
        src_for_read = src if src is not None else dst
        args = (x, out, states, weight, weight if bias is None else bias, qsl,
                dummy if src_for_read is None else src_for_read, dummy if init is None else init,
                ntokens, dim, nseq, (nseq - 1).bit_length(), pad, states.shape[0],
                *x.stride(), *out.stride(), *states.stride(), *weight.stride(),
                stride0(bias), stride0(qsl), stride0(src_for_read), stride0(init))
        flags = {"W": width, "HAS_BIAS": bias is not None, "HAS_SRC": src_for_read is not None,
                 "HAS_INIT": init is not None, "SILU": call["activation"] in ("silu", "swish")}
        if kernel == "stream":
            chunk, d, warps, ahead = _stream_blocks(ntokens, dim, nseq)
            chunk, d, warps = block_t or chunk, block_d or d, num_warps or warps
            ahead = depth or ahead
            if ahead not in (4, 8):
                raise ValueError(f"depth must be 4 or 8, not {ahead}")
            _stream_kernel[(triton.cdiv(ntokens, chunk), triton.cdiv(dim, d))](
                *args, **flags, CHUNK=chunk, BLOCK_D=d, DEPTH=ahead, num_warps=warps)
        else:
            t, d = _blocks(ntokens, dim)
            t, d = block_t or t, block_d or d
            _conv_kernel[(triton.cdiv(ntokens, t), triton.cdiv(dim, d))](
                *args, **flags, BLOCK_T=t, BLOCK_D=d, num_warps=num_warps or 4)
        window_block = min(256, triton.next_power_of_2(dim))
        _final_window_kernel[(nseq, triton.cdiv(dim, window_block))](
            x, states, qsl, dummy if dst is None else dst, dummy if src is None else src,
            dummy if init is None else init, dim, pad, states.shape[0], ntokens,
            *x.stride(), *states.stride(), stride0(qsl), stride0(dst), stride0(src), stride0(init),
            W=width, HAS_DST=dst is not None, HAS_SRC=src is not None, HAS_INIT=init is not None,
            BLOCK_D=window_block, num_warps=max(1, min(4, window_block // 64)),
        )
    return out


def causal_conv1d_fn(**call: Any) -> torch.Tensor:
    return launch(call)


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


_op.register_impl(PROVIDER, causal_conv1d_fn, supports=supports)
