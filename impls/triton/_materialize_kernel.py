"""The Triton kernels behind ``replay_materialize``: one program replays one entry's ring
into a tile of one head's checkpoint (``BLOCK_D`` rows of headdim, all of dstate) in fp32
registers and stores it once, rounded, into the destination row; a second launch empties
the destination rows' rings once every program has read the source lengths (in place, a
source's length is its destination's)."""

from __future__ import annotations

from ._common import tl, triton
from ._jit import and_real_row, only_if, rate_step, real_row

if triton is not None:

    @triton.jit
    def materialize_kernel(
        state_ptr, ring_x_ptr, ring_dt_ptr, ring_B_ptr, ring_len_ptr, A_ptr, src_ptr, dst_ptr,
        pad_slot_id, nslots, ring, dim, dstate, heads_per_group,
        s_state, s_rx, s_rdt, s_rb, s_len, s_A, s_src, s_dst,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        entry, head, dblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        src = tl.load(src_ptr + entry * s_src).to(tl.int64)
        dst = tl.load(dst_ptr + entry * s_dst).to(tl.int64)
        if real_row(dst, pad_slot_id, nslots):  # a pad destination: nothing to compute
            has_src = real_row(src, pad_slot_id, nslots)
            src = tl.where(has_src, src, 0)  # never dereferenced unless has_src
            s_st_row, s_st_head, s_st_d, s_st_n = s_state
            s_rx_row, s_rx_k, s_rx_head, s_rx_d = s_rx
            s_rdt_row, s_rdt_k, s_rdt_head = s_rdt
            s_rb_row, s_rb_k, s_rb_group, s_rb_n = s_rb
            s_A_head, s_A_d, s_A_n = s_A
            offs_d = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
            offs_n = tl.arange(0, BLOCK_N)
            mask_d, mask_n = offs_d < dim, offs_n < dstate
            tile = mask_d[:, None] & mask_n[None, :]
            # the source's checkpoint (zeros for a pad) and its length, clamped: unchecked
            # (compiled) calls never read past the ring
            h = tl.load(state_ptr + src * s_st_row + head * s_st_head
                        + offs_d[:, None] * s_st_d + offs_n[None, :] * s_st_n,
                        mask=only_if(has_src, tile), other=0.0).to(tl.float32)
            filled = tl.load(ring_len_ptr + src * s_len, mask=has_src, other=0)
            filled = tl.minimum(tl.maximum(filled, 0), ring)
            A = tl.load(A_ptr + head * s_A_head + offs_d[:, None] * s_A_d
                        + offs_n[None, :] * s_A_n, mask=tile, other=0.0).to(tl.float32)
            group = head // heads_per_group
            for k in range(0, filled):  # native's order: h * decay + (dt B) x, entry by entry
                dt = tl.load(ring_dt_ptr + src * s_rdt_row + k * s_rdt_k
                             + head * s_rdt_head).to(tl.float32)
                x = tl.load(ring_x_ptr + src * s_rx_row + k * s_rx_k + head * s_rx_head
                            + offs_d * s_rx_d, mask=mask_d, other=0.0).to(tl.float32)
                B = tl.load(ring_B_ptr + src * s_rb_row + k * s_rb_k + group * s_rb_group
                            + offs_n * s_rb_n, mask=mask_n, other=0.0).to(tl.float32)
                h = h * tl.exp(rate_step(A, dt)) + (dt * B)[None, :] * x[:, None]
            tl.store(state_ptr + dst * s_st_row + head * s_st_head + offs_d[:, None] * s_st_d
                     + offs_n[None, :] * s_st_n, h.to(state_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def empty_rings_kernel(ring_len_ptr, dst_ptr, pad_slot_id, nslots, count, s_len, s_dst,
                           BLOCK: tl.constexpr):
        entries = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = entries < count
        dst = tl.load(dst_ptr + entries * s_dst, mask=inside, other=0).to(tl.int64)
        tl.store(ring_len_ptr + dst * s_len, tl.zeros_like(dst).to(tl.int32),
                 mask=and_real_row(inside, dst, pad_slot_id, nslots))
