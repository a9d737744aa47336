"""Jitted helpers the Triton kernels share. Triton inlines them where they are called, so a
kernel compiles to what it would with the expression written out."""

from __future__ import annotations

from ._common import tl, triton

if triton is not None:
    LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

    @triton.jit
    def silu(x):
        """``x * sigmoid(x)`` (fp32) in two special-function instructions: ``exp2`` compiles
        to one ex2 (flushing subnormal results, which only ever multiply), ``fdiv`` to the
        approximate full-range division. ``tl.sigmoid`` adds a subnormal fix-up around its
        ex2 and a multiply: 15 instructions per element against 9."""
        return tl.fdiv(x, 1.0 + tl.exp2(x * -LOG2E))

    @triton.jit
    def softplus(x):
        """torch's softplus: linear above 20, where exp would lose the log1p term anyway."""
        return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)

    @triton.jit
    def step_size(dt, bias, dt_lo, dt_hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                  HAS_LIMIT: tl.constexpr):
        """The step size the recurrence uses: ``dt`` (fp32) plus the bias, through softplus,
        clamped to ``[dt_lo, dt_hi]``, each where its flag says. The clamp keeps a NaN step
        NaN, as torch's does (min/max without NaN propagation return the bound)."""
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = softplus(dt)
        if HAS_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_lo, propagate_nan=tl.PropagateNan.ALL), dt_hi,
                            propagate_nan=tl.PropagateNan.ALL)
        return dt

    @triton.jit
    def per_head(ptr, head, s_head, offs_d, s_dim, mask_d, TIED: tl.constexpr):
        """A per-head parameter (D, dt_bias) in fp32: a scalar when tied over headdim, else
        one value per row of the tile."""
        if TIED:
            value = tl.load(ptr + head * s_head).to(tl.float32)
        else:
            value = tl.load(ptr + head * s_head + offs_d * s_dim, mask=mask_d,
                            other=0.0).to(tl.float32)
        return value

    @triton.jit
    def rate_step(a, dt):
        """``A * dt``, 0 where the step ``dt`` is 0: a step of length 0 keeps the state
        whatever the rate, ``A = -inf`` included (IEEE makes ``-inf * 0`` NaN; the native
        ops' ``_step.decay``)."""
        return tl.where(dt == 0, 0.0, a * dt)

    @triton.jit
    def real_row(row, pad_slot_id, nslots):
        """Whether ``row`` (a scalar or a block) names a row of the state: not the pad and
        inside ``[0, nslots)``. Compiled calls skip the value checks, and a bad index must
        not touch memory beside the state (the next layer's cache, when the state is a view
        of a larger one)."""
        return and_real_row(True, row, pad_slot_id, nslots)

    @triton.jit
    def and_real_row(cond, row, pad_slot_id, nslots):
        """``cond`` and :func:`real_row`, ANDed from the left as the kernels were written
        and timed: the association changes ptxas' instruction schedule."""
        return cond & (row != pad_slot_id) & (row >= 0) & (row < nslots)

    @triton.jit
    def only_if(cond, mask):
        """``mask`` where the scalar ``cond`` holds, else all False. A scalar condition
        enters a block mask through ``tl.where``: ``&`` of a scalar and a block breaks the
        interpreter."""
        return tl.where(cond, mask, False)

    @triton.jit
    def clamped_range(first, end, ntokens):
        """(first token, token count) of sequences whose offsets ``first`` and ``end``
        (int64 scalars or blocks, unchecked in compiled calls) are clamped to
        ``[0, ntokens]``: an end before the start is an empty sequence."""
        first = tl.minimum(tl.maximum(first, 0), ntokens)
        return first, tl.maximum(tl.minimum(end, ntokens) - first, 0)

    @triton.jit
    def token_range(bounds_ptr, seq, s_bounds, ntokens):
        """(first token, token count) of sequence ``seq`` from cumulative ``bounds``, both
        int64; bounds outside ``[0, ntokens]`` (unchecked, compiled) shorten the sequence."""
        start = tl.maximum(tl.load(bounds_ptr + seq * s_bounds).to(tl.int64), 0)
        end = tl.minimum(tl.load(bounds_ptr + (seq + 1) * s_bounds).to(tl.int64), ntokens)
        return start, tl.maximum(end - start, 0)

    @triton.jit
    def window_start(offset, state_len, W: tl.constexpr):
        """An unchecked conv window offset clamped into the row, once per program: a column
        mask on every window load instead cost 4-17 % of decode time (H100, 2026-11-23,
        batch 16-512)."""
        return tl.minimum(tl.maximum(offset, 0), state_len - (W - 1))

    # -- quantized state rows (mamba_ir/ops/_quant.py) ------------------------------------

    ROUNDER: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23
    ROUNDER_BITS: tl.constexpr = tl.constexpr(0x4B400000)  # its float32 bits
    INF: tl.constexpr = tl.constexpr(float("inf"))
    # Triton decides when a kernel is defined whether it runs interpreted
    INTERPRETED: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))

    @triton.jit
    def round_half_even(v):
        """``v`` (fp32, ``|v| < 2**22``) rounded to an integer, ties to even, in fp32: the
        sum with 1.5 * 2**23 keeps no fraction bits, and fp32 addition rounds to nearest
        even. libdevice's ``rint`` would be one instruction, but the interpreter has no
        libdevice. ``v`` must not be a product computed just before: the compiler would
        fuse the multiply and the add into one FMA, which rounds the exact product rather
        than its fp32 value (:func:`round_e4m3` may: its product is exact)."""
        return (v + ROUNDER) - ROUNDER

    @triton.jit
    def round_to_int32(v):
        """:func:`round_half_even` as an int32: the sum's low mantissa bits are the integer
        (offset by the constant's), so an integer subtraction replaces the float one and
        the float-to-integer conversion, which an SM issues at a fraction of its float32
        rate."""
        return (v + ROUNDER).to(tl.int32, bitcast=True) - ROUNDER_BITS

    @triton.jit
    def round_e4m3(v):
        """``v`` (fp32, ``|v| <= 448``) rounded to the nearest float8 e4m3 value, ties to
        even, still fp32, so that the conversion after it is exact: for the interpreter,
        whose fp32 to e4m3 conversion rounds ties away from zero and mishandles a carry
        into the exponent (the GPU's, ``cvt.rn.satfinite.e4m3x2.f32``, rounds to nearest
        even as torch does, in one instruction for two values). At binary exponent ``e``
        (at least -6, below which e4m3 is subnormal) e4m3 steps by ``2**(e - 3)``, so
        ``|v| / 2**(e - 3)`` rounded to an integer and scaled back is the rounded value;
        both scalings are by powers of two, exact. The sign is put back last, so a
        negative value that rounds to zero is -0, as in torch."""
        a = tl.abs(v)
        e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23), 121)  # biased; 121: 2**-6
        up = ((257 - e) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e)
        down = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
        r = round_half_even(a * up) * down
        return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    # -- stochastic rounding (mamba_ir/ops/_philox.py, _quant.py) ---------------------------

    @triton.jit
    def philox(seed, c0, c1, c2):
        """The four words of Philox4x32-10 for counter ``(c0, c1, c2, 0)`` (uint32) under
        key ``(seed low word, seed high word)`` (``seed`` int64): ``_philox.philox``."""
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c3 = tl.zeros_like(c0)
        for _ in tl.static_range(10):
            a0, a2 = c0, c2
            c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
            c1 = tl.mul(a2, tl.full([], 0xCD9E8D57, tl.uint32), sanitize_overflow=False)
            c3 = tl.mul(a0, tl.full([], 0xD2511F53, tl.uint32), sanitize_overflow=False)
            k0 = tl.add(k0, tl.full([], 0x9E3779B9, tl.uint32), sanitize_overflow=False)
            k1 = tl.add(k1, tl.full([], 0xBB67AE85, tl.uint32), sanitize_overflow=False)
        return c0, c1, c2, c3

    @triton.jit
    def tile_bits(seed, row, column, first, BLOCK_N: tl.constexpr, QUADS: tl.constexpr):
        """The random bits of a ``(len(first), BLOCK_N)`` state tile stored into ``row``
        for token ``column``, whose tile rows start at flat element ``first`` (int64)
        within the row: element ``e`` takes word ``e % 4`` of the Philox counter
        ``(e // 4, row, column, 0)`` (``_philox.state_bits``).

        ``QUADS`` (every ``first`` a multiple of 4, ``BLOCK_N`` too): one Philox per four
        columns, its words interleaved into their places, so the tile pays a quarter of
        the multiplies. Otherwise a quad may straddle two tile rows, and each element
        runs the Philox of its own quad and keeps its word."""
        if QUADS:
            quad = (first // 4)[:, None] + tl.arange(0, BLOCK_N // 4)[None, :]
        else:
            element = first[:, None] + tl.arange(0, BLOCK_N)[None, :]
            quad = element // 4
        zero = tl.zeros_like(quad).to(tl.int64)
        # int64 to uint32 keeps the low word, as the native counter's mask does
        c0, c1, c2, c3 = philox(seed, quad.to(tl.uint32), (zero + row).to(tl.uint32),
                                (zero + column).to(tl.uint32))
        if QUADS:
            # interleave(a, b) alternates a's and b's columns: c0 c1 c2 c3, c0 c1 ...
            bits = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
        else:
            word = element % 4
            bits = tl.where(word < 2, tl.where(word == 0, c0, c1),
                            tl.where(word == 2, c2, c3))
        return bits

    @triton.jit
    def round_stochastic(v, bits, MBITS: tl.constexpr, EMIN: tl.constexpr,
                         FMAX: tl.constexpr):
        """``v`` (fp32) rounded to one of its two neighbours on a grid, up with probability
        its distance from the lower one in steps (``_quant.round_stochastic``), still fp32
        and exactly representable, so the conversion after it does not round again.
        ``MBITS`` 0: the integers; else a float grid of ``MBITS`` mantissa bits whose step
        is ``2**(max(e, EMIN) - MBITS)`` at binary exponent ``e``; beyond ``FMAX``, inf and
        NaN, ``v`` itself (the conversion rounds those to nearest)."""
        r = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: exact
        if MBITS == 0:
            t = v
        else:
            e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            k = tl.maximum(e, EMIN) - MBITS
            step = ((k + 127) << 23).to(tl.float32, bitcast=True)
            t = v * ((127 - k) << 23).to(tl.float32, bitcast=True)
        low = tl.floor(t)
        q = tl.where(r < t - low, low + 1.0, low)
        if MBITS != 0:
            q = tl.where(tl.abs(v) <= FMAX, q * step, v)
        return q

    @triton.jit
    def quantize_rows(h, QMAX: tl.constexpr, DTYPE: tl.constexpr, bits=None,
                      SR: tl.constexpr = False):
        """Each row of ``h`` (fp32) as ``DTYPE`` values and one fp32 scale, bit for bit as
        ``mamba_ir/ops/_quant.quantize`` computes them on the CPU: scale = absmax / QMAX,
        values h * inverse rounded to nearest even and clamped to [-QMAX, QMAX]; an
        all-zero row: scale 0 and zeros; a row with inf or NaN: zeros under a NaN scale.

        The inverse is ``(1 / absmax) * QMAX``, two roundings, because that is what
        native's ``qmax / absmax`` computes (torch's ``Tensor.__rtruediv__`` multiplies by
        the reciprocal). Divisions are correctly rounded (``div_rn``: ``/`` may compile to
        an approximate division). Columns of ``h`` past the block must hold zeros, or the
        row be non-finite anyway, as in a state tile whose masked columns start at zero and
        only ever gain ``dt * x * 0``."""
        # NaN-propagating max: tl.max compiles to maxnum, which drops NaN
        absmax = tl.reduce(tl.abs(h), 1, _max_nan)
        finite = absmax < INF  # False for inf and NaN
        scale = tl.where(finite, tl.math.div_rn(absmax, QMAX), float("nan"))
        inverse = tl.where(finite & (absmax > 0.0), tl.math.div_rn(1.0, absmax) * QMAX, 0.0)
        v = h * inverse[:, None]  # 0, or NaN for inf and NaN, in a non-finite row
        if DTYPE.is_fp8():
            v = tl.where(finite[:, None], v, 0.0)  # +0: the sign of a zero is kept
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            if SR:
                v = round_stochastic(v, bits, 3, -6, 448.0)
            elif INTERPRETED:
                v = round_e4m3(v)
            q = v.to(DTYPE)  # round to nearest even (exact after a stochastic round)
        else:
            # clamped to [0, 0] in a non-finite row (min and max drop NaN): zeros without
            # a select per value. Clamped before rounding, which is the same for an integer
            # bound, so the rounding add reads a min, not the product, and cannot fuse with it
            bound = tl.where(finite, QMAX, 0.0)[:, None]
            if SR:
                v = round_stochastic(tl.minimum(tl.maximum(v, -bound), bound), bits, 0, 0, 0.0)
                q = v.to(tl.int32).to(DTYPE)
            else:
                q = round_to_int32(tl.minimum(tl.maximum(v, -bound), bound)).to(DTYPE)
        return q, scale
