"""The Triton kernel behind ``copy_state_blocks``: one program copies one chunk of one
entry's row, as flat words or through an index decomposition of up to four inner
dimensions. Pads are skipped, a row copied onto itself costs nothing, and rows outside
the state (unchecked, compiled) are never touched."""

from __future__ import annotations

from ._common import tl, triton
from ._jit import only_if

if triton is not None:

    @triton.jit
    def copy_rows_kernel(
        state_ptr, src_ptr, dst_ptr, pad_slot_id, nslots, row_len, nchunks,
        s_row, s_src, s_dst, inner, s_inner,
        BLOCK: tl.constexpr, FLAT: tl.constexpr,
    ):
        # a row's inner sizes and strides, one tuple each
        n1, n2, n3 = inner
        s0, s1, s2, s3 = s_inner
        pid = tl.program_id(0)
        chunk = pid % nchunks
        entry = pid // nchunks
        src = tl.load(src_ptr + entry * s_src).to(tl.int64)
        dst = tl.load(dst_ptr + entry * s_dst).to(tl.int64)
        ok = (src != pad_slot_id) & (dst != pad_slot_id) & (src != dst)
        ok = ok & (src >= 0) & (src < nslots) & (dst >= 0) & (dst < nslots)
        offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = only_if(ok, offs < row_len)
        if FLAT:
            where = offs
        else:  # inner index (i0, i1, i2, i3) of a row with inner sizes (., n1, n2, n3)
            i3 = offs % n3
            rest = offs // n3
            i2 = rest % n2
            rest = rest // n2
            i1 = rest % n1
            i0 = rest // n1
            where = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
        vals = tl.load(state_ptr + src * s_row + where, mask=mask)
        tl.store(state_ptr + dst * s_row + where, vals, mask=mask)
