"""The Triton kernels behind ``mamba_chunk_scan``: the chunked SSD form of the Mamba2 scan.

Chunks belong to one sequence and start at every request position that is a multiple of
the chunk size (position = tokens already computed + index in the call), so a sequence's
first and last chunks may be short and every align-mode block boundary is a chunk end.
Five launches, none of which waits on the host;
grids are sized by an upper bound of the chunk count read from shapes alone and surplus
programs exit at once (their chunks have length 0 in the plan), so the call stays CUDA-graph
capturable:

1. ``chunk_plan_kernel`` (one program): the first global chunk of every sequence (a prefix
   sum of chunk counts), then each chunk's sequence, first token and length (0 for the
   chunks of the bound past the count).
2. ``chunk_dt_kernel`` (chunk x block of heads): the per-token step sizes, their decay
   sums (in base 2) from the chunk's start, each token's weight in its chunk's state (step
   size times decay to the chunk's end) and each chunk's total decay; then
   ``chunk_state_kernel`` (chunk x head x state tile, all in parallel): the chunk's own
   contribution to the state, ``x^T (B * weights)``, a chain of tensor-core products into
   one fp32 accumulator, stored in fp32 or (``Config.contrib_half``) in the 16-bit input
   dtype; for a sequence's only chunk (``Config.single_chunk_pass``) the program passes
   the state itself instead (step 3 for that sequence). The same launch computes ``C B^T``
   (step 4) in programs after the chunk-state ones. A program whose contribution is not
   finite (a non-finite x) flags its chunk for step 5: the sign bit of its length.
3. ``state_pass_kernel`` (sequence x head x state tile): reads the source row once, walks
   the sequence's chunks in order carrying the state in fp32 registers (``h = h *
   decay(chunk) + contribution(chunk)``), stores the state entering each chunk (in the
   matmul input dtype: it only feeds the scan's tensor-core product), checkpoints at block
   boundaries and the final state to the destination row. It reads the whole source tile
   before its first store, so src == dst is safe.
4. ``C B^T`` once per chunk and group, shared by the group's heads, in blocks on or below
   the diagonal (``_cb_block``), by programs of the chunk-state launch after its chunk
   programs (in a launch of its own it was 1-3 % slower at every swept size).
5. ``chunk_scan_kernel`` (chunk x block of its tokens x head x headdim block):
   ``y = exp(cum) * (C @ H_in^T) + (C B^T * decay * dt, causal) @ x (+ D x)``, gated by
   ``silu(z)``. The decay of the source blocks before the output rows factors into a
   weight per source token and one per output row: an exp per pair of tokens only on the
   diagonal block. A chunk's last row blocks start first. The programs of a flagged chunk
   multiply only finite x in the diagonal block (its causal zeros times a NaN would reach
   the tokens before it) and make each output NaN from the first row whose x in its column
   is not finite, as the recurrence carries it; the branch precedes every load, so the
   usual path compiles as it would alone.

Offsets that can pass 2**31 (tokens x strides, rows x row stride, chunks x state size) are
int64; matmul operands are the inputs' 16-bit dtype with fp32 accumulation, or fp32 with
IEEE products when the inputs are fp32 or of mixed dtypes.
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import (
    LOG2E,
    and_real_row,
    clamped_range,
    only_if,
    rate_step,
    real_row,
    silu,
    step_size,
    token_range,
)

if triton is not None:
    # the optional row indices of the kernels that read and write state rows
    _ROW_FLAGS = {
        "HAS_DONE": given("done_ptr"), "HAS_SRC": given("src_ptr"), "HAS_DST": given("dst_ptr"),
        "HAS_CKPT": given("ckpt_ptr"),
    }
    # the sign bit of a chunk's length in the plan: set by the chunk-state programs when the
    # chunk's contribution is not finite, read by the scan (every reader masks it off)
    NONFINITE: tl.constexpr = tl.constexpr(-(2**31))
    LENGTH_BITS: tl.constexpr = tl.constexpr(2**31 - 1)
    # a step's decay in base 2 is at least 2^-DECAY_FLOOR, which is 0 in fp32 (exp2
    # underflows below -150): with A = -inf a chunk's decay sums stay exact multiples of it
    DECAY_FLOOR: tl.constexpr = tl.constexpr(256.0)

    @triton.jit
    def _computed(ptr, mask):
        """Sequences' tokens already computed, int64, at least 0 (an unchecked negative count
        would make ``done % chunk`` negative: chunks longer than a chunk)."""
        return tl.maximum(tl.load(ptr, mask=mask, other=0).to(tl.int64), 0)

    @triton.heuristics({"HAS_DONE": given("done_ptr")})
    @triton.jit
    def chunk_plan_kernel(
        cu_ptr, done_ptr, offs_ptr, table_ptr, nseq, ntokens, chunk, bound,
        s_cu, s_done,
        HAS_DONE: tl.constexpr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    ):
        """``offs[b]``: the first global chunk of sequence b; ``offs[nseq]``: the chunk
        count; ``table[0|1|2, c]``: chunk c's sequence, first token and length.

        Unchecked (compiled) calls: offsets are clamped to ``[0, ntokens]``, computed-token
        counts to ``>= 0``, and chunk offsets to ``bound`` (overlapping sequences can hold
        more chunks than it), so no chunk reaches past the tokens or the scratch."""
        carry = tl.program_id(0).to(tl.int64) * 0
        tl.store(offs_ptr, carry.to(tl.int32))
        for start in range(0, nseq, BLOCK):
            b = start + tl.arange(0, BLOCK)
            live = b < nseq
            lo = tl.load(cu_ptr + b * s_cu, mask=live, other=0).to(tl.int64)
            hi = tl.load(cu_ptr + (b + 1) * s_cu, mask=live, other=0).to(tl.int64)
            lo, n = clamped_range(lo, hi, ntokens)
            lead = tl.zeros_like(n)
            if HAS_DONE:
                lead = _computed(done_ptr + b * s_done, live) % chunk
            count = tl.where(n > 0, (lead + n + chunk - 1) // chunk, 0)
            ends = tl.minimum(tl.cumsum(count, 0) + carry, bound)
            tl.store(offs_ptr + 1 + b, ends.to(tl.int32), mask=live)
            carry += tl.sum(count, 0)
        tl.debug_barrier()  # the offsets stored above are read back below by other threads
        # every chunk of the bound gets a row: the surplus ones length 0, which is how the
        # other kernels' programs of those chunks know to exit (one load, read together
        # with the chunk's first token, rather than the count and then the row)
        for start in range(0, bound, BLOCK):
            c = start + tl.arange(0, BLOCK)
            live = c < carry
            # the last sequence whose first chunk is <= c (empty sequences share offsets
            # with the next one, so the last of equals is the one that owns chunk c)
            lo = tl.zeros_like(c)
            hi = lo + nseq - 1
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi + 1) // 2
                ok = tl.load(offs_ptr + mid, mask=live, other=0).to(tl.int64) <= c
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
            b = lo
            k = c - tl.load(offs_ptr + b, mask=live, other=0).to(tl.int64)
            bos, n = clamped_range(tl.load(cu_ptr + b * s_cu, mask=live, other=0).to(tl.int64),
                                   tl.load(cu_ptr + (b + 1) * s_cu, mask=live,
                                           other=0).to(tl.int64), ntokens)
            lead = tl.zeros_like(n)
            if HAS_DONE:
                lead = _computed(done_ptr + b * s_done, live) % chunk
            first = tl.maximum(k * chunk - lead, 0)
            last = tl.minimum((k + 1) * chunk - lead, n)
            rows = c < bound
            tl.store(table_ptr + c, b.to(tl.int32), mask=rows)
            tl.store(table_ptr + bound + c, (bos + first).to(tl.int32), mask=rows)
            tl.store(table_ptr + 2 * bound + c, tl.where(live, last - first, 0).to(tl.int32),
                     mask=rows)

    @triton.heuristics({"HAS_BIAS": given("bias_ptr"), "HAS_LIMIT": given("dt_lo")})
    @triton.jit
    def chunk_dt_kernel(
        dt_ptr, A_ptr, bias_ptr, table_ptr, decay_ptr, cum_ptr, dts_ptr, wts_ptr,
        nheads, bound, dt_lo, dt_hi,
        s_dt, s_A, s_bias,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """Step sizes, their within-chunk decay sums from the chunk's start, each token's
        weight in the chunk's state (its step size times its decay to the chunk's end) and
        the chunk's total decay, for ``BLOCK_H`` heads of one chunk (the tokens' dt of
        neighbouring heads are adjacent)."""
        # strides: one tuple per tensor
        s_dt_tok, s_dt_head = s_dt
        c = tl.program_id(0).to(tl.int64)
        bos = tl.load(table_ptr + bound + c).to(tl.int64)
        length = tl.load(table_ptr + 2 * bound + c)
        if length == 0:  # past the chunk count
            return
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        pos = tl.arange(0, BLOCK_L)
        live_h = heads < nheads
        live = (pos < length)[:, None] & live_h[None, :]
        d = tl.load(dt_ptr + (bos + pos)[:, None] * s_dt_tok + heads[None, :] * s_dt_head,
                    mask=live, other=0.0).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + heads * s_bias, mask=live_h, other=0.0)[None, :]
        d = step_size(d, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
        d = tl.where(live, d, 0.0)
        a = tl.load(A_ptr + heads * s_A, mask=live_h, other=0.0).to(tl.float32)
        # decay sums in base 2: every exp of them is then one ex2 instruction (the
        # base-e exp adds a multiply and a subnormal fix-up around it). A step of 0 decays
        # by 0 whatever A (rate_step), and a decay is floored at -DECAY_FLOOR, as 0 in fp32
        # as -inf: with A = -inf the sums stay finite, where -inf - -inf would make every
        # weight after the first such step NaN
        da = tl.maximum(rate_step(a[None, :], d) * LOG2E, -DECAY_FLOOR,
                        propagate_nan=tl.PropagateNan.ALL)
        # the decay after each token is summed from the chunk's end rather than taken as
        # total - cum: that difference of two sums of the whole chunk loses ~1e-5 of the
        # weights in fp32 (the GPU test of the fp32 carry against float64 sees it)
        rest = tl.cumsum(da, 0, reverse=True) - da
        at = (c * nheads + heads)[None, :] * BLOCK_L + pos[:, None]
        tl.store(cum_ptr + at, tl.cumsum(da, 0), mask=live)
        tl.store(dts_ptr + at, d, mask=live)
        # each token's weight in its chunk's state, stored for every position of the block
        # (0 past the chunk's end): the chunk-state programs load it without a mask
        tl.store(wts_ptr + at, tl.exp2(rest) * d, mask=live_h[None, :])
        tl.store(decay_ptr + c * nheads + heads, tl.sum(da, 0), mask=live_h)

    @triton.jit
    def _left_columns(h, WIDTH: tl.constexpr):
        """The first 8 columns of ``h`` (``WIDTH`` <= 256 of them), halved off the top:
        a split of register-held columns, no data movement on the tensor-core layout."""
        rows: tl.constexpr = h.shape[0]
        if WIDTH >= 256:
            h, _ = tl.split(tl.permute(tl.reshape(h, [rows, 2, 128]), [0, 2, 1]))
        if WIDTH >= 128:
            h, _ = tl.split(tl.permute(tl.reshape(h, [rows, 2, 64]), [0, 2, 1]))
        if WIDTH >= 64:
            h, _ = tl.split(tl.permute(tl.reshape(h, [rows, 2, 32]), [0, 2, 1]))
        if WIDTH >= 32:
            h, _ = tl.split(tl.permute(tl.reshape(h, [rows, 2, 16]), [0, 2, 1]))
        if WIDTH >= 16:
            h, _ = tl.split(tl.permute(tl.reshape(h, [rows, 2, 8]), [0, 2, 1]))
        return h

    @triton.jit
    def _contribution(
        acc, x_ptr, B_ptr, tok, live, head, group, weight, offs_p, offs_n, mask_p, mask_n,
        s_x_tok, s_x_head, s_x_dim, s_B_tok, s_B_group, s_B_n,
        PREC: tl.constexpr, MM_DTYPE: tl.constexpr,
    ):
        """``acc + x^T (B * weight)`` over the ``live`` tokens ``tok`` of one head: a
        (headdim block x dstate block) tensor-core product. The weights scale the B tile:
        scaling the x tile instead (half the products at headdim 64) measured 6 % slower
        (H100, 2026-11-23)."""
        xt = tl.load(x_ptr + tok[:, None] * s_x_tok + head * s_x_head
                     + offs_p[None, :] * s_x_dim,
                     mask=live[:, None] & mask_p[None, :], other=0.0)
        bt = tl.load(B_ptr + tok[:, None] * s_B_tok + group * s_B_group
                     + offs_n[None, :] * s_B_n,
                     mask=live[:, None] & mask_n[None, :], other=0.0)
        bw = (bt.to(tl.float32) * weight[:, None]).to(MM_DTYPE)
        return tl.dot(tl.trans(xt.to(MM_DTYPE)), bw, acc=acc, input_precision=PREC)

    @triton.heuristics(_ROW_FLAGS)
    @triton.jit
    def chunk_state_kernel(
        x_ptr, B_ptr, C_ptr, table_ptr, contrib_ptr, wts_ptr, cb_ptr,
        state_ptr, decay_ptr, hin_ptr, done_ptr, src_ptr, dst_ptr, ckpt_ptr, offs_ptr,
        nheads: tl.constexpr, dim: tl.constexpr, dstate, heads_per_group: tl.constexpr,
        ngroups: tl.constexpr, bound,
        pad_slot_id, nslots, chunk, block_size, ncols,
        s_x, s_B, s_C, s_state, s_done, s_src, s_dst, s_ckpt,
        HAS_DONE: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        HAS_CKPT: tl.constexpr, SINGLE: tl.constexpr,
        PREC: tl.constexpr, MM_DTYPE: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr, WIDTH_N: tl.constexpr, CB_M: tl.constexpr,
    ):
        """One chunk's own contribution to the state of one head, ``x^T (B * weights)``,
        each token weighted by its step size and its decay to the chunk's end: a chain of
        tensor-core products into one fp32 accumulator. With ``SINGLE``, the chunk that is
        its sequence's only one also passes the state (``_pass_single``) instead of storing
        the contribution, and the state passing skips that sequence. The head axis of the
        grid goes on past ``nheads``: those programs (of the first state tile) compute the
        chunk's ``C B^T`` blocks, ``CB_M`` square, after the heads' programs.
        The shape is compile-time, as in the scan kernel (-0.5 % at 8k tokens, H100,
        2026-11-23)."""
        # strides: one tuple per tensor
        s_x_tok, s_x_head, s_x_dim = s_x
        s_B_tok, s_B_group, s_B_n = s_B
        if tl.program_id(1) >= nheads:
            if tl.program_id(2) == 0:
                per_chunk = ngroups * (BLOCK_L // CB_M) * (BLOCK_L // CB_M)
                _cb_block(tl.program_id(0) * per_chunk + tl.program_id(1) - nheads,
                          B_ptr, C_ptr, table_ptr, cb_ptr, ngroups, dstate, bound,
                          s_B, s_C, PREC, MM_DTYPE, BLOCK_L, CB_M, CB_M, WIDTH_N)
            return
        c = tl.program_id(0).to(tl.int64)
        bos = tl.load(table_ptr + bound + c).to(tl.int64)
        # a program of this launch may have flagged the chunk already (NONFINITE)
        length = tl.load(table_ptr + 2 * bound + c) & LENGTH_BITS
        if length == 0:  # past the chunk count
            return
        head = tl.program_id(1).to(tl.int64)
        nblocks = WIDTH_N // BLOCK_N
        pblk = tl.program_id(2) // nblocks
        nblk = tl.program_id(2) % nblocks
        group = head // heads_per_group
        slot = c * nheads + head

        offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        mask_p = offs_p < dim
        mask_n = offs_n < dstate
        h = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, length, BLOCK_T):
            pos = t0 + offs_t
            live = pos < length
            tok = bos + pos
            weight = tl.load(wts_ptr + slot * BLOCK_L + pos)
            h = _contribution(h, x_ptr, B_ptr, tok, live, head, group, weight,
                              offs_p, offs_n, mask_p, mask_n, s_x_tok, s_x_head, s_x_dim,
                              s_B_tok, s_B_group, s_B_n, PREC, MM_DTYPE)
        tile = offs_p[:, None] * WIDTH_N + offs_n[None, :]
        # the whole one-chunk branch sits inside ``if SINGLE``, the contribution store
        # written in both ``else``s: a flag set under it and tested after would leave
        # ``seq`` unbound where SINGLE is off, which Triton rejects
        if SINGLE:
            seq = tl.load(table_ptr + c).to(tl.int64)
            if tl.load(offs_ptr + seq + 1) - tl.load(offs_ptr + seq) == 1:
                _pass_single(
                    h, seq, slot, head, length, offs_p, offs_n, mask_p, mask_n, tile,
                    state_ptr, decay_ptr, hin_ptr, done_ptr, src_ptr, dst_ptr, ckpt_ptr,
                    dim, pad_slot_id, nslots, chunk, block_size, ncols,
                    s_state, s_done, s_src, s_dst, s_ckpt,
                    HAS_DONE, HAS_SRC, HAS_DST, HAS_CKPT, WIDTH_N,
                )
            else:
                tl.store(contrib_ptr + slot * dim * WIDTH_N + tile,
                         h.to(contrib_ptr.dtype.element_ty), mask=mask_p[:, None])
        else:
            tl.store(contrib_ptr + slot * dim * WIDTH_N + tile,
                     h.to(contrib_ptr.dtype.element_ty), mask=mask_p[:, None])
        # a non-finite x makes its row of the contribution non-finite: the chunk is flagged
        # and the scan multiplies only finite x in its diagonal blocks, whose causal zeros
        # would otherwise turn it into NaN for the tokens before it (0 * NaN)
        total = tl.sum(tl.sum(_left_columns(h, BLOCK_N), 1), 0)
        if total - total != 0.0:
            tl.store(table_ptr + 2 * bound + c, length | NONFINITE)

    @triton.jit
    def _pass_single(
        contrib, seq, slot, head, length, offs_p, offs_n, mask_p, mask_n, scratch,
        state_ptr, decay_ptr, hin_ptr, done_ptr, src_ptr, dst_ptr, ckpt_ptr,
        dim, pad_slot_id, nslots, chunk, block_size, ncols,
        s_state, s_done, s_src, s_dst, s_ckpt,
        HAS_DONE: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        HAS_CKPT: tl.constexpr, WIDTH_N: tl.constexpr,
    ):
        """The state passing of a sequence of one chunk, for the tile of the chunk-state
        program that holds its contribution in fp32: the source row in, the state
        entering the chunk to the scan, the checkpoint and the destination row out. Its
        contribution never goes through memory (2 MiB per sequence at Mamba2 sizes)."""
        s_state_row, s_state_head, s_state_dim, s_state_n = s_state
        done = seq * 0
        if HAS_DONE:
            done = _computed(done_ptr + seq * s_done, True)
        src, dst = _seq_rows(seq, src_ptr, dst_ptr, s_src, s_dst, HAS_SRC, HAS_DST)
        head_off = head * s_state_head
        tile = offs_p[:, None] * s_state_dim + offs_n[None, :] * s_state_n
        tile_mask = mask_p[:, None] & mask_n[None, :]
        # a source that is no row reads row 0 (a state of no rows: nothing) and is
        # zeroed after: a row condition in the load's mask made ptxas spill this branch
        # (50 bytes under the 128-register cap on the H100), which slowed every call
        # with one-chunk sequences by 5-12 %
        real = real_row(src, pad_slot_id, nslots)
        h = tl.load(state_ptr + tl.where(real, src, 0) * s_state_row + head_off + tile,
                    mask=only_if(nslots > 0, tile_mask), other=0.0)
        h = tl.where(real, h, 0.0)
        tl.store(hin_ptr + slot * dim * WIDTH_N + scratch, h.to(hin_ptr.dtype.element_ty),
                 mask=mask_p[:, None])
        h = h.to(tl.float32) * tl.exp2(tl.load(decay_ptr + slot)) + contrib
        if HAS_CKPT:
            _checkpoint(h, state_ptr, ckpt_ptr, seq, done + length, done, block_size, ncols,
                        head_off + tile, tile_mask, pad_slot_id, nslots, s_state_row, s_ckpt)
        tl.store(state_ptr + dst * s_state_row + head_off + tile,
                 h.to(state_ptr.dtype.element_ty),
                 mask=only_if(real_row(dst, pad_slot_id, nslots), tile_mask))

    @triton.jit
    def _seq_rows(seq, src_ptr, dst_ptr, s_src, s_dst,
                  HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr):
        """(source row, destination row) of sequence ``seq``: its own index without source
        indices, the source row without destination indices."""
        src = seq
        if HAS_SRC:
            src = tl.load(src_ptr + seq * s_src).to(tl.int64)
        dst = src
        if HAS_DST:
            dst = tl.load(dst_ptr + seq * s_dst).to(tl.int64)
        return src, dst

    @triton.jit
    def _checkpoint(h, state_ptr, ckpt_ptr, seq, end, done, block_size, ncols, at, tile_mask,
                    pad_slot_id, nslots, s_state_row, s_ckpt):
        """``h`` stored at ``at`` in the checkpoint row of request position ``end`` (of a
        sequence ``done`` tokens in) when ``end`` is a block boundary; a boundary past the
        index tensor's ``ncols`` columns (an unchecked call) stores nothing."""
        s_ckpt_seq, s_ckpt_col = s_ckpt
        if end % block_size == 0:
            col = end // block_size - done // block_size - 1
            row = tl.load(ckpt_ptr + seq * s_ckpt_seq + col * s_ckpt_col,
                          mask=(col >= 0) & (col < ncols), other=pad_slot_id).to(tl.int64)
            tl.store(state_ptr + row * s_state_row + at, h.to(state_ptr.dtype.element_ty),
                     mask=only_if(real_row(row, pad_slot_id, nslots), tile_mask))

    @triton.heuristics(_ROW_FLAGS)
    @triton.jit
    def state_pass_kernel(
        state_ptr, contrib_ptr, decay_ptr, hin_ptr,
        cu_ptr, done_ptr, src_ptr, dst_ptr, ckpt_ptr, offs_ptr,
        pad_slot_id, nslots, nheads, dim, dstate, chunk, block_size, ncols, ntokens, bound,
        s_state, s_cu, s_done, s_src, s_dst, s_ckpt,
        HAS_DONE: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        HAS_CKPT: tl.constexpr, SINGLE: tl.constexpr, BLOCK_P: tl.constexpr,
        WIDTH_N: tl.constexpr,
    ):
        """Walks the chunks of one sequence for one head and block of headdim rows (all of
        dstate; grid: sequence x head x row block), carrying the state in fp32 registers;
        with ``SINGLE``, a sequence of one chunk was passed by its chunk-state programs
        and is skipped."""
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        pblk = tl.program_id(2)
        # strides: one tuple per tensor
        s_state_row, s_state_head, s_state_dim, s_state_n = s_state
        _, length = token_range(cu_ptr, seq, s_cu, ntokens)
        done = seq * 0
        if HAS_DONE:
            done = _computed(done_ptr + seq * s_done, True)
        lead = done % chunk
        nchunks = tl.where(length > 0, (lead + length + chunk - 1) // chunk, 0)
        first = tl.load(offs_ptr + seq).to(tl.int64)
        # the plan gives no chunk past the bound (only overlapping offsets reach it)
        nchunks = tl.minimum(nchunks, bound - first)
        if SINGLE:
            nchunks = tl.where(nchunks == 1, 0, nchunks)
        # both row indices up front: the destination may be the source row
        src, dst = _seq_rows(seq, src_ptr, dst_ptr, s_src, s_dst, HAS_SRC, HAS_DST)

        offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, WIDTH_N)
        mask_p = offs_p < dim
        tile = offs_p[:, None] * s_state_dim + offs_n[None, :] * s_state_n
        tile_mask = mask_p[:, None] & (offs_n < dstate)[None, :]
        head_off = head * s_state_head
        h = tl.load(state_ptr + src * s_state_row + head_off + tile,
                    mask=only_if(and_real_row(nchunks > 0, src, pad_slot_id, nslots),
                                 tile_mask), other=0.0)
        h = h.to(tl.float32)
        scratch = offs_p[:, None] * WIDTH_N + offs_n[None, :]
        size = dim * WIDTH_N
        # the next chunk's contribution and decay are loaded one step ahead: they do not
        # depend on h
        nxt = tl.load(contrib_ptr + (first * nheads + head) * size + scratch,
                      mask=only_if(nchunks > 0, mask_p[:, None]), other=0.0)
        nxt_decay = tl.load(decay_ptr + first * nheads + head, mask=nchunks > 0, other=0.0)
        for k in range(nchunks):
            slot = (first + k) * nheads + head
            contrib = nxt
            decay = nxt_decay
            more = k + 1 < nchunks
            nxt = tl.load(contrib_ptr + (slot + nheads) * size + scratch,
                          mask=only_if(more, mask_p[:, None]), other=0.0)
            nxt_decay = tl.load(decay_ptr + slot + nheads, mask=more, other=0.0)
            tl.store(hin_ptr + slot * size + scratch, h.to(hin_ptr.dtype.element_ty),
                     mask=mask_p[:, None])
            h = h * tl.exp2(decay) + contrib.to(tl.float32)
            if HAS_CKPT:
                _checkpoint(h, state_ptr, ckpt_ptr, seq,
                            done + tl.minimum((k + 1) * chunk - lead, length), done,
                            block_size, ncols, head_off + tile, tile_mask, pad_slot_id, nslots,
                            s_state_row, s_ckpt)
        tl.store(state_ptr + dst * s_state_row + head_off + tile,
                 h.to(state_ptr.dtype.element_ty),
                 mask=only_if(and_real_row(nchunks > 0, dst, pad_slot_id, nslots), tile_mask))

    @triton.jit
    def _cb_block(
        pid, B_ptr, C_ptr, table_ptr, cb_ptr,
        ngroups, dstate, bound,
        s_B, s_C,
        PREC: tl.constexpr, MM_DTYPE: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One block of ``cb``: the ``pid``-th (block pair, group, chunk), block pairs
        varying fastest."""
        # strides: one tuple per tensor
        s_B_tok, s_B_group, s_B_n = s_B
        s_C_tok, s_C_group, s_C_n = s_C
        kblocks = BLOCK_L // BLOCK_K
        mblocks = BLOCK_L // BLOCK_M
        kblk = pid % kblocks
        mblk = (pid // kblocks) % mblocks
        group = ((pid // kblocks // mblocks) % ngroups).to(tl.int64)
        c = (pid // kblocks // mblocks // ngroups).to(tl.int64)
        # 0 past the chunk count; a chunk-state program may have flagged it (NONFINITE)
        length = tl.load(table_ptr + 2 * bound + c) & LENGTH_BITS
        bos = tl.load(table_ptr + bound + c).to(tl.int64)
        m0 = mblk * BLOCK_M
        s0 = kblk * BLOCK_K
        if (m0 < length) & (s0 < m0 + BLOCK_M) & (s0 < length):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_s = s0 + tl.arange(0, BLOCK_K)
            offs_n = tl.arange(0, BLOCK_N)
            mask_n = offs_n < dstate
            cm = tl.load(C_ptr + (bos + offs_m)[:, None] * s_C_tok + group * s_C_group
                         + offs_n[None, :] * s_C_n,
                         mask=(offs_m < length)[:, None] & mask_n[None, :], other=0.0)
            bs = tl.load(B_ptr + (bos + offs_s)[:, None] * s_B_tok + group * s_B_group
                         + offs_n[None, :] * s_B_n,
                         mask=(offs_s < length)[:, None] & mask_n[None, :], other=0.0)
            cb = tl.dot(cm.to(MM_DTYPE), tl.trans(bs.to(MM_DTYPE)), input_precision=PREC)
            tl.store(cb_ptr + ((c * ngroups + group) * BLOCK_L + offs_m[:, None]) * BLOCK_L
                     + offs_s[None, :], cb.to(cb_ptr.dtype.element_ty))

    @triton.jit
    def _scan_rows(
        x_ptr, D_ptr, z_ptr, out_ptr, cum_ptr, dts_ptr, cb_rows,
        cm, hin, bos, length, m0, head, slot, offs_p, mask_p,
        s_x_tok, s_x_head, s_x_dim,
        s_z_tok, s_z_head, s_z_dim,
        s_out_tok, s_out_head, s_out_dim,
        s_D_head, s_D_dim,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, D_DIAG: tl.constexpr, PREC: tl.constexpr,
        MM_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EXACT: tl.constexpr,
    ):
        """Outputs of the ``BLOCK_M`` tokens from ``m0`` of one chunk and head, given
        their C rows ``cm``, the state entering the chunk ``hin`` as (dstate, headdim)
        and the chunk's C B^T rows from ``m0`` (``cb_rows``, one per output token).
        ``EXACT`` (a chunk with a non-finite x): the diagonal block multiplies finite x
        only, and an output is NaN from the first row whose x in its column is not
        finite, as the recurrence propagates it."""
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < length
        mask_mp = mask_m[:, None] & mask_p[None, :]
        tok_m = bos + offs_m
        # rows past the chunk's end read unwritten decay sums: they are never stored
        cum_m = tl.load(cum_ptr + slot * BLOCK_L + offs_m)
        acc = tl.dot(cm, hin, input_precision=PREC)
        # from a source token s before the rows' first token m0 to an output token m,
        # 2^(cum_m - cum_s) = 2^(cum_m - cum_m0) * 2^(cum_m0 - cum_s), both factors at most
        # 1 (decay sums never grow: A <= 0): those blocks weigh their columns (one exp per
        # source token, no causal mask), the rows are scaled once after
        cum_0 = tl.load(cum_ptr + slot * BLOCK_L + m0)
        acc = acc * tl.exp2(cum_0)
        for s0 in range(0, m0, BLOCK_K):
            offs_s = s0 + offs_k
            # rows past the chunk's end may read garbage: they are never stored
            cb = tl.load(cb_rows + offs_s[None, :]).to(tl.float32)
            cum_s = tl.load(cum_ptr + slot * BLOCK_L + offs_s)
            d_s = tl.load(dts_ptr + slot * BLOCK_L + offs_s)
            w = cb * (tl.exp2(cum_0 - cum_s) * d_s)[None, :]
            xs = tl.load(x_ptr + (bos + offs_s)[:, None] * s_x_tok + head * s_x_head
                         + offs_p[None, :] * s_x_dim, mask=mask_p[None, :], other=0.0)
            acc = tl.dot(w.to(MM_DTYPE), xs.to(MM_DTYPE), acc=acc, input_precision=PREC)
        acc = acc * tl.exp2(cum_m - cum_0)[:, None]
        # the diagonal block in unrolled steps of BLOCK_D: an exp per pair of tokens. Only
        # the x rows are loaded with a mask: a source past the chunk's end (unwritten decay
        # sums and step sizes) or above the diagonal (an exp that may overflow, C B^T blocks
        # left unwritten when they are smaller than BLOCK_M) reaches only rows that are
        # never stored or weights the causal select replaces by 0. Masked loads of these
        # tiles were element by element, the kernel's longest stretch of instructions.
        # With D_DIAG a per-head D joins the weights on the diagonal, so the product adds
        # D x with the x tile it already holds: no epilogue x tile and no fp32 layout
        # conversion, -2 % at 8k tokens (H100, 2026-11-23); D enters the product rounded
        # to the matmul dtype, like the weights beside it
        d_head = 0.0
        if D_DIAG:
            d_head = tl.load(D_ptr + head * s_D_head).to(tl.float32)
        # the gate's z tile is loaded before the diagonal block, whose products hide its
        # latency: -3 % gated at 8k tokens (H100, 2026-11-23). It used to cost 7-10 %,
        # when its registers were ones the diagonal block's temporaries needed
        zm = 0.0
        if HAS_Z:
            zm = tl.load(z_ptr + tok_m[:, None] * s_z_tok + head * s_z_head
                         + offs_p[None, :] * s_z_dim, mask=mask_mp, other=0.0)
        rows = tl.arange(0, BLOCK_M)
        first_bad = tl.zeros_like(offs_p).to(tl.int32) + BLOCK_M  # per column, for EXACT
        for k in tl.static_range(BLOCK_M // BLOCK_D):
            if m0 + k * BLOCK_D < length:
                offs_s = m0 + k * BLOCK_D + tl.arange(0, BLOCK_D)
                cb = tl.load(cb_rows + offs_s[None, :]).to(tl.float32)
                cum_s = tl.load(cum_ptr + slot * BLOCK_L + offs_s)
                d_s = tl.load(dts_ptr + slot * BLOCK_L + offs_s)
                w = cb * tl.exp2(cum_m[:, None] - cum_s[None, :]) * d_s[None, :]
                # m - s from constants alone, so the compares stay 32-bit (from token
                # indices, which address memory, the compiler widened them to 64-bit pairs)
                lag = rows[:, None] - (k * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
                w = tl.where(lag >= 0, w, 0.0)
                if D_DIAG:
                    w = tl.where(lag == 0, w + d_head, w)
                xs = tl.load(x_ptr + (bos + offs_s)[:, None] * s_x_tok + head * s_x_head
                             + offs_p[None, :] * s_x_dim,
                             mask=(offs_s < length)[:, None] & mask_p[None, :], other=0.0)
                if EXACT:
                    finite = tl.abs(xs.to(tl.float32)) < float("inf")
                    xs = tl.where(finite, xs, 0.0)
                    src = k * BLOCK_D + tl.arange(0, BLOCK_D)
                    first_bad = tl.minimum(
                        first_bad, tl.min(tl.where(finite, BLOCK_M, src[:, None]), axis=0))
                acc = tl.dot(w.to(MM_DTYPE), xs.to(MM_DTYPE), acc=acc, input_precision=PREC)
        if EXACT:
            acc = tl.where(rows[:, None] >= first_bad[None, :], float("nan"), acc)
        # the D x epilogue (D per headdim column) loads its tiles late: loaded before the
        # diagonal block they held registers through it, 7-10 % slower (H100, 2026-11-23)
        if HAS_D and not D_DIAG:
            xm = tl.load(x_ptr + tok_m[:, None] * s_x_tok + head * s_x_head
                         + offs_p[None, :] * s_x_dim, mask=mask_mp, other=0.0)
            dskip = tl.load(D_ptr + head * s_D_head + offs_p * s_D_dim, mask=mask_p,
                            other=0.0)
            acc += xm.to(tl.float32) * dskip.to(tl.float32)[None, :]
        if HAS_Z:
            acc = acc * silu(zm.to(tl.float32))
        tl.store(out_ptr + tok_m[:, None] * s_out_tok + head * s_out_head
                 + offs_p[None, :] * s_out_dim, acc.to(out_ptr.dtype.element_ty),
                 mask=mask_mp)

    @triton.jit
    def _scan_block(
        x_ptr, C_ptr, D_ptr, z_ptr, out_ptr, hin_ptr, cum_ptr, dts_ptr, cb_ptr,
        c, bos, length, m0, head, group, ngroups, slot, pblk, dim, dstate,
        s_x_tok, s_x_head, s_x_dim, s_C_tok, s_C_group, s_C_n, s_z_tok, s_z_head, s_z_dim,
        s_out_tok, s_out_head, s_out_dim, s_D_head, s_D_dim,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, D_DIAG: tl.constexpr, PREC: tl.constexpr,
        MM_DTYPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
    ):
        """The work of one scan program once its place in the grid is known."""
        offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_p = offs_p < dim
        mask_n = offs_n < dstate
        cm = tl.load(C_ptr + group * s_C_group + (bos + offs_m)[:, None] * s_C_tok
                     + offs_n[None, :] * s_C_n,
                     mask=(offs_m < length)[:, None] & mask_n[None, :], other=0.0)
        # the state entering the chunk, as (dstate, headdim)
        hin = tl.load(hin_ptr + slot * dim * BLOCK_N + offs_p[None, :] * BLOCK_N
                      + offs_n[:, None], mask=mask_p[None, :], other=0.0)
        cb_rows = cb_ptr + ((c * ngroups + group) * BLOCK_L + offs_m[:, None]) * BLOCK_L
        _scan_rows(
            x_ptr, D_ptr, z_ptr, out_ptr, cum_ptr, dts_ptr, cb_rows,
            cm.to(MM_DTYPE), hin.to(MM_DTYPE), bos, length, m0, head, slot, offs_p, mask_p,
            s_x_tok, s_x_head, s_x_dim, s_z_tok, s_z_head, s_z_dim,
            s_out_tok, s_out_head, s_out_dim, s_D_head, s_D_dim,
            HAS_D, HAS_Z, D_DIAG, PREC, MM_DTYPE, BLOCK_L, BLOCK_M, BLOCK_K, BLOCK_D, EXACT,
        )

    @triton.heuristics({"HAS_D": given("D_ptr"), "HAS_Z": given("z_ptr")})
    @triton.jit
    def chunk_scan_kernel(
        x_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
        table_ptr, hin_ptr, cum_ptr, dts_ptr, cb_ptr,
        nheads: tl.constexpr, dim: tl.constexpr, dstate, heads_per_group: tl.constexpr, bound,
        s_x, s_C, s_z, s_out, s_D,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, D_DIAG: tl.constexpr, PREC: tl.constexpr,
        MM_DTYPE: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Outputs of one head for ``BLOCK_M`` tokens of one chunk and a block of headdim
        columns (grid: chunk x row block x head x headdim block, flattened). The head
        count, headdim and heads per group are compile-time constants (one compile per
        model shape): the program's place in the grid comes from constant divisions, -2 %
        at 8k tokens against runtime ones (H100, 2026-11-23)."""
        # strides: one tuple per tensor
        s_x_tok, s_x_head, s_x_dim = s_x
        s_C_tok, s_C_group, s_C_n = s_C
        s_z_tok, s_z_head, s_z_dim = s_z
        s_out_tok, s_out_head, s_out_dim = s_out
        s_D_head, s_D_dim = s_D
        # heads vary fastest so one group's heads (one C B^T block) run side by side
        pid = tl.program_id(0)
        pblocks = tl.cdiv(dim, BLOCK_P)
        mblocks = BLOCK_L // BLOCK_M
        pblk = pid % pblocks
        head = ((pid // pblocks) % nheads).to(tl.int64)
        # the row blocks with the most source blocks start first and the light ones fill
        # the tail: -8 % at every swept size (H100, 2026-11-23); ordering all chunks' last
        # row blocks first instead lost 19-29 % (the chunk's x tiles leave L2 between uses)
        mblk = mblocks - 1 - (pid // pblocks // nheads) % mblocks
        c = (pid // pblocks // nheads // mblocks).to(tl.int64)
        flagged = tl.load(table_ptr + 2 * bound + c)  # 0 past the chunk count
        length = flagged & LENGTH_BITS
        bos = tl.load(table_ptr + bound + c).to(tl.int64)
        m0 = mblk * BLOCK_M
        if m0 >= length:
            return
        group = head // heads_per_group
        ngroups = nheads // heads_per_group
        slot = c * nheads + head

        # a chunk holding a non-finite x (NONFINITE, rare) runs the exact diagonal block; the
        # branch comes before any load, so the usual path compiles as it would alone
        if flagged < 0:
            _scan_block(
                x_ptr, C_ptr, D_ptr, z_ptr, out_ptr, hin_ptr, cum_ptr, dts_ptr, cb_ptr,
                c, bos, length, m0, head, group, ngroups, slot, pblk, dim, dstate,
                s_x_tok, s_x_head, s_x_dim, s_C_tok, s_C_group, s_C_n, s_z_tok, s_z_head,
                s_z_dim, s_out_tok, s_out_head, s_out_dim, s_D_head, s_D_dim,
                HAS_D, HAS_Z, D_DIAG, PREC, MM_DTYPE, BLOCK_L, BLOCK_M, BLOCK_K, BLOCK_D,
                BLOCK_P, BLOCK_N, True,
            )
        else:
            _scan_block(
                x_ptr, C_ptr, D_ptr, z_ptr, out_ptr, hin_ptr, cum_ptr, dts_ptr, cb_ptr,
                c, bos, length, m0, head, group, ngroups, slot, pblk, dim, dstate,
                s_x_tok, s_x_head, s_x_dim, s_C_tok, s_C_group, s_C_n, s_z_tok, s_z_head,
                s_z_dim, s_out_tok, s_out_head, s_out_dim, s_D_head, s_D_dim,
                HAS_D, HAS_Z, D_DIAG, PREC, MM_DTYPE, BLOCK_L, BLOCK_M, BLOCK_K, BLOCK_D,
                BLOCK_P, BLOCK_N, False,
            )
