"""The Triton kernel behind ``replay_state_update``.

One program owns ``BLOCK_D`` rows of one head's state for one sequence, as the
``selective_state_update`` kernel does, and loads that tile of the source row's checkpoint
once. What it does next depends on the ring:

- **A flush** (the ring is full) replays the ring's entries into the tile in fp32
  registers, each entry loaded while the one before it is applied, in native's order
  (``h * exp(A dt) + (dt B) x``, so the two differ by the rounding of fused multiply-adds,
  not by reassociation), advances it by the new token and stores it, rounded once, as the
  new checkpoint.
- **An append** (``DIRECT``, A tied) computes the output without building the state:
  ``C . h0`` decayed over the ring and the token, plus each entry's ``(C . B_k) x_k``
  weighted by its decay (``_direct``): about one multiply-add per state element, where
  the replay costs two per element and entry. Without ``DIRECT`` an append replays as a
  flush does and stores nothing.

Either way the output is ``C . h`` (for a flush, of the replayed state before the token's
decay, as ``_direct`` with no entries left) plus ``D x``, gated by ``z``. An append then
writes the token's entry (``x`` by every program of the sequence, its tile of it; the step
size by one program per head; ``B`` by one program per group). A step writes the state
only at a flush, or where the destination is another row (the checkpoint and the entries
move along, as native's append defines).

**Who writes ``ring_len``.** Every program of a sequence reads the source row's length,
and one length is written per sequence. Where the destination is another row nobody
reads it (the row rules), so the sequence's first program writes it. In place the write
must wait until every program of the sequence has read the length: each program's read
is an atomic add of a ticket (``TICKET``, above the length's bits), which returns the
length under the tickets of the programs before it; the program that draws the last
ticket knows every other one has read, and stores the new length over the tickets. A
row's length lies in ``[0, ring]`` (checked calls), so the low 16 bits, sign-extended,
are the length whatever the tickets above them; the launcher keeps a sequence's program
count below ``2**15`` so that no ticket reaches the sign bit. (An unchecked in-place
length outside ``[-2**15, 2**15)`` reads as another one, clamped to ``[0, ring]`` as
native clamps; nothing outside the tensors is touched.) One launch, no scratch memory,
nothing to reset between CUDA graph replays.

**Speculative calls** (``T`` tokens a sequence, a constant: ``T = 0`` is the one-token
kernel, compiled as before) roll back by a count: the committed entries are the source's
``ring_len - T + num_accepted_tokens``. A flush replays them into the tile and stores it;
otherwise each token's ``C_t . h`` comes from the checkpoint and the entries directly
(``_ring_per_token``), and the tokens' own terms from a ``T x T`` triangle of decays.
The tokens' entries are ``replay_tokens_kernel``'s, a second launch: in place a flush
puts them at entry 0, which other programs of the first launch may still be reading.
"""

from __future__ import annotations

from ._common import given, tl, triton
from ._jit import only_if, per_head, rate_step, real_row, step_size

TICKET_BITS = 16
MAX_PROGRAMS_PER_SEQUENCE = 1 << (31 - TICKET_BITS)  # tickets stay below the sign bit
MAX_RING = (1 << (TICKET_BITS - 1)) - 1  # a length must survive the sign extension

