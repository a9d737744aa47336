"""The Triton kernels behind ``mamba_chunk_scan``: the chunked SSD form of the Mamba2 scan.

Chunks belong to one sequence and start at every request position that is a multiple of
the chunk size (position = tokens already computed + index in the call), so a sequence's
first and last chunks may be short and every align-mode block boundary is a chunk end.
Three launches, none of which waits on the host:

1. ``chunk_offsets_kernel`` (one program): the first global chunk of every sequence, a
   prefix sum of the chunk counts. The grids are sized by an upper bound of the chunk
   count, read from shapes alone, so the call stays CUDA-graph capturable.
2. ``chunk_state_kernel`` (one program per sequence, head and headdim block): reads the
   source row once, walks the sequence's chunks in order carrying the state in fp32
   registers, and per chunk (a) stores the state entering it (in the matmul input dtype:
   it only feeds the next kernel's tensor-core product) and the per-token step sizes and
   within-chunk decay sums, (b) adds the chunk's contribution ``x^T (B * weights)`` on
   tensor cores, and (c) stores checkpoints at block boundaries and the final state to the
   destination row. Reading the whole source tile before any store makes src == dst safe.
3. ``chunk_scan_kernel`` (one program per chunk, block of its tokens, head and headdim
   block): ``y = exp(cum) * (C @ H_in^T) + (C B^T * decay * dt, causal) @ x (+ D x)``,
   gated by ``silu(z)``, the intra-chunk product recomputed per head on tensor cores
   instead of stored (that costs fewer bytes than it saves).

Offsets that can pass 2**31 (tokens x strides, rows x row stride, chunks x state size) are
int64; matmul operands are the inputs' 16-bit dtype with fp32 accumulation, or fp32 with
IEEE products when the inputs are fp32 or of mixed dtypes.
"""

from __future__ import annotations

from ._common import tl, triton

