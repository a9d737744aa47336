"""The Triton kernel behind ``selective_scan`` (Mamba1 prefill).

One program owns ``BLOCK_D`` channels x the whole ``dstate`` of one sequence. It loads
that state tile once from the source row (zeros without an initial state) and runs the
sequence's tokens through it in fp32 registers, storing it once at the end (and at each
block boundary for align-mode checkpoints). The sequence is read in chunks of ``BLOCK_T``
tokens: ``u``, ``delta``, ``z`` and the output move as ``(channels, tokens)`` tiles, so
those loads and stores are coalesced whichever axis is contiguous (vLLM passes both),
and each token's step size and input are picked from the tiles in registers. ``B`` and
``C`` are a ``dstate`` vector per token shared by every program of the group, so they are
loaded per token. The sequence's last chunk steps only the tokens it has (a branch that
is uniform across the program).
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import only_if, rate_step, real_row, step_size, token_range

if triton is not None:

    @triton.jit
    def _tokens_tile(ptr, chans, toks, s_d, s_t, mask):
        """A ``(channels, tokens)`` tile of a channel-first tensor, as fp32."""
        offs = chans[:, None] * s_d + toks[None, :] * s_t
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.heuristics({
        "HAS_D": given("D_ptr"), "HAS_Z": given("z_ptr"), "HAS_BIAS": given("bias_ptr"),
        "HAS_DST": given("dst_ptr"), "HAS_SRC": given("src_ptr"), "HAS_INIT": given("init_ptr"),
        "HAS_DONE": given("done_ptr"), "CHECKPOINTS": given("ckpt_ptr"),
    })
    @triton.jit
    def scan_kernel(
        u_ptr, delta_ptr, z_ptr, out_ptr, state_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,
        qsl_ptr, dst_ptr, src_ptr, init_ptr, done_ptr, ckpt_ptr,
        dim, dstate, per_group, pad_slot_id, block_size, nslots, ntok, ncols,
        s_u, s_delta, s_z, s_out, s_state, s_A, s_B, s_C, s_D, s_bias,
        s_qsl, s_dst, s_src, s_init, s_done, s_ckpt,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_DST: tl.constexpr, HAS_SRC: tl.constexpr,
        HAS_INIT: tl.constexpr, HAS_DONE: tl.constexpr, CHECKPOINTS: tl.constexpr,
        ONE_GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        # strides: one tuple per tensor
        s_u_d, s_u_t = s_u
        s_delta_d, s_delta_t = s_delta
        s_z_d, s_z_t = s_z
        s_out_d, s_out_t = s_out
        s_state_row, s_state_d, s_state_n = s_state
        s_A_d, s_A_n = s_A
        s_B_g, s_B_n, s_B_t = s_B
        s_C_g, s_C_n, s_C_t = s_C
        s_ckpt_seq, s_ckpt_col = s_ckpt
        seq = tl.program_id(0).to(tl.int64)
        first_chan = tl.program_id(1) * BLOCK_D
        # tokens outside the call are never touched, whatever an unchecked call passes
        bos, length = token_range(qsl_ptr, seq, s_qsl, ntok)
        if HAS_DST:
            dst = tl.load(dst_ptr + seq * s_dst).to(tl.int64)
        else:
            dst = seq
        if HAS_SRC:
            src = tl.load(src_ptr + seq * s_src).to(tl.int64)
        else:
            src = dst
        done = seq * 0
        if HAS_DONE:  # at least 0: a negative count would give negative checkpoint columns
            done = tl.maximum(tl.load(done_ptr + seq * s_done).to(tl.int64), 0)

        chans = (first_chan + tl.arange(0, BLOCK_D)).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        cols = tl.arange(0, BLOCK_T)
        mask_d = chans < dim
        mask_n = offs_n < dstate
        tile = chans[:, None] * s_state_d + offs_n[None, :] * s_state_n
        tile_mask = mask_d[:, None] & mask_n[None, :]

        if HAS_INIT:
            # without an initial state (or from a pad source) the masked load reads nothing
            reads = real_row(src, pad_slot_id, nslots) & (tl.load(init_ptr + seq * s_init) != 0)
            h = tl.load(state_ptr + src * s_state_row + tile,
                        mask=only_if(reads, tile_mask), other=0.0).to(tl.float32)
        else:
            h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        A = tl.load(A_ptr + chans[:, None] * s_A_d + offs_n[None, :] * s_A_n,
                    mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_D:
            skip = tl.load(D_ptr + chans * s_D, mask=mask_d, other=0.0).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + chans * s_bias, mask=mask_d,
                           other=0.0).to(tl.float32)[:, None]
        # B and C rows of the sequence's first token: one group's vector, or each channel's
        if ONE_GROUP:
            B_rows = B_ptr + (first_chan // per_group) * s_B_g + offs_n * s_B_n + bos * s_B_t
            C_rows = C_ptr + (first_chan // per_group) * s_C_g + offs_n * s_C_n + bos * s_C_t
        else:
            groups = chans // per_group
            B_rows = B_ptr + groups[:, None] * s_B_g + offs_n[None, :] * s_B_n + bos * s_B_t
            C_rows = C_ptr + groups[:, None] * s_C_g + offs_n[None, :] * s_C_n + bos * s_C_t

        for c0 in range(0, length, BLOCK_T):
            toks = bos + c0 + cols
            mask = mask_d[:, None] & (c0 + cols < length)[None, :]
            x = _tokens_tile(u_ptr, chans, toks, s_u_d, s_u_t, mask)
            dt = _tokens_tile(delta_ptr, chans, toks, s_delta_d, s_delta_t, mask)
            dt = step_size(dt, bias, None, None, HAS_BIAS, SOFTPLUS, False)
            dtx = dt * x
            y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
            for i in tl.static_range(BLOCK_T):
                if c0 + i < length:  # the last chunk steps no token past the sequence
                    # this token's step size and input, picked from the chunk's tiles; B and
                    # C loaded (inline: the interpreter pays per call of a jit function)
                    pick = cols[None, :] == i
                    dt_i = tl.sum(tl.where(pick, dt, 0.0), axis=1)[:, None]
                    dtx_i = tl.sum(tl.where(pick, dtx, 0.0), axis=1)[:, None]
                    if ONE_GROUP:  # every channel of the block reads the same group's vector
                        b = tl.load(B_rows + (c0 + i) * s_B_t, mask=mask_n, other=0.0)
                        c = tl.load(C_rows + (c0 + i) * s_C_t, mask=mask_n, other=0.0)
                        b, c = b.to(tl.float32)[None, :], c.to(tl.float32)[None, :]
                    else:
                        b = tl.load(B_rows + (c0 + i) * s_B_t, mask=tile_mask, other=0.0)
                        c = tl.load(C_rows + (c0 + i) * s_C_t, mask=tile_mask, other=0.0)
                        b, c = b.to(tl.float32), c.to(tl.float32)
                    h = h * tl.exp(rate_step(A, dt_i)) + dtx_i * b
                    y = tl.where(pick, tl.sum(h * c, axis=1)[:, None], y)
                    if CHECKPOINTS:
                        # position done + c0 + i + 1 of the request ends a block: the j-th
                        # such token of the call writes column j
                        ends = done + c0 + i + 1
                        column = ends // block_size - done // block_size - 1
                        if (ends % block_size == 0) & (column < ncols):
                            row = tl.load(ckpt_ptr + seq * s_ckpt_seq + column * s_ckpt_col)
                            row = row.to(tl.int64)
                            tl.store(state_ptr + row * s_state_row + tile,
                                     h.to(state_ptr.dtype.element_ty),
                                     mask=only_if(real_row(row, pad_slot_id, nslots),
                                                  tile_mask))
            if HAS_D:
                y = y + skip[:, None] * x
            if HAS_Z:
                zt = _tokens_tile(z_ptr, chans, toks, s_z_d, s_z_t, mask)
                y = y * zt * tl.sigmoid(zt)
            out = out_ptr + chans[:, None] * s_out_d + toks[None, :] * s_out_t
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)

        # a pad destination (or a row outside the state), or a sequence without tokens,
        # writes nothing
        writes = real_row(dst, pad_slot_id, nslots) & (length > 0)
        tl.store(state_ptr + dst * s_state_row + tile, h.to(state_ptr.dtype.element_ty),
                 mask=only_if(writes, tile_mask))
