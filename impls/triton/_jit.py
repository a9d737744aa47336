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
