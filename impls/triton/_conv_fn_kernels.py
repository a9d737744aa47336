"""The Triton kernels behind ``causal_conv1d_fn`` (varlen prefill).

- ``stream_kernel`` (widths up to 4): one program per (chunk of consecutive tokens,
  channel block) finds its first token's sequence by binary search over
  ``query_start_loc``, loads the width-1 inputs before the chunk once, then walks its
  tokens loading each x row once and keeping the history in registers, switching to the
  next sequence's cached window (or zeros) at each sequence start.
- ``tile_kernel`` (any width): tiles of tokens x channels, each tap a shifted reload;
  tiles holding a sequence start are recomputed with the cached windows.
- ``final_window_kernel``, one program per (sequence, channel block), writes the last
  ``width - 1`` history columns into the destination row, after the conv kernel has
  finished every window read (a sequence's window may be read by two conv programs).
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import and_real_row, real_row, token_range

# the two conv kernels take the same arguments (the launcher passes one set to either)
_CONV_FLAGS = {
    "HAS_BIAS": given("b_ptr"), "HAS_SRC": given("src_ptr"), "HAS_INIT": given("init_ptr"),
}

if triton is not None:

    @triton.heuristics(_CONV_FLAGS)
    @triton.jit
    def tile_kernel(
        x_ptr, out_ptr, state_ptr, w_ptr, b_ptr, qsl_ptr, src_ptr, init_ptr,
        ntokens, dim, nseq, search_steps, pad_slot_id, nslots,
        s_x, s_out, s_state, s_w, s_b, s_qsl, s_src, s_init,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # strides: one tuple per tensor
        sx_d, sx_t = s_x
        so_d, so_t = s_out
        ss_row, ss_d, ss_c = s_state
        sw_d, sw_k = s_w
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
        # a start before the tokens (unchecked) reads no x before the first one
        start = tl.maximum(tl.load(qsl_ptr + lo * s_qsl).to(tl.int32), 0)
        near_start = (toks - start < W - 1) & tok_ok
        if tl.max(near_start.to(tl.int32), axis=0) > 0:
            # some token's taps reach before its sequence: redo the tile with windows
            if HAS_INIT:
                if HAS_SRC:
                    src = tl.load(src_ptr + lo * s_src).to(tl.int64)
                else:
                    src = lo.to(tl.int64)
                has_window = and_real_row(tl.load(init_ptr + lo * s_init) != 0, src,
                                          pad_slot_id, nslots) & tok_ok
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
            ok = and_real_row((tl.load(init_ptr + seq * s_init) + lanes) != 0, src_v,
                              pad_slot_id, nslots)
            row = state_ptr + src * ss_row + chans * ss_d
        else:
            ok = lanes != 0
            row = state_ptr + chans * ss_d
        return row, ok & chan_ok

    @triton.heuristics(_CONV_FLAGS)
    @triton.jit
    def stream_kernel(
        x_ptr, out_ptr, state_ptr, w_ptr, b_ptr, qsl_ptr, src_ptr, init_ptr,
        ntokens, dim, nseq, search_steps, pad_slot_id, nslots,
        s_x, s_out, s_state, s_w, s_b, s_qsl, s_src, s_init,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        SILU: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DEPTH: tl.constexpr,
    ):
        # strides: one tuple per tensor
        sx_d, sx_t = s_x
        so_d, so_t = s_out
        ss_row, ss_d, ss_c = s_state
        sw_d, sw_k = s_w
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
        # a start before the tokens (unchecked) reads no x before the first one
        start = tl.maximum(tl.load(qsl_ptr + seq * s_qsl).to(tl.int32), 0)
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

    @triton.heuristics({
        "HAS_DST": given("dst_ptr"), "HAS_SRC": given("src_ptr"), "HAS_INIT": given("init_ptr"),
    })
    @triton.jit
    def final_window_kernel(
        x_ptr, state_ptr, qsl_ptr, dst_ptr, src_ptr, init_ptr,
        dim, pad_slot_id, nslots, ntokens,
        s_x, s_state, s_qsl, s_dst, s_src, s_init,
        W: tl.constexpr, HAS_DST: tl.constexpr, HAS_SRC: tl.constexpr, HAS_INIT: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # strides: one tuple per tensor
        sx_d, sx_t = s_x
        ss_row, ss_d, ss_c = s_state
        b = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        chan_ok = chans < dim
        start, length = token_range(qsl_ptr, b, s_qsl, ntokens)
        length = length.to(tl.int32)
        if HAS_DST:
            dst = tl.load(dst_ptr + b * s_dst).to(tl.int64)
        else:
            dst = b.to(tl.int64)
        if HAS_SRC:
            src = tl.load(src_ptr + b * s_src).to(tl.int64)
        else:
            src = dst
        if real_row(dst, pad_slot_id, nslots) & (length > 0):
            lanes = tl.zeros_like(chans)  # scalar flags become vectors: the interpreter needs it
            if HAS_INIT:
                src_v = src + lanes
                has_window = and_real_row((tl.load(init_ptr + b * s_init) + lanes) != 0,
                                          src_v, pad_slot_id, nslots)
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
