"""The Triton kernel behind ``replay_state_update``.

One program owns ``BLOCK_D`` rows of one head's state for one sequence, as the
``selective_state_update`` kernel does: it loads that tile of the source row's checkpoint
once, replays the ring's filled entries into it in fp32 registers (each entry loaded while
the one before it is applied), runs the new token and stores its output. Then the row
advances: an append writes the token's entry (``x`` by every program of the sequence,
its tile of it; the step size by one program per head; ``B`` by one program per group),
a flush writes the state, rounded once, as the new checkpoint. A step writes the state
only at a flush, or where the destination is another row (the checkpoint moves along
with the ring's entries, as native's append does).

The replay repeats native's arithmetic in its order, ``h * exp(A dt) + (dt B) x`` per
entry, so the two differ by the rounding of fused multiply-adds, not by reassociation.

**Who writes ``ring_len``.** Every program of a sequence reads the source row's length,
and one length is written per sequence. Where the destination is another row nobody
reads it (the row rules), so the sequence's first program writes it. In place the write
must wait until every program of the sequence has read the length: each program's read
is an atomic add of a ticket (``TICKET``, above the length's bits), which returns the
length under the tickets of the programs before it; the program that draws the last
ticket knows every other one has read, and stores the new length over the tickets. A
row's length lies in ``[0, ring]`` (checked calls), so the low 16 bits, sign-extended,
are the length whatever the tickets above them; the launcher keeps a sequence's program
count below ``2**15`` so that no ticket reaches the sign bit. One launch, no scratch
memory, nothing to reset between CUDA graph replays.
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import only_if, per_head, real_row, step_size

TICKET_BITS = 16
MAX_PROGRAMS_PER_SEQUENCE = 1 << (31 - TICKET_BITS)  # tickets stay below the sign bit
MAX_RING = (1 << (TICKET_BITS - 1)) - 1  # a length must survive the sign extension

if triton is not None:
    TICKET: tl.constexpr = tl.constexpr(1 << TICKET_BITS)
    SHIFT: tl.constexpr = tl.constexpr(32 - TICKET_BITS)

    @triton.jit
    def _entry(rx_ptr, rdt_ptr, rB_ptr, row, i, head, group, offs_d, offs_n, mask_d, mask_n,
               s_rx_row, s_rx_i, s_rx_head, s_rx_dim, s_rdt_row, s_rdt_i, s_rdt_head,
               s_rB_row, s_rB_i, s_rB_group, s_rB_n, filled):
        """Ring entry ``i`` of ``row`` (x in its dtype, dt in fp32, B in its dtype), where
        ``i < filled``; zeros past it (entries past the ring's length are not the row's)."""
        ok = i < filled
        x = tl.load(rx_ptr + row * s_rx_row + i * s_rx_i + head * s_rx_head + offs_d * s_rx_dim,
                    mask=only_if(ok, mask_d), other=0.0)
        dt = tl.load(rdt_ptr + row * s_rdt_row + i * s_rdt_i + head * s_rdt_head, mask=ok,
                     other=0.0)
        b = tl.load(rB_ptr + row * s_rB_row + i * s_rB_i + group * s_rB_group + offs_n * s_rB_n,
                    mask=only_if(ok, mask_n), other=0.0)
        return x, dt, b

    @triton.jit
    def _store_entry(rx_ptr, rdt_ptr, rB_ptr, row, i, head, group, offs_d, offs_n, mask_d,
                     mask_n, s_rx_row, s_rx_i, s_rx_head, s_rx_dim, s_rdt_row, s_rdt_i,
                     s_rdt_head, s_rB_row, s_rB_i, s_rB_group, s_rB_n,
                     x, dt, b, write, owns_dt, owns_b):
        """Write ring entry ``i`` of ``row`` where ``write``: this program's tile of x, the
        step size if it owns the head's, B if it owns the group's."""
        tl.store(rx_ptr + row * s_rx_row + i * s_rx_i + head * s_rx_head + offs_d * s_rx_dim,
                 x, mask=only_if(write, mask_d))
        tl.store(rdt_ptr + row * s_rdt_row + i * s_rdt_i + head * s_rdt_head, dt,
                 mask=write & owns_dt)
        tl.store(rB_ptr + row * s_rB_row + i * s_rB_i + group * s_rB_group + offs_n * s_rB_n,
                 b, mask=only_if(write & owns_b, mask_n))

    @triton.jit
    def _advance(h, a, x, dt, b):
        """One step of the recurrence in native's order: ``h * exp(A dt) + (dt B) x``;
        ``a`` is one value per head (A tied) or A's tile."""
        return h * tl.exp(a * dt) + (dt * b)[None, :] * x[:, None]

    @triton.heuristics({
        "HAS_D": given("D_ptr"), "HAS_Z": given("z_ptr"), "HAS_BIAS": given("bias_ptr"),
        "HAS_LIMIT": given("dt_lo"), "HAS_SRC": given("src_ptr"), "HAS_DST": given("dst_ptr"),
    })
    @triton.jit
    def replay_kernel(
        state_ptr, rx_ptr, rdt_ptr, rB_ptr, len_ptr,
        x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, src_ptr, dst_ptr,
        pad_slot_id, nheads, dim, dstate, heads_per_group, nslots, ring, dt_lo, dt_hi,
        s_state, s_rx, s_rdt, s_rB, s_len, s_x, s_dt, s_bias, s_A, s_B, s_C, s_D, s_z, s_out,
        s_src, s_dst,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        A_TIED: tl.constexpr, D_TIED: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        s_state_row, s_state_head, s_state_dim, s_state_n = s_state
        s_rx_row, s_rx_i, s_rx_head, s_rx_dim = s_rx
        s_rdt_row, s_rdt_i, s_rdt_head = s_rdt
        s_rB_row, s_rB_i, s_rB_group, s_rB_n = s_rB
        s_x_seq, s_x_head, s_x_dim = s_x
        s_dt_seq, s_dt_head = s_dt  # dt is read at headdim 0: one step size per head
        s_A_head, s_A_dim, s_A_n = s_A
        s_B_seq, s_B_group, s_B_n = s_B
        s_C_seq, s_C_group, s_C_n = s_C
        s_D_head, s_D_dim = s_D
        s_z_seq, s_z_head, s_z_dim = s_z
        s_out_seq, s_out_head, s_out_dim = s_out

        # head-major within a sequence, as the SSU kernel: a group's heads are neighbours
        pid = tl.program_id(0)
        nblk = tl.cdiv(dim, BLOCK_D)
        blk = pid % nblk
        head = (pid // nblk) % nheads
        seq = (pid // nblk // nheads).to(tl.int64)
        owns_dt = blk == 0  # writes the head's step size
        owns_b = owns_dt & (head % heads_per_group == 0)  # writes the group's B
        first = owns_dt & (head == 0)  # the sequence's first program
        group = (head // heads_per_group).to(tl.int64)
        head = head.to(tl.int64)

        if HAS_SRC:
            src = tl.load(src_ptr + seq * s_src).to(tl.int64)
        else:
            src = seq
        if HAS_DST:
            dst = tl.load(dst_ptr + seq * s_dst).to(tl.int64)
        else:
            dst = src
        has_src = real_row(src, pad_slot_id, nslots)
        has_dst = real_row(dst, pad_slot_id, nslots)
        in_place = has_dst & (dst == src)

        # the source row's length: in place a ticket (module docstring), else a plain read
        length_ptr = len_ptr + src * s_len
        ticket = tl.atomic_add(length_ptr, TICKET, mask=in_place, sem="acq_rel")
        plain = tl.load(length_ptr, mask=has_src & (dst != src), other=0)
        filled = tl.where(in_place, (ticket << SHIFT) >> SHIFT, plain)
        filled = tl.minimum(tl.maximum(filled, 0), ring)  # clamped: unchecked calls
        last = in_place & ((ticket >> TICKET_BITS) == nheads * nblk - 1)
        flush = filled == ring
        # an append into another row carries the checkpoint and the entries along
        carry = has_dst & (dst != src) & (filled < ring)

        offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        tile = head * s_state_head + offs_d[:, None] * s_state_dim + offs_n[None, :] * s_state_n
        tile_mask = mask_d[:, None] & mask_n[None, :]
        # a pad source: a zero checkpoint (and, above, an empty ring)
        checkpoint = tl.load(state_ptr + src * s_state_row + tile,
                             mask=only_if(has_src, tile_mask), other=0.0)
        tl.store(state_ptr + dst * s_state_row + tile, checkpoint,
                 mask=only_if(carry, tile_mask))
        h = checkpoint.to(tl.float32)

        if A_TIED:
            a = tl.load(A_ptr + head * s_A_head).to(tl.float32)
        else:
            a = tl.load(A_ptr + head * s_A_head + offs_d[:, None] * s_A_dim
                        + offs_n[None, :] * s_A_n, mask=tile_mask, other=0.0).to(tl.float32)

        # the ring's entries in order, each loaded while the one before it is applied
        ex, edt, eb = _entry(rx_ptr, rdt_ptr, rB_ptr, src, 0, head, group, offs_d, offs_n,
                             mask_d, mask_n, s_rx_row, s_rx_i, s_rx_head, s_rx_dim, s_rdt_row,
                             s_rdt_i, s_rdt_head, s_rB_row, s_rB_i, s_rB_group, s_rB_n, filled)
        for i in range(filled):
            nx, ndt, nb = _entry(rx_ptr, rdt_ptr, rB_ptr, src, i + 1, head, group, offs_d,
                                 offs_n, mask_d, mask_n, s_rx_row, s_rx_i, s_rx_head, s_rx_dim,
                                 s_rdt_row, s_rdt_i, s_rdt_head, s_rB_row, s_rB_i, s_rB_group,
                                 s_rB_n, filled)
            _store_entry(rx_ptr, rdt_ptr, rB_ptr, dst, i, head, group, offs_d, offs_n, mask_d,
                         mask_n, s_rx_row, s_rx_i, s_rx_head, s_rx_dim, s_rdt_row, s_rdt_i,
                         s_rdt_head, s_rB_row, s_rB_i, s_rB_group, s_rB_n,
                         ex, edt, eb, carry, owns_dt, owns_b)
            h = _advance(h, a, ex.to(tl.float32), edt, eb.to(tl.float32))
            ex, edt, eb = nx, ndt, nb

        # the new token
        x_in = tl.load(x_ptr + seq * s_x_seq + head * s_x_head + offs_d * s_x_dim, mask=mask_d,
                       other=0.0)
        x = x_in.to(tl.float32)
        dt = tl.load(dt_ptr + seq * s_dt_seq + head * s_dt_head).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + head * s_bias).to(tl.float32)
        dt = step_size(dt, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
        b_in = tl.load(B_ptr + seq * s_B_seq + group * s_B_group + offs_n * s_B_n, mask=mask_n,
                       other=0.0)
        c = tl.load(C_ptr + seq * s_C_seq + group * s_C_group + offs_n * s_C_n, mask=mask_n,
                    other=0.0).to(tl.float32)
        h = _advance(h, a, x, dt, b_in.to(tl.float32))
        y = tl.sum(h * c[None, :], axis=1)
        if HAS_D:
            y = y + per_head(D_ptr, head, s_D_head, offs_d, s_D_dim, mask_d, D_TIED) * x
        if HAS_Z:
            z = tl.load(z_ptr + seq * s_z_seq + head * s_z_head + offs_d * s_z_dim, mask=mask_d,
                        other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(out_ptr + seq * s_out_seq + head * s_out_head + offs_d * s_out_dim,
                 y.to(out_ptr.dtype.element_ty), mask=mask_d)

        # a full ring: the state, rounded once, is the new checkpoint; else the token's entry
        tl.store(state_ptr + dst * s_state_row + tile, h.to(state_ptr.dtype.element_ty),
                 mask=only_if(has_dst & flush, tile_mask))
        _store_entry(rx_ptr, rdt_ptr, rB_ptr, dst, filled, head, group, offs_d, offs_n, mask_d,
                     mask_n, s_rx_row, s_rx_i, s_rx_head, s_rx_dim, s_rdt_row, s_rdt_i,
                     s_rdt_head, s_rB_row, s_rB_i, s_rB_group, s_rB_n,
                     x_in, dt, b_in, has_dst & (filled < ring), owns_dt, owns_b)
        length = tl.where(flush, 0, filled + 1).to(len_ptr.dtype.element_ty)
        tl.store(len_ptr + dst * s_len, length, mask=tl.where(in_place, last, has_dst & first))
