"""The Triton kernel behind ``causal_conv1d_update``: one program per (sequence, channel
block), its tokens in order.

The program sees the sequence's *history*: the ``width - 1`` cached columns of its source
row from the window offset, then the call's tokens. Outputs are convolutions over the
history; afterwards the kept part of the history is written to columns ``0..`` of the
destination row, column by column in ascending order behind a barrier, so a row read at
an offset may be rewritten in place (each write only follows reads of columns to its
right).
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import real_row, token_range, window_start

if triton is not None:

    @triton.jit
    def _history(state_row, x_tok, h, offset, has_window, ss_c, sx_t, chan_ok, W: tl.constexpr):
        """Column ``h`` of the history, in float32 (zeros for a missing window)."""
        in_window = (h + tl.zeros_like(chan_ok.to(tl.int32))) < W - 1
        cached = tl.load(state_row + (offset + h) * ss_c, mask=chan_ok & in_window & has_window,
                         other=0.0)
        token = tl.load(x_tok + (h - (W - 1)) * sx_t, mask=chan_ok & ~in_window, other=0.0)
        return tl.where(in_window, cached.to(tl.float32), token.to(tl.float32))

    @triton.heuristics({
        "HAS_BIAS": given("b_ptr"), "HAS_DST": given("dst_ptr"), "HAS_SRC": given("src_ptr"),
        "HAS_OFFSET": given("offset_ptr"), "SPEC": given("nacc_ptr"), "VARLEN": given("qsl_ptr"),
    })
    @triton.jit
    def update_kernel(
        x_ptr, out_ptr, state_ptr, w_ptr, b_ptr,
        dst_ptr, src_ptr, nacc_ptr, offset_ptr, qsl_ptr,
        dim, per_seq, pad_slot_id, nslots, state_len, ntokens,
        s_x, s_out, s_state, s_w, s_b, s_dst, s_src, s_nacc, s_off, s_qsl,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DST: tl.constexpr, HAS_SRC: tl.constexpr,
        HAS_OFFSET: tl.constexpr, SPEC: tl.constexpr, VARLEN: tl.constexpr,
        SILU: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # strides: one tuple per tensor
        sx_b, sx_t, sx_d = s_x
        so_b, so_t, so_d = s_out
        ss_row, ss_d, ss_c = s_state
        sw_d, sw_k = s_w
        b = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        chan_ok = chans < dim

        if VARLEN:
            start, length = token_range(qsl_ptr, b, s_qsl, ntokens)
            length = length.to(tl.int32)
            x_tok = x_ptr + start * sx_t + chans * sx_d
            out_tok = out_ptr + start * so_t + chans * so_d
        else:
            length = per_seq
            x_tok = x_ptr + b.to(tl.int64) * sx_b + chans * sx_d
            out_tok = out_ptr + b.to(tl.int64) * so_b + chans * so_d

        # the op's index rules: sources default to the destinations, destinations to row b
        row = b.to(tl.int64)
        if HAS_SRC:
            src = tl.load(src_ptr + b * s_src).to(tl.int64)
        elif HAS_DST:
            src = tl.load(dst_ptr + b * s_dst).to(tl.int64)
        else:
            src = row
        if HAS_DST:
            dst = tl.load(dst_ptr + b * s_dst).to(tl.int64)
        else:
            dst = row
        if HAS_OFFSET:
            offset = window_start(tl.load(offset_ptr + b * s_off).to(tl.int32), state_len, W)
        elif SPEC:
            offset = window_start(tl.load(nacc_ptr + b * s_nacc).to(tl.int32) - 1, state_len, W)
        else:
            offset = 0
        # per-channel masks only: the interpreter cannot AND a scalar flag into a vector mask
        has_window = real_row(src + tl.zeros_like(chans), pad_slot_id, nslots)
        src_row = state_ptr + src * ss_row + chans * ss_d

        if HAS_BIAS:
            bias = tl.load(b_ptr + chans * s_b, mask=chan_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t in range(length):
            acc = bias
            for k in tl.static_range(W):
                w = tl.load(w_ptr + chans * sw_d + k * sw_k, mask=chan_ok, other=0.0)
                h = _history(src_row, x_tok, t + k, offset, has_window, ss_c, sx_t, chan_ok, W)
                acc += w.to(tl.float32) * h
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(out_tok + t * so_t, acc.to(out_ptr.dtype.element_ty), mask=chan_ok)

        if real_row(dst, pad_slot_id, nslots) & (length > 0):
            # speculative rows keep the history from its second column; others its last W-1
            if SPEC:
                ncols = tl.minimum(W - 2 + length, state_len)
                first = 1
            else:
                ncols = W - 1
                first = length
            dst_row = state_ptr + dst * ss_row + chans * ss_d
            for c in range(ncols):
                h = _history(src_row, x_tok, first + c, offset, has_window, ss_c, sx_t, chan_ok, W)
                tl.debug_barrier()  # every thread has read column >= c before c is overwritten
                tl.store(dst_row + c * ss_c, h.to(state_ptr.dtype.element_ty), mask=chan_ok)
