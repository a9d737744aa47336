"""The Triton kernel behind ``selective_state_update``.

One program owns ``BLOCK_D`` rows of one head's state for one sequence: it loads that tile
once from the source row, runs every token of the sequence through it in registers (fp32),
and stores it to the destination row once (or once per token under speculative decoding).
Decode is memory bound, so everything else here serves that one read and one write: the
per-token operands are tiny and shared (B/C per group stay in L2 because neighbouring
programs are neighbouring heads), ties (stride 0) become scalar loads, and offsets that
can pass 2**31 are computed in int64.

Every index tensor is read through its strides (a column of a 2-D tensor is a strided
1-D one). Rows outside ``[0, nslots)``, token offsets past the tokens and index columns
past the index tensor are never touched: compiled calls skip the value checks, and a bad
index must not write into memory beside the state (the next layer's cache, when the state
is a view of a larger one).

A quantized state (``QUANT``: int16, int8 or float8 e4m3 values with one fp32 scale per row
of the tile, ``mamba_ir/ops/_quant.py``) is dequantized as it is loaded and quantized as it
is stored: a quantization block is one row of the tile, so its absolute maximum is a
reduction within the program, and the state still crosses memory once each way. A float
state compiles to the code it had before the flag.
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import (
    only_if,
    per_head,
    quantize_rows,
    rate_step,
    real_row,
    round_stochastic,
    step_size,
    tile_bits,
    token_range,
)

if triton is not None:

    @triton.jit
    def _token(
        h, t, seq, bos, head, group, offs_d, offs_n, mask_d, mask_n,
        x_ptr, dt_ptr, z_ptr, out_ptr, B_ptr, C_ptr,
        a, d_skip, bias, dt_lo, dt_hi,
        s_x_seq, s_x_tok, s_x_head, s_x_dim,
        s_dt_seq, s_dt_tok, s_dt_head, s_dt_dim,
        s_z_seq, s_z_tok, s_z_head, s_z_dim,
        s_out_seq, s_out_tok, s_out_head, s_out_dim,
        s_B_seq, s_B_tok, s_B_group, s_B_n,
        s_C_seq, s_C_tok, s_C_group, s_C_n,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, DT_TIED: tl.constexpr, A_TIED: tl.constexpr,
        HAS_LIMIT: tl.constexpr,
    ):
        """Advance the state tile ``h`` by token ``t`` of the sequence and write its output."""
        tok = bos + t
        x = tl.load(x_ptr + seq * s_x_seq + tok * s_x_tok + head * s_x_head + offs_d * s_x_dim,
                    mask=mask_d, other=0.0).to(tl.float32)
        dt_base = dt_ptr + seq * s_dt_seq + tok * s_dt_tok + head * s_dt_head
        if DT_TIED:
            dt = tl.load(dt_base).to(tl.float32)
        else:
            dt = tl.load(dt_base + offs_d * s_dt_dim, mask=mask_d, other=0.0).to(tl.float32)
        dt = step_size(dt, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
        b = tl.load(B_ptr + seq * s_B_seq + tok * s_B_tok + group * s_B_group + offs_n * s_B_n,
                    mask=mask_n, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + seq * s_C_seq + tok * s_C_tok + group * s_C_group + offs_n * s_C_n,
                    mask=mask_n, other=0.0).to(tl.float32)
        if DT_TIED:
            decay = tl.exp(rate_step(a, dt))  # a scalar, or A's tile when A is not tied
        elif A_TIED:
            decay = tl.exp(rate_step(a, dt))[:, None]
        else:
            decay = tl.exp(rate_step(a, dt[:, None]))
        h = h * decay + (dt * x)[:, None] * b[None, :]
        y = tl.sum(h * c[None, :], axis=1)
        if HAS_D:
            y = y + d_skip * x
        if HAS_Z:
            z = tl.load(z_ptr + seq * s_z_seq + tok * s_z_tok + head * s_z_head + offs_d * s_z_dim,
                        mask=mask_d, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        out = out_ptr + seq * s_out_seq + tok * s_out_tok + head * s_out_head + offs_d * s_out_dim
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        return h

    @triton.jit
    def _store_tile(state_ptrs, scale_ptrs, h, tile_mask, scale_mask, seed, row, column,
                    first, QUANT: tl.constexpr, QMAX: tl.constexpr, STREAM: tl.constexpr,
                    SR: tl.constexpr, SR_MBITS: tl.constexpr, SR_EMIN: tl.constexpr,
                    SR_FMAX: tl.constexpr, SR_QUADS: tl.constexpr):
        """Store the state tile ``h`` into ``row``: rounded to the state's dtype (to
        nearest, or stochastically under ``SR`` by the bits of ``row``, token ``column``
        and each value's index, counted from its tile row's ``first`` element), or
        quantized (``QUANT``): values where
        ``tile_mask``, one scale per row of the tile where ``scale_mask``. A quantized
        tile's columns past dstate hold zeros (loaded as zeros, B's are zeros) unless the
        row is non-finite anyway (dt or x is), as ``quantize_rows`` needs."""
        bits = None
        if SR:
            bits = tile_bits(seed, row, column, first, h.shape[1], SR_QUADS)
        if QUANT:
            value, scale = quantize_rows(h, QMAX, state_ptrs.dtype.element_ty, bits, SR)
            tl.store(scale_ptrs, scale, mask=scale_mask)
        elif SR:
            value = round_stochastic(h, bits, SR_MBITS, SR_EMIN, SR_FMAX)
            value = value.to(state_ptrs.dtype.element_ty)
        else:
            value = h.to(state_ptrs.dtype.element_ty)
        if STREAM:
            tl.store(state_ptrs, value, mask=tile_mask, eviction_policy="evict_first")
        else:
            tl.store(state_ptrs, value, mask=tile_mask)

    @triton.heuristics({
        "HAS_D": given("D_ptr"), "HAS_Z": given("z_ptr"), "HAS_BIAS": given("bias_ptr"),
        "HAS_LIMIT": given("dt_lo"), "HAS_SRC": given("src_ptr"), "HAS_DST": given("dst_ptr"),
        "VARLEN": given("cu_ptr"), "SPEC": given("nacc_ptr"), "QUANT": given("scale_ptr"),
        "SR": given("seed_ptr"),
    })
    @triton.jit
    def ssu_kernel(
        state_ptr, x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
        src_ptr, dst_ptr, cu_ptr, nacc_ptr, scale_ptr, seed_ptr,
        pad_slot_id, nheads, dim, dstate, heads_per_group, tokens_per_seq,
        nslots, ntokens, src_cols, dst_cols, dt_lo, dt_hi, s_cu, s_nacc,
        s_state, s_x, s_dt, s_z, s_out, s_B, s_C, s_A, s_D, s_bias, s_src, s_dst, s_scale,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        VARLEN: tl.constexpr, SPEC: tl.constexpr, ONE_TOKEN: tl.constexpr,
        DT_TIED: tl.constexpr, A_TIED: tl.constexpr, D_TIED: tl.constexpr,
        BIAS_TIED: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STREAM: tl.constexpr,
        QUANT: tl.constexpr, QMAX: tl.constexpr,
        SR: tl.constexpr, SR_MBITS: tl.constexpr, SR_EMIN: tl.constexpr, SR_FMAX: tl.constexpr,
        SR_QUADS: tl.constexpr,
    ):
        # one stride tuple per tensor; per-token tensors: (sequence, token, inner dims)
        s_state_row, s_state_head, s_state_dim, s_state_n = s_state
        s_x_seq, s_x_tok, s_x_head, s_x_dim = s_x
        s_dt_seq, s_dt_tok, s_dt_head, s_dt_dim = s_dt
        s_z_seq, s_z_tok, s_z_head, s_z_dim = s_z
        s_out_seq, s_out_tok, s_out_head, s_out_dim = s_out
        s_B_seq, s_B_tok, s_B_group, s_B_n = s_B
        s_C_seq, s_C_tok, s_C_group, s_C_n = s_C
        s_A_head, s_A_dim, s_A_n = s_A
        s_D_head, s_D_dim = s_D
        s_bias_head, s_bias_dim = s_bias
        s_src_seq, s_src_col = s_src
        s_dst_seq, s_dst_col = s_dst
        s_scale_row, s_scale_head, s_scale_dim = s_scale

        # programs run head-major within a sequence so the heads of one group (one B/C
        # vector) are neighbours and the state they stream is contiguous
        pid = tl.program_id(0)
        nblk = tl.cdiv(dim, BLOCK_D)
        blk = pid % nblk
        head = (pid // nblk) % nheads
        seq = (pid // nblk // nheads).to(tl.int64)
        group = head // heads_per_group
        head = head.to(tl.int64)

        if VARLEN:
            bos, length = token_range(cu_ptr, seq, s_cu, ntokens)
        else:
            bos = seq * 0
            length = tokens_per_seq

        if HAS_SRC:
            if SPEC:
                col = tl.maximum(tl.load(nacc_ptr + seq * s_nacc).to(tl.int64) - 1, 0)
                col = tl.minimum(col, src_cols - 1)
            else:
                col = 0
            src = tl.load(src_ptr + seq * s_src_seq + col * s_src_col).to(tl.int64)
        else:
            src = seq
        # the destination row is read up front: loaded after the output store, its latency
        # would sit between the arithmetic and the state store (the store may alias it)
        if not SPEC:
            if HAS_DST:
                dst = tl.load(dst_ptr + seq * s_dst_seq).to(tl.int64)
            else:
                dst = src  # in place: column 0 of the indices, the row just read

        offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        tile = offs_d[:, None] * s_state_dim + offs_n[None, :] * s_state_n
        tile_mask = mask_d[:, None] & mask_n[None, :]
        head_off = head * s_state_head
        seed = 0
        first = offs_d  # unused without stochastic rounding
        if SR:  # the seed is read on the device: a CUDA graph replays each step's own
            seed = tl.load(seed_ptr).to(tl.int64)
            first = (head * dim + offs_d) * dstate  # each tile row's first element
        scale_head = 0

        # a pad source means a zero initial state: the masked load reads nothing
        src_mask = only_if(real_row(src, pad_slot_id, nslots), tile_mask)
        src_tile = state_ptr + src * s_state_row + head_off + tile
        if STREAM:
            h = tl.load(src_tile, mask=src_mask, other=0.0, eviction_policy="evict_first")
        else:
            h = tl.load(src_tile, mask=src_mask, other=0.0)
        h = h.to(tl.float32)
        if QUANT:  # one scale per row of the tile; a pad source's zeros stay zeros
            scale_head = head * s_scale_head + offs_d * s_scale_dim
            src_scale = tl.load(scale_ptr + src * s_scale_row + scale_head,
                                mask=only_if(real_row(src, pad_slot_id, nslots), mask_d),
                                other=0.0)
            h = h * src_scale[:, None]

        if A_TIED:
            a = tl.load(A_ptr + head * s_A_head).to(tl.float32)
        else:
            a = tl.load(A_ptr + head * s_A_head + offs_d[:, None] * s_A_dim
                        + offs_n[None, :] * s_A_n, mask=tile_mask, other=0.0).to(tl.float32)
        d_skip = 0.0
        if HAS_D:
            d_skip = per_head(D_ptr, head, s_D_head, offs_d, s_D_dim, mask_d, D_TIED)
        bias = 0.0
        if HAS_BIAS:
            bias = per_head(bias_ptr, head, s_bias_head, offs_d, s_bias_dim, mask_d, BIAS_TIED)

        # plain decode (one token) is a loop of one constant step, which compiles to
        # straight-line code
        steps = length
        if ONE_TOKEN:
            steps = 1
        for t in range(steps):
            h = _token(
                h, t, seq, bos, head, group, offs_d, offs_n, mask_d, mask_n,
                x_ptr, dt_ptr, z_ptr, out_ptr, B_ptr, C_ptr, a, d_skip, bias, dt_lo, dt_hi,
                s_x_seq, s_x_tok, s_x_head, s_x_dim,
                s_dt_seq, s_dt_tok, s_dt_head, s_dt_dim,
                s_z_seq, s_z_tok, s_z_head, s_z_dim,
                s_out_seq, s_out_tok, s_out_head, s_out_dim,
                s_B_seq, s_B_tok, s_B_group, s_B_n,
                s_C_seq, s_C_tok, s_C_group, s_C_n,
                HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, DT_TIED, A_TIED, HAS_LIMIT,
            )
            if SPEC:  # every token's state has its own slot (columns past the index: none)
                if HAS_DST:
                    row = tl.load(dst_ptr + seq * s_dst_seq + t * s_dst_col,
                                  mask=t < dst_cols, other=pad_slot_id).to(tl.int64)
                else:
                    row = tl.load(src_ptr + seq * s_src_seq + t * s_src_col,
                                  mask=t < src_cols, other=pad_slot_id).to(tl.int64)
                ok = real_row(row, pad_slot_id, nslots)
                row_scale = scale_ptr
                if QUANT:
                    row_scale = scale_ptr + row * s_scale_row + scale_head
                _store_tile(state_ptr + row * s_state_row + head_off + tile, row_scale, h,
                            only_if(ok, tile_mask), only_if(ok, mask_d), seed, row, t, first,
                            QUANT, QMAX, False, SR, SR_MBITS, SR_EMIN, SR_FMAX, SR_QUADS)

        if not SPEC:
            # a pad destination, or a sequence without tokens, writes nothing
            dst_mask = only_if(real_row(dst, pad_slot_id, nslots) & (length > 0), tile_mask)
            dst_tile = state_ptr + dst * s_state_row + head_off + tile
            dst_ok = real_row(dst, pad_slot_id, nslots) & (length > 0)
            dst_scale = scale_ptr
            if QUANT:
                dst_scale = scale_ptr + dst * s_scale_row + scale_head
            _store_tile(dst_tile, dst_scale, h, dst_mask,
                        only_if(dst_ok, mask_d), seed, dst, 0, first,
                        QUANT, QMAX, STREAM, SR, SR_MBITS, SR_EMIN, SR_FMAX, SR_QUADS)