if triton is not None:
    TICKET: tl.constexpr = tl.constexpr(1 << TICKET_BITS)
    TICKETS_AT: tl.constexpr = tl.constexpr(TICKET_BITS)  # a length's ticket count: >> this
    SIGN_SHIFT: tl.constexpr = tl.constexpr(32 - TICKET_BITS)  # << then >>: the low half
    HALF: tl.constexpr = tl.constexpr(1 << (TICKET_BITS - 1))

    @triton.jit
    def _entries(rx, rdt, rB, k, filled, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim,
                 s_rdt_i, s_rB_i, s_rB_n):
        """Ring entries ``k`` (a block) of a row whose head (x, dt) and group
        (B) start at ``rx``, ``rdt``, ``rB``: x and B in their dtypes, dt in fp32, each
        entry from its own row of the blocks; zeros from ``filled`` on (entries past the
        ring's length are not the row's)."""
        ok = k < filled
        x = tl.load(rx + k[:, None] * s_rx_i + offs_d[None, :] * s_rx_dim,
                    mask=ok[:, None] & mask_d[None, :], other=0.0)
        dt = tl.load(rdt + k * s_rdt_i, mask=ok, other=0.0)
        b = tl.load(rB + k[:, None] * s_rB_i + offs_n[None, :] * s_rB_n,
                    mask=ok[:, None] & mask_n[None, :], other=0.0)
        return x, dt, b

    @triton.jit
    def _store_entries(rx, rdt, rB, k, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim,
                       s_rdt_i, s_rB_i, s_rB_n, x, dt, b, write, owns_dt, owns_b):
        """Write ring entries ``k`` (a block, ``write`` per entry) of a row, laid out as
        :func:`_entries` reads them: this program's tile of x, the step size if it owns
        the head's, B if it owns the group's."""
        tl.store(rx + k[:, None] * s_rx_i + offs_d[None, :] * s_rx_dim, x,
                 mask=write[:, None] & mask_d[None, :])
        tl.store(rdt + k * s_rdt_i, dt, mask=only_if(owns_dt, write))
        tl.store(rB + k[:, None] * s_rB_i + offs_n[None, :] * s_rB_n, b,
                 mask=only_if(owns_b, write)[:, None] & mask_n[None, :])

    @triton.jit
    def _advance(h, a, x, dt, b):
        """One step of the recurrence in native's order: ``h * exp(A dt) + (dt B) x``;
        ``a`` is one value per head (A tied) or A's tile."""
        return h * tl.exp(rate_step(a, dt)) + (dt * b)[None, :] * x[:, None]

    @triton.jit
    def _rebuild(h, a, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry, owns_dt, owns_b,
                 offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n):
        """The checkpoint tile ``h`` advanced by the ring's ``filled`` entries, in order, each
        loaded while the one before it is applied; each also copied to the destination
        row where ``carry``."""
        one = tl.arange(0, 1)  # an entry as a block of one, so loads and stores share code
        ex, edt, eb = _entries(rx, rdt, rB, one, filled, offs_d, offs_n, mask_d, mask_n,
                               s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
        for i in range(filled):
            nx, ndt, nb = _entries(rx, rdt, rB, one + i + 1, filled, offs_d, offs_n, mask_d,
                                   mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
            _store_entries(rx_dst, rdt_dst, rB_dst, one + i, offs_d, offs_n, mask_d, mask_n,
                           s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, ex, edt, eb,
                           only_if(carry, one == 0), owns_dt, owns_b)
            h = _advance(h, a, tl.reshape(ex, (ex.shape[1],)).to(tl.float32),
                         tl.sum(edt, axis=0), tl.reshape(eb, (eb.shape[1],)).to(tl.float32))
            ex, edt, eb = nx, ndt, nb
        return h

    @triton.jit
    def _product(p, q):
        return p * q

    @triton.jit
    def _after(a, edt, k, filled, rdt, s_rdt_i, CHUNK: tl.constexpr):
        """Decays of a chunk of entries ``k`` (step sizes ``edt``, 0 from ``filled`` on):
        each entry's from after it to the chunk's end, and the whole chunk's."""
        later = (k + 1 < filled) & (tl.arange(0, CHUNK) < CHUNK - 1)
        after = tl.where(later, tl.exp(rate_step(a, tl.load(
            rdt + (k + 1) * s_rdt_i, mask=later, other=0.0))), 1.0)
        decay = tl.where(k < filled, tl.exp(rate_step(a, edt)), 1.0)
        return tl.cumprod(after, axis=0, reverse=True), tl.reduce(decay, 0, _product)

    @triton.jit
    def _chunk(y, a, c, ex, edt, eb, k, filled, rdt, s_rdt_i, CHUNK: tl.constexpr):
        """``C . h`` advanced over the entries ``k`` (a chunk; none from ``filled`` on): per
        entry ``y = exp(A dt_k) y + dt_k (C . B_k) x_k``, the chunk in one step. Entries past
        ``filled`` may hold anything (a chunk loaded before the length was known): they are
        selected away, not multiplied by 0."""
        ok = k < filled
        edt = tl.where(ok, edt, 0.0)
        after, decay = _after(a, edt, k, filled, rdt, s_rdt_i, CHUNK)
        weight = after * edt
        cb = tl.sum(tl.where(ok[:, None], eb.to(tl.float32), 0.0) * c[None, :], axis=1)
        ex = tl.where(ok[:, None], ex.to(tl.float32), 0.0)
        return decay * y + tl.sum((weight * cb)[:, None] * ex, axis=0)

    @triton.jit
    def _forward(hc, a_new, a, c, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry,
                 owns_dt, owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i,
                 s_rB_i, s_rB_n, px, pdt, pb, CHUNK: tl.constexpr):
        """:func:`_direct`'s ``C . h`` with the entries in order, chunk by chunk, from the
        first chunk already loaded (``px``, ``pdt``, ``pb``: entries ``0 .. CHUNK - 1``
        whether filled or not), so that an append waits on one round trip fewer."""
        k = tl.arange(0, CHUNK)
        _store_entries(rx_dst, rdt_dst, rB_dst, k, offs_d, offs_n, mask_d, mask_n, s_rx_i,
                       s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, px, pdt, pb,
                       only_if(carry, k < filled), owns_dt, owns_b)
        y = _chunk(hc, a, c, px, pdt, pb, k, filled, rdt, s_rdt_i, CHUNK)
        for j in range(1, tl.cdiv(filled, CHUNK)):
            k = j * CHUNK + tl.arange(0, CHUNK)
            ex, edt, eb = _entries(rx, rdt, rB, k, filled, offs_d, offs_n, mask_d, mask_n,
                                   s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
            _store_entries(rx_dst, rdt_dst, rB_dst, k, offs_d, offs_n, mask_d, mask_n,
                           s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, ex, edt, eb,
                           only_if(carry, k < filled), owns_dt, owns_b)
            y = _chunk(y, a, c, ex, edt, eb, k, filled, rdt, s_rdt_i, CHUNK)
        return a_new * y

    @triton.jit
    def _direct(hc, a_new, a, c, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry, owns_dt,
                owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i,
                s_rB_n, px, pdt, pb, CHUNK: tl.constexpr, PREFETCH: tl.constexpr):
        """``C . h`` of the state that the checkpoint tile (``hc``: its ``C . h0``) and the
        ring's ``filled`` entries stand for, decayed by a token's ``a_new``, without
        building that state (A tied, ``a`` one value per head):

            C . h = decay(0) (C . h0) + sum_k decay(k + 1) dt_k (C . B_k) x_k

        where ``decay(k)`` is the product of ``exp(A dt_j)`` over entries ``j >= k`` and
        the new token. A tile's ``(C . B_k) x_k`` costs ``dstate + headdim`` operations
        against the ``2 headdim dstate`` of a replayed entry. Entries go in chunks, last
        chunk first, carrying the decay from after the chunk to the end; each chunk is
        copied to the destination row where ``carry``. With ``PREFETCH`` the entries go in
        order instead (``_forward``), the first chunk (``px``, ``pdt``, ``pb``) loaded before
        the ring's length was known."""
        if PREFETCH:
            y = _forward(hc, a_new, a, c, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry,
                         owns_dt, owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim,
                         s_rdt_i, s_rB_i, s_rB_n, px, pdt, pb, CHUNK)
        else:
            y = _backward(hc, a_new, a, c, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry,
                          owns_dt, owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim,
                          s_rdt_i, s_rB_i, s_rB_n, CHUNK)
        return y

    @triton.jit
    def _backward(hc, a_new, a, c, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry,
                  owns_dt, owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i,
                  s_rB_i, s_rB_n, CHUNK: tl.constexpr):
        """:func:`_direct`'s ``C . h`` with the chunks last first, each loaded once the
        ring's length is known."""
        running = a_new  # the decay from after the current chunk to the end
        acc = tl.zeros_like(hc)
        chunks = tl.cdiv(filled, CHUNK)
        for j in range(chunks):
            k = (chunks - 1 - j) * CHUNK + tl.arange(0, CHUNK)
            ex, edt, eb = _entries(rx, rdt, rB, k, filled, offs_d, offs_n, mask_d, mask_n,
                                   s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
            _store_entries(rx_dst, rdt_dst, rB_dst, k, offs_d, offs_n, mask_d, mask_n,
                           s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, ex, edt, eb,
                           only_if(carry, k < filled), owns_dt, owns_b)
            # the decay after entry k, within the chunk (after the chunk: in ``running``)
            after, decay = _after(a, edt, k, filled, rdt, s_rdt_i, CHUNK)
            weight = after * running * edt
            cb = tl.sum(eb.to(tl.float32) * c[None, :], axis=1)
            acc += tl.sum((weight * cb)[:, None] * ex.to(tl.float32), axis=0)
            running = running * decay
        return running * hc + acc

    @triton.jit
    def _token_steps(ptr, t, s_t, live, bias, dt_lo, dt_hi, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
        """The step sizes of a speculative call's tokens ``t`` (a block) of one head, 0 where
        not ``live`` (a step of 0 decays by 1 and adds nothing)."""
        dt = tl.load(ptr + t * s_t, mask=live, other=0.0).to(tl.float32)
        return tl.where(live, step_size(dt, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT),
                        0.0)

    @triton.jit
    def _ring_per_token(running, a, c_row, s_C_t, tt, rx, rdt, rB, rx_dst, rdt_dst, rB_dst,
                        filled, carry, owns_dt, owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i,
                        s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, CHUNK: tl.constexpr,
                        T: tl.constexpr, TP: tl.constexpr, BLOCK_D: tl.constexpr):
        """:func:`_direct`'s sum over the ring's ``filled`` entries for each of ``T`` tokens
        (rows of the result), with token ``t``'s C (at ``c_row + t * s_C_t``), decayed to
        the ring's end only (``running`` is 1 on entry): a token's own decay from there is
        the caller's. Returns the sums and the decay over the whole ring. Chunks are
        copied to the destination row where ``carry``, as in :func:`_direct`."""
        acc = tl.zeros((TP, BLOCK_D), tl.float32)
        chunks = tl.cdiv(filled, CHUNK)
        for j in range(chunks):
            k = (chunks - 1 - j) * CHUNK + tl.arange(0, CHUNK)
            ex, edt, eb = _entries(rx, rdt, rB, k, filled, offs_d, offs_n, mask_d, mask_n,
                                   s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
            _store_entries(rx_dst, rdt_dst, rB_dst, k, offs_d, offs_n, mask_d, mask_n,
                           s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, ex, edt, eb,
                           only_if(carry, k < filled), owns_dt, owns_b)
            after, decay = _after(a, edt, k, filled, rdt, s_rdt_i, CHUNK)
            weight = after * running * edt
            exf, ebf = ex.to(tl.float32), eb.to(tl.float32)
            for t in tl.static_range(T):
                c = tl.load(c_row + t * s_C_t, mask=mask_n, other=0.0).to(tl.float32)
                cb = tl.sum(ebf * c[None, :], axis=1)
                part = tl.sum((weight * cb)[:, None] * exf, axis=0)
                acc += tl.where(tt[:, None] == t, part[None, :], 0.0)
            running = running * decay
        return acc, running

    @triton.heuristics({
        "HAS_D": given("D_ptr"), "HAS_Z": given("z_ptr"), "HAS_BIAS": given("bias_ptr"),
        "HAS_LIMIT": given("dt_lo"), "HAS_SRC": given("src_ptr"), "HAS_DST": given("dst_ptr"),
    })
    @triton.jit
    def replay_kernel(
        state_ptr, rx_ptr, rdt_ptr, rB_ptr, len_ptr,
        x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, src_ptr, dst_ptr,
        nacc_ptr,
        pad_slot_id, nheads, dim, dstate, heads_per_group, nslots, ring, dt_lo, dt_hi,
        s_state, s_rx, s_rdt, s_rB, s_len, s_x, s_dt, s_bias, s_A, s_B, s_C, s_D, s_z, s_out,
        s_src, s_dst, s_nacc, s_tok,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        A_TIED: tl.constexpr, D_TIED: tl.constexpr, DIRECT: tl.constexpr,
        PREFETCH: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        T: tl.constexpr, TP: tl.constexpr,
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

        # the source row's length: in place a ticket (module docstring), else a plain read.
        # Relaxed: the tickets guard the length alone (no program reads a ring entry or a
        # tile another program of the sequence writes), and the last holder's store follows
        # every ticket in the length's own order; so the checkpoint load need not wait
        length_ptr = len_ptr + src * s_len
        px, pdt, pb = 0.0, 0.0, 0.0
        if PREFETCH:  # the ring's first chunk, issued beside the length (module docstring)
            early_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
            early_n = tl.arange(0, BLOCK_N)
            px, pdt, pb = _entries(
                rx_ptr + src * s_rx_row + head * s_rx_head,
                rdt_ptr + src * s_rdt_row + head * s_rdt_head,
                rB_ptr + src * s_rB_row + group * s_rB_group, tl.arange(0, CHUNK),
                tl.where(has_src, ring, 0), early_d, early_n, early_d < dim,
                early_n < dstate, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
        ticket = tl.atomic_add(length_ptr, TICKET, mask=in_place, sem="relaxed")
        plain = tl.load(length_ptr, mask=has_src & (dst != src), other=0)
        filled = tl.where(in_place, (ticket << SIGN_SHIFT) >> SIGN_SHIFT, plain)
        filled = tl.minimum(tl.maximum(filled, 0), ring)  # clamped: unchecked calls
        # the tickets above the length, which lies in [-2**15, 2**15): offset by 2**15 it
        # lies in [0, 2**16), so a negative length's sign bits are not taken for tickets
        last = in_place & (((ticket + HALF) >> TICKETS_AT) == nheads * nblk - 1)
        if T == 0:
            flush = filled == ring
            # an append into another row carries the checkpoint and the entries along
            carry = has_dst & (dst != src) & (filled < ring)
        else:
            # speculative: the source's last T entries are the previous call's tokens, of
            # which num_accepted_tokens stand; from here on ``filled`` counts the committed
            nacc = tl.load(nacc_ptr + seq * s_nacc).to(tl.int32)
            filled = tl.maximum(filled - T + tl.minimum(tl.maximum(nacc, 0), T), 0)
            flush = filled + T > ring  # the tokens do not fit after the committed entries
            carry = has_dst & (dst != src) & (filled + T <= ring)

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

        if T == 0:
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
            b = b_in.to(tl.float32)
            c = tl.load(C_ptr + seq * s_C_seq + group * s_C_group + offs_n * s_C_n, mask=mask_n,
                        other=0.0).to(tl.float32)

            # the head's (x, dt) and the group's B in the source and destination rows
            rx = rx_ptr + src * s_rx_row + head * s_rx_head
            rdt = rdt_ptr + src * s_rdt_row + head * s_rdt_head
            rB = rB_ptr + src * s_rB_row + group * s_rB_group
            rx_dst = rx_ptr + dst * s_rx_row + head * s_rx_head
            rdt_dst = rdt_ptr + dst * s_rdt_row + head * s_rdt_head
            rB_dst = rB_ptr + dst * s_rB_row + group * s_rB_group
            state_dst = state_ptr + dst * s_state_row + tile
            if DIRECT:
                # a flush replays the ring into the state, an append only reads its entries
                h = _rebuild(h, a, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, tl.where(flush, filled, 0),
                             carry, owns_dt, owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i,
                             s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
                hc = tl.sum(h * c[None, :], axis=1)
                if flush:  # the state, rounded once, is the new checkpoint
                    tl.store(state_dst, _advance(h, a, x, dt, b).to(state_ptr.dtype.element_ty),
                             mask=only_if(has_dst, tile_mask))
                # the tile is dead from here: its registers hold the ring's chunks
                y = _direct(hc, tl.exp(rate_step(a, dt)), a, c, rx, rdt, rB, rx_dst, rdt_dst,
                            rB_dst, tl.where(flush, 0, filled), carry, owns_dt, owns_b, offs_d,
                            offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n,
                            px, pdt, pb, CHUNK, PREFETCH)
                y += dt * tl.sum(b * c, axis=0) * x
            else:
                h = _rebuild(h, a, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry, owns_dt,
                             owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i,
                             s_rB_i, s_rB_n)
                h = _advance(h, a, x, dt, b)
                y = tl.sum(h * c[None, :], axis=1)
                tl.store(state_dst, h.to(state_ptr.dtype.element_ty),
                         mask=only_if(has_dst & flush, tile_mask))
            if HAS_D:
                y = y + per_head(D_ptr, head, s_D_head, offs_d, s_D_dim, mask_d, D_TIED) * x
            if HAS_Z:
                z = tl.load(z_ptr + seq * s_z_seq + head * s_z_head + offs_d * s_z_dim, mask=mask_d,
                            other=0.0).to(tl.float32)
                y = y * (z * tl.sigmoid(z))
            tl.store(out_ptr + seq * s_out_seq + head * s_out_head + offs_d * s_out_dim,
                     y.to(out_ptr.dtype.element_ty), mask=mask_d)

            # not full: the token's entry
            one = tl.arange(0, 1)
            _store_entries(rx_dst, rdt_dst, rB_dst, one + filled, offs_d, offs_n, mask_d,
                           mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, x_in[None, :],
                           dt + one * 0.0, b_in[None, :],
                           only_if(has_dst & (filled < ring), one == 0), owns_dt, owns_b)
            length = tl.where(flush, 0, filled + 1).to(len_ptr.dtype.element_ty)
            tl.store(len_ptr + dst * s_len, length, mask=tl.where(in_place, last, has_dst & first))
        else:
            # T tokens: rows of (TP, ...) blocks, those past T masked off (step 0)
            s_x_t, s_dt_t, s_B_t, s_C_t, s_z_t, s_out_t = s_tok
            tt = tl.arange(0, TP)
            live = tt < T
            x_rows = x_ptr + seq * s_x_seq + head * s_x_head
            xs = tl.load(x_rows + tt[:, None] * s_x_t + offs_d[None, :] * s_x_dim,
                         mask=live[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            bias = 0.0
            if HAS_BIAS:
                bias = tl.load(bias_ptr + head * s_bias).to(tl.float32)
            dt_row = dt_ptr + seq * s_dt_seq + head * s_dt_head
            dts = _token_steps(dt_row, tt, s_dt_t, live, bias, dt_lo, dt_hi, HAS_BIAS,
                               SOFTPLUS, HAS_LIMIT)
            b_row = B_ptr + seq * s_B_seq + group * s_B_group + offs_n * s_B_n
            c_row = C_ptr + seq * s_C_seq + group * s_C_group + offs_n * s_C_n
            y = tl.zeros((TP, BLOCK_D), tl.float32)
            # the head's (x, dt) and the group's B in the source and destination rows
            rx = rx_ptr + src * s_rx_row + head * s_rx_head
            rdt = rdt_ptr + src * s_rdt_row + head * s_rdt_head
            rB = rB_ptr + src * s_rB_row + group * s_rB_group
            rx_dst = rx_ptr + dst * s_rx_row + head * s_rx_head
            rdt_dst = rdt_ptr + dst * s_rdt_row + head * s_rdt_head
            rB_dst = rB_ptr + dst * s_rB_row + group * s_rB_group
            state_dst = state_ptr + dst * s_state_row + tile
            if DIRECT:
                # a flush replays the committed entries into the state; otherwise each
                # token's C . h comes from the checkpoint and the entries directly
                h = _rebuild(h, a, rx, rdt, rB, rx_dst, rdt_dst, rB_dst,
                             tl.where(flush, filled, 0), carry, owns_dt, owns_b, offs_d, offs_n,
                             mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n)
                if flush:  # the committed state, rounded once, is the new checkpoint
                    tl.store(state_dst, h.to(state_ptr.dtype.element_ty),
                             mask=only_if(has_dst, tile_mask))
                hc = tl.zeros((TP, BLOCK_D), tl.float32)
                for t in tl.static_range(T):
                    c = tl.load(c_row + t * s_C_t, mask=mask_n, other=0.0).to(tl.float32)
                    hc = tl.where(tt[:, None] == t, tl.sum(h * c[None, :], axis=1)[None, :], hc)
                # the tile is dead from here
                acc, running = _ring_per_token(
                    tl.exp(rate_step(a, 0.0)), a, c_row, s_C_t, tt, rx, rdt, rB, rx_dst,
                    rdt_dst, rB_dst, tl.where(flush, 0, filled), carry, owns_dt, owns_b,
                    offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n,
                    CHUNK, T, TP, BLOCK_D)
                # token t decays the ring's part by its own and the earlier tokens' steps,
                # and adds each token j <= t decayed by the steps after it
                y = tl.cumprod(tl.exp(rate_step(a, dts)), axis=0)[:, None] * (running * hc + acc)
                after = tl.exp(rate_step(a, _token_steps(
                    dt_row, tt + 1, s_dt_t, tt + 1 < T, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS,
                    HAS_LIMIT)))  # the step after token j
                bs = tl.load(b_row[None, :] + tt[:, None] * s_B_t,
                             mask=live[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
                for t in tl.static_range(T):
                    c = tl.load(c_row + t * s_C_t, mask=mask_n, other=0.0).to(tl.float32)
                    w = tl.cumprod(tl.where(tt + 1 <= t, after, 1.0), axis=0, reverse=True)
                    w = tl.where(tt <= t, w * dts * tl.sum(bs * c[None, :], axis=1), 0.0)
                    y += tl.where(tt[:, None] == t, tl.sum(w[:, None] * xs, axis=0)[None, :],
                                  0.0)
            else:
                h = _rebuild(h, a, rx, rdt, rB, rx_dst, rdt_dst, rB_dst, filled, carry, owns_dt,
                             owns_b, offs_d, offs_n, mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i,
                             s_rB_i, s_rB_n)
                tl.store(state_dst, h.to(state_ptr.dtype.element_ty),
                         mask=only_if(has_dst & flush, tile_mask))
                for t in tl.static_range(T):  # the tokens in order, as native runs them
                    one = tl.arange(0, 1)
                    x_t = tl.load(x_rows + t * s_x_t + offs_d * s_x_dim, mask=mask_d,
                                  other=0.0).to(tl.float32)
                    dt_t = tl.sum(_token_steps(dt_row, one + t, s_dt_t, one == 0, bias, dt_lo,
                                               dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT), axis=0)
                    b_t = tl.load(b_row + t * s_B_t, mask=mask_n, other=0.0).to(tl.float32)
                    c = tl.load(c_row + t * s_C_t, mask=mask_n, other=0.0).to(tl.float32)
                    h = _advance(h, a, x_t, dt_t, b_t)
                    y = tl.where(tt[:, None] == t, tl.sum(h * c[None, :], axis=1)[None, :], y)
            if HAS_D:
                y = y + per_head(D_ptr, head, s_D_head, offs_d, s_D_dim, mask_d, D_TIED) * xs
            out_tile = tt[:, None] * s_out_t + offs_d[None, :] * s_out_dim
            if HAS_Z:
                z = tl.load(z_ptr + seq * s_z_seq + head * s_z_head + tt[:, None] * s_z_t
                            + offs_d[None, :] * s_z_dim, mask=live[:, None] & mask_d[None, :],
                            other=0.0).to(tl.float32)
                y = y * (z * tl.sigmoid(z))
            tl.store(out_ptr + seq * s_out_seq + head * s_out_head + out_tile,
                     y.to(out_ptr.dtype.element_ty), mask=live[:, None] & mask_d[None, :])
            # the tokens' entries are the second launch's (replay_tokens_kernel): in place,
            # other programs of the sequence may still be reading the entries they go to
            length = tl.where(flush, 0, filled) + T
            tl.store(len_ptr + dst * s_len, length.to(len_ptr.dtype.element_ty),
                     mask=tl.where(in_place, last, has_dst & first))

    @triton.heuristics({
        "HAS_BIAS": given("bias_ptr"), "HAS_LIMIT": given("dt_lo"), "HAS_SRC": given("src_ptr"),
        "HAS_DST": given("dst_ptr"),
    })
    @triton.jit
    def replay_tokens_kernel(
        rx_ptr, rdt_ptr, rB_ptr, len_ptr, x_ptr, dt_ptr, bias_ptr, B_ptr, src_ptr, dst_ptr,
        pad_slot_id, nheads, dim, dstate, heads_per_group, nslots, dt_lo, dt_hi,
        s_rx, s_rdt, s_rB, s_len, s_x, s_dt, s_bias, s_B, s_src, s_dst, s_tok,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
        HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
    ):
        """A speculative call's second launch: each destination row's ``T`` tokens, at the
        entries after its committed ones (``ring_len - T``, which the first launch wrote),
        with ``replay_kernel``'s programs and tiles (x by every program, the step size by one
        per head, B by one per group). Apart, so that no program of the first launch can
        still be reading an entry a token overwrites (a flush in place puts them at 0)."""
        s_rx_row, s_rx_i, s_rx_head, s_rx_dim = s_rx
        s_rdt_row, s_rdt_i, s_rdt_head = s_rdt
        s_rB_row, s_rB_i, s_rB_group, s_rB_n = s_rB
        s_x_seq, s_x_head, s_x_dim = s_x
        s_dt_seq, s_dt_head = s_dt
        s_B_seq, s_B_group, s_B_n = s_B
        s_x_t, s_dt_t, s_B_t = s_tok

        pid = tl.program_id(0)
        nblk = tl.cdiv(dim, BLOCK_D)
        blk = pid % nblk
        head = (pid // nblk) % nheads
        seq = (pid // nblk // nheads).to(tl.int64)
        owns_dt = blk == 0
        owns_b = owns_dt & (head % heads_per_group == 0)
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
        has_dst = real_row(dst, pad_slot_id, nslots)
        start = tl.load(len_ptr + dst * s_len, mask=has_dst, other=0) - T
        start = tl.maximum(start, 0)

        offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < dstate
        tt = tl.arange(0, TP)
        live = tt < T
        xs = tl.load(x_ptr + seq * s_x_seq + head * s_x_head + tt[:, None] * s_x_t
                     + offs_d[None, :] * s_x_dim, mask=live[:, None] & mask_d[None, :], other=0.0)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + head * s_bias).to(tl.float32)
        dts = _token_steps(dt_ptr + seq * s_dt_seq + head * s_dt_head, tt, s_dt_t, live, bias,
                           dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
        bs = tl.load(B_ptr + seq * s_B_seq + group * s_B_group + tt[:, None] * s_B_t
                     + offs_n[None, :] * s_B_n, mask=live[:, None] & mask_n[None, :], other=0.0)
        _store_entries(rx_ptr + dst * s_rx_row + head * s_rx_head,
                       rdt_ptr + dst * s_rdt_row + head * s_rdt_head,
                       rB_ptr + dst * s_rB_row + group * s_rB_group, start + tt, offs_d, offs_n,
                       mask_d, mask_n, s_rx_i, s_rx_dim, s_rdt_i, s_rB_i, s_rB_n, xs, dts, bs,
                       only_if(has_dst, live), owns_dt, owns_b)