if triton is not None:

    @triton.jit
    def chunk_offsets_kernel(
        cu_ptr, done_ptr, offs_ptr, nseq, chunk,
        s_cu, s_done,
        HAS_DONE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """``offs[b]``: the first global chunk of sequence b; ``offs[nseq]``: the chunk count."""
        carry = tl.program_id(0).to(tl.int64) * 0
        tl.store(offs_ptr, carry.to(tl.int32))
        for start in range(0, nseq, BLOCK):
            b = start + tl.arange(0, BLOCK)
            live = b < nseq
            lo = tl.load(cu_ptr + b * s_cu, mask=live, other=0).to(tl.int64)
            hi = tl.load(cu_ptr + (b + 1) * s_cu, mask=live, other=0).to(tl.int64)
            n = hi - lo
            lead = tl.zeros_like(n)
            if HAS_DONE:
                lead = tl.load(done_ptr + b * s_done, mask=live, other=0).to(tl.int64) % chunk
            count = tl.where(n > 0, (lead + n + chunk - 1) // chunk, 0)
            tl.store(offs_ptr + 1 + b, (tl.cumsum(count, 0) + carry).to(tl.int32), mask=live)
            carry += tl.sum(count, 0)

    @triton.jit
    def _step_sizes(dt_ptr, tok, head, live, s_dt_tok, s_dt_head, a, bias, lo, hi,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
        """dt of the given tokens after bias, softplus and clamp; 0 where not ``live``."""
        d = tl.load(dt_ptr + tok * s_dt_tok + head * s_dt_head, mask=live, other=0.0)
        d = d.to(tl.float32)
        if HAS_BIAS:
            d = d + bias
        if SOFTPLUS:
            # torch's softplus: linear above 20, where exp would lose the log1p term anyway
            d = tl.where(d <= 20.0, tl.log(1.0 + tl.exp(d)), d)
        if HAS_LIMIT:
            d = tl.minimum(tl.maximum(d, lo), hi)
        return tl.where(live, d, 0.0)

    @triton.jit
    def chunk_state_kernel(
        state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr,
        cu_ptr, done_ptr, src_ptr, dst_ptr, ckpt_ptr,
        offs_ptr, table_ptr, hin_ptr, cum_ptr, dts_ptr,
        pad_slot_id, nheads, dim, dstate, heads_per_group, chunk, block_size, bound,
        dt_lo, dt_hi,
        s_state_row, s_state_head, s_state_dim, s_state_n,
        s_x_tok, s_x_head, s_x_dim,
        s_dt_tok, s_dt_head,
        s_B_tok, s_B_group, s_B_n,
        s_A, s_bias,
        s_cu, s_done, s_src, s_dst, s_ckpt_seq, s_ckpt_col,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        HAS_DONE: tl.constexpr, HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        HAS_CKPT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        pblk = tl.program_id(2)
        group = head // heads_per_group
        bos = tl.load(cu_ptr + seq * s_cu).to(tl.int64)
        length = tl.load(cu_ptr + (seq + 1) * s_cu).to(tl.int64) - bos
        done = seq * 0
        if HAS_DONE:
            done = tl.load(done_ptr + seq * s_done).to(tl.int64)
        lead = done % chunk
        nchunks = tl.where(length > 0, (lead + length + chunk - 1) // chunk, 0)
        first = tl.load(offs_ptr + seq).to(tl.int64)
        # both row indices up front: the destination may be the source row
        src = seq
        if HAS_SRC:
            src = tl.load(src_ptr + seq * s_src).to(tl.int64)
        dst = src
        if HAS_DST:
            dst = tl.load(dst_ptr + seq * s_dst).to(tl.int64)

        offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        mask_p = offs_p < dim
        mask_n = offs_n < dstate
        tile = offs_p[:, None] * s_state_dim + offs_n[None, :] * s_state_n
        tile_mask = mask_p[:, None] & mask_n[None, :]
        head_off = head * s_state_head
        h = tl.load(state_ptr + src * s_state_row + head_off + tile,
                    mask=tl.where(src != pad_slot_id, tile_mask, False), other=0.0)
        h = h.to(tl.float32)
        a = tl.load(A_ptr + head * s_A).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + head * s_bias).to(tl.float32)
        # only one program per (sequence, head) writes the per-token scratch
        owner = pblk == 0
        hin_tile = offs_p[:, None] * BLOCK_N + offs_n[None, :]
        hin_dtype = hin_ptr.dtype.element_ty

        for k in range(nchunks):
            lo = tl.maximum(k * chunk - lead, 0)
            hi = tl.minimum((k + 1) * chunk - lead, length)
            c = first + k
            if owner:
                if head == 0:
                    tl.store(table_ptr + c, seq.to(tl.int32))
                    tl.store(table_ptr + bound + c, (bos + lo).to(tl.int32))
                    tl.store(table_ptr + 2 * bound + c, (hi - lo).to(tl.int32))
            slot = c * nheads + head
            tl.store(hin_ptr + slot * dim * BLOCK_N + hin_tile, h.to(hin_dtype),
                     mask=mask_p[:, None])
            carry = 0.0
            for t0 in range(lo, hi, BLOCK_T):
                pos = t0 + offs_t
                live = pos < hi
                tok = bos + pos
                d = _step_sizes(dt_ptr, tok, head, live, s_dt_tok, s_dt_head, a, bias,
                                dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
                cum = tl.cumsum(d * a, 0)
                total = tl.sum(d * a, 0)
                if owner:
                    at = slot * BLOCK_L + (pos - lo)
                    tl.store(cum_ptr + at, cum + carry, mask=live)
                    tl.store(dts_ptr + at, d, mask=live)
                carry += total
                # each token's contribution decays to the end of this block of tokens
                weight = tl.exp(total - cum) * d
                xt = tl.load(x_ptr + tok[:, None] * s_x_tok + head * s_x_head
                             + offs_p[None, :] * s_x_dim,
                             mask=live[:, None] & mask_p[None, :], other=0.0)
                bt = tl.load(B_ptr + tok[:, None] * s_B_tok + group * s_B_group
                             + offs_n[None, :] * s_B_n,
                             mask=live[:, None] & mask_n[None, :], other=0.0)
                bw = (bt.to(tl.float32) * weight[:, None]).to(hin_dtype)
                h = tl.dot(tl.trans(xt.to(hin_dtype)), bw, acc=h * tl.exp(total),
                           input_precision=PREC)
            if HAS_CKPT:
                end = done + hi
                if end % block_size == 0:
                    col = end // block_size - done // block_size - 1
                    row = tl.load(ckpt_ptr + seq * s_ckpt_seq + col * s_ckpt_col).to(tl.int64)
                    tl.store(state_ptr + row * s_state_row + head_off + tile,
                             h.to(state_ptr.dtype.element_ty),
                             mask=tl.where(row != pad_slot_id, tile_mask, False))

        tl.store(state_ptr + dst * s_state_row + head_off + tile,
                 h.to(state_ptr.dtype.element_ty),
                 mask=tl.where((dst != pad_slot_id) & (length > 0), tile_mask, False))

    @triton.jit
    def chunk_scan_kernel(
        x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
        offs_ptr, table_ptr, hin_ptr, cum_ptr, dts_ptr,
        nseq, nheads, dim, dstate, heads_per_group, bound,
        s_x_tok, s_x_head, s_x_dim,
        s_B_tok, s_B_group, s_B_n,
        s_C_tok, s_C_group, s_C_n,
        s_z_tok, s_z_head, s_z_dim,
        s_out_tok, s_out_head, s_out_dim,
        s_D_head, s_D_dim,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # heads vary fastest so the heads of one group (one B/C chunk) run side by side
        pid = tl.program_id(0)
        pblocks = tl.cdiv(dim, BLOCK_P)
        mblocks = BLOCK_L // BLOCK_M
        pblk = pid % pblocks
        head = (pid // pblocks) % nheads
        mblk = (pid // pblocks // nheads) % mblocks
        c = (pid // pblocks // nheads // mblocks).to(tl.int64)
        if c >= tl.load(offs_ptr + nseq):
            return
        length = tl.load(table_ptr + 2 * bound + c)
        m0 = mblk * BLOCK_M
        if m0 >= length:
            return
        bos = tl.load(table_ptr + bound + c).to(tl.int64)
        head = head.to(tl.int64)
        group = head // heads_per_group
        slot = c * nheads + head
        hin_dtype = hin_ptr.dtype.element_ty

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_p = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < length
        mask_p = offs_p < dim
        mask_n = offs_n < dstate
        tok_m = bos + offs_m

        cum_m = tl.load(cum_ptr + slot * BLOCK_L + offs_m, mask=mask_m, other=0.0)
        cm = tl.load(C_ptr + tok_m[:, None] * s_C_tok + group * s_C_group
                     + offs_n[None, :] * s_C_n,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(hin_dtype)
        # the state entering the chunk, as (dstate, headdim)
        hin = tl.load(hin_ptr + slot * dim * BLOCK_N + offs_p[None, :] * BLOCK_N
                      + offs_n[:, None], mask=mask_p[None, :], other=0.0)
        acc = tl.dot(cm, hin, input_precision=PREC) * tl.exp(cum_m)[:, None]

        end = tl.minimum(m0 + BLOCK_M, length)
        for s0 in range(0, end, BLOCK_K):
            offs_s = s0 + offs_k
            mask_s = offs_s < length
            tok_s = bos + offs_s
            bs = tl.load(B_ptr + tok_s[:, None] * s_B_tok + group * s_B_group
                         + offs_n[None, :] * s_B_n,
                         mask=mask_s[:, None] & mask_n[None, :], other=0.0).to(hin_dtype)
            cb = tl.dot(cm, tl.trans(bs), input_precision=PREC)
            cum_s = tl.load(cum_ptr + slot * BLOCK_L + offs_s, mask=mask_s, other=0.0)
            d_s = tl.load(dts_ptr + slot * BLOCK_L + offs_s, mask=mask_s, other=0.0)
            causal = (offs_s[None, :] <= offs_m[:, None]) & mask_s[None, :]
            decay = tl.exp(tl.minimum(cum_m[:, None] - cum_s[None, :], 0.0))
            w = tl.where(causal, cb * decay * d_s[None, :], 0.0)
            xs = tl.load(x_ptr + tok_s[:, None] * s_x_tok + head * s_x_head
                         + offs_p[None, :] * s_x_dim,
                         mask=mask_s[:, None] & mask_p[None, :], other=0.0)
            acc = tl.dot(w.to(hin_dtype), xs.to(hin_dtype), acc=acc, input_precision=PREC)

        mask_mp = mask_m[:, None] & mask_p[None, :]
        if HAS_D:
            xm = tl.load(x_ptr + tok_m[:, None] * s_x_tok + head * s_x_head
                         + offs_p[None, :] * s_x_dim, mask=mask_mp, other=0.0)
            dskip = tl.load(D_ptr + head * s_D_head + offs_p * s_D_dim, mask=mask_p, other=0.0)
            acc += xm.to(tl.float32) * dskip.to(tl.float32)[None, :]
        if HAS_Z:
            zm = tl.load(z_ptr + tok_m[:, None] * s_z_tok + head * s_z_head
                         + offs_p[None, :] * s_z_dim, mask=mask_mp, other=0.0).to(tl.float32)
            acc = acc * zm * tl.sigmoid(zm)
        tl.store(out_ptr + tok_m[:, None] * s_out_tok + head * s_out_head
                 + offs_p[None, :] * s_out_dim, acc.to(out_ptr.dtype.element_ty), mask=mask_mp)
