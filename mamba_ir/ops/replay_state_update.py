"""``replay_state_update``: decode from a checkpoint state and a ring of recent inputs.

Each state row is a checkpoint ``state`` and a ring of the inputs of the tokens since it
(``ring_x``, ``ring_dt``, ``ring_B``, ``ring_len`` of them). A step rebuilds the state
from the checkpoint and the ring in float32, runs the new token and appends its inputs to
the ring; when the ring is full the step writes the state as the new checkpoint instead
and empties the ring. The state is rounded to its dtype once per flush, not once per step,
and most steps write one ring entry instead of the whole state (docs/ops.md).

Speculative decoding (``num_accepted_tokens``, ``x`` of ``(batch, T, nheads, dim)``) takes
``T`` tokens per sequence. Each call appends its ``T`` tokens to the ring tentatively
(``ring_len`` counts them); the next call keeps ``num_accepted_tokens`` of them and drops
the rest by moving ``ring_len`` back, so a rollback rewrites no state.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import checks
from ..op import Rows, RowSpec, register_op
from . import _example
from ._quant import QUANTIZED
from ._step import decay, step_size

ROW = ("state", "ring_x", "ring_dt", "ring_B", "ring_len")
RING = ("ring_x", "ring_dt", "ring_B")
INDICES = ("state_batch_indices", "dst_state_batch_indices")
NACC = "num_accepted_tokens"
EXAMPLE_RING = 4  # ring entries per row in the example call


def _sequence_rows(
    x: torch.Tensor, indices: torch.Tensor | None, dst_indices: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's source and destination row (row ``b`` without indices; entries past
    the batch are ignored)."""
    batch = x.shape[0]
    src = torch.arange(batch, device=x.device) if indices is None else indices[:batch].long()
    dst = src if dst_indices is None else dst_indices[:batch].long()
    return src, dst


def _rows(call: dict) -> Rows:
    src, dst = _sequence_rows(call["x"], call["state_batch_indices"],
                              call["dst_state_batch_indices"])
    every = torch.ones_like(src, dtype=torch.bool)
    return Rows(src, every, dst[:, None], every[:, None])


def _spacing(t: torch.Tensor) -> torch.Tensor:
    """The gap between neighbouring values of ``t``'s (16-bit float) dtype at each value,
    as float32."""
    info = torch.finfo(t.dtype)
    magnitude = t.float().abs().clamp(min=info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def row_value(members: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``RowSpec.value``: a row as float32 values, flat per row: the checkpoint, the ring's
    filled entries (zeros past ``ring_len``, which are not part of the row's value) and
    ``ring_len``; and the step a correct provider may differ by: a 16-bit checkpoint's
    spacing, since a flush rounds the float32 state once, and float32 arithmetic in
    another order (a fused multiply-add) may fall on the other side of a rounding
    boundary; nothing elsewhere (the ring keeps its inputs as they came)."""
    lengths = members["ring_len"].long()
    state = members["state"]
    parts = [state.float().flatten(1)]
    for name in RING:
        ring = members[name]
        filled = torch.arange(ring.shape[1], device=ring.device) < lengths[:, None]
        filled = filled.view(*filled.shape, *[1] * (ring.dim() - 2))
        parts.append(torch.where(filled, ring.float(), 0.0).flatten(1))
    parts.append(lengths.float()[:, None])
    value = torch.cat(parts, dim=1)
    if state.dtype == torch.float32:
        return value, 0.0
    step = torch.zeros_like(value)
    step[:, :parts[0].shape[1]] = _spacing(state).flatten(1)
    return value, step


def _read(rows: torch.Tensor, index: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """``rows[index[i]]`` where ``has[i]``, zeros elsewhere, in the rows' dtype."""
    got = torch.zeros((index.shape[0], *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    got[has] = rows[index[has]]
    return got


@register_op(
    mutates_args=(*ROW, "out"),
    allocate={"out": lambda call: torch.empty_like(call["x"])},
    rows=RowSpec(ROW, "state_batch_indices", "dst_state_batch_indices", _rows, value=row_value),
)
def replay_state_update(
    state: torch.Tensor,
    ring_x: torch.Tensor,
    ring_dt: torch.Tensor,
    ring_B: torch.Tensor,
    ring_len: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] | None = None,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    num_accepted_tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """One decode token per sequence from its source row's checkpoint and ring: append the
    token to the ring, or, when the ring is full, write the state as a new checkpoint and
    empty the ring. With ``num_accepted_tokens``, ``T`` tokens per sequence verified at
    once after rolling back the previous call's rejected ones (:func:`_speculative`;
    docs/ops.md)."""
    if num_accepted_tokens is not None:
        _speculative(state, ring_x, ring_dt, ring_B, ring_len, x, dt, A, B, C, D, z, dt_bias,
                     dt_softplus, dt_limit, state_batch_indices, dst_state_batch_indices,
                     pad_slot_id, num_accepted_tokens, out)
        return
    nslots, ring = state.shape[0], ring_x.shape[1]
    heads_per_group = state.shape[1] // B.shape[-2]
    src, dst = _sequence_rows(x, state_batch_indices, dst_state_batch_indices)
    # everything the call reads, before it writes; a pad (or, unchecked, out-of-range)
    # source is a zero checkpoint and an empty ring
    has_src = checks.real_rows(src, nslots, pad_slot_id)
    checkpoint = _read(state, src, has_src)
    rx, rdt, rB = (_read(t, src, has_src) for t in (ring_x, ring_dt, ring_B))
    filled = _read(ring_len, src, has_src).long().clamp(0, ring)  # clamped: unchecked calls
    has_dst = checks.real_rows(dst, nslots, pad_slot_id)
    own = [_read(t, dst, has_dst) for t in (ring_x, ring_dt, ring_B)]  # entries kept as they are

    A = A.float()

    def advance(h, x_t, dt_t, B_t):  # dt_t: one step size per head
        d = dt_t.float()[:, :, None, None]
        Bh = B_t.float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        return h * decay(A, d) + d * Bh * x_t.float()[..., None]

    h = checkpoint.float()
    for i in range(ring):  # the ring's tokens in order; entries past its length never count
        h = torch.where((i < filled)[:, None, None, None], advance(h, rx[:, i], rdt[:, i],
                                                                  rB[:, i]), h)
    bias = None if dt_bias is None else dt_bias[..., 0]
    step = step_size(dt[..., 0], bias, dt_softplus, dt_limit)  # (batch, nheads): tied over dim
    h = advance(h, x, step, B)
    Ch = C.float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
    y = (h * Ch).sum(-1)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    out.copy_(y)

    flush = has_dst & (filled == ring)
    append = has_dst & (filled < ring)
    # a full ring: the state is the new checkpoint, rounded once; the ring restarts empty
    # (its stale entries are not part of the row and stay as they are)
    state[dst[flush]] = h[flush].to(state.dtype)
    ring_len[dst[flush]] = 0
    # otherwise: the source's checkpoint and ring entries, the new token after them, and
    # the destination's own entries past that (rewritten as they were)
    state[dst[append]] = checkpoint[append]
    position = torch.arange(ring, device=x.device)
    for rows, old, mine, new in zip((ring_x, ring_dt, ring_B), (rx, rdt, rB), own, (x, step, B),
                                    strict=True):
        shape = (-1, ring, *[1] * (rows.dim() - 2))
        kept = (position < filled[:, None]).view(shape)
        added = (position == filled[:, None]).view(shape)
        entries = torch.where(kept, old, torch.where(added, new[:, None].to(rows.dtype), mine))
        rows[dst[append]] = entries[append]
    ring_len[dst[append]] = (filled[append] + 1).to(ring_len.dtype)


def _speculative(state, ring_x, ring_dt, ring_B, ring_len, x, dt, A, B, C, D, z, dt_bias,
                 dt_softplus, dt_limit, state_batch_indices, dst_state_batch_indices,
                 pad_slot_id, num_accepted_tokens, out) -> None:
    """``T`` draft tokens per sequence (``x``: ``(batch, T, nheads, dim)``).

    A source row's last ``T`` ring entries are the previous call's tokens, appended
    tentatively; ``num_accepted_tokens[b]`` of them stand and the others are dropped, so
    the row's *committed* entries are its first ``ring_len - T + num_accepted_tokens``
    (a row no speculative call wrote passes ``T``: nothing to drop). Each token's output
    comes from the checkpoint, the committed entries and the tokens before it and itself.
    The destination row gets the committed entries and the ``T`` tokens after them
    (``ring_len = committed + T``); where they would not fit, the committed entries are
    first folded into the checkpoint (a flush, rounded once) and the ``T`` tokens start
    an empty ring. Tokens are never folded into a checkpoint: any of them may be dropped
    by the next call."""
    nslots, ring = state.shape[0], ring_x.shape[1]
    heads_per_group = state.shape[1] // B.shape[-2]
    batch, T = x.shape[:2]
    src, dst = _sequence_rows(x, state_batch_indices, dst_state_batch_indices)
    # everything the call reads, before it writes; a pad source is a zero checkpoint and an
    # empty ring (nothing committed, whatever its count)
    has_src = checks.real_rows(src, nslots, pad_slot_id)
    checkpoint = _read(state, src, has_src)
    rx, rdt, rB = (_read(t, src, has_src) for t in (ring_x, ring_dt, ring_B))
    filled = _read(ring_len, src, has_src).long().clamp(0, ring)  # clamped: unchecked calls
    accepted = num_accepted_tokens[:batch].long().clamp(0, T)
    committed = (filled - T + accepted).clamp(min=0)  # the rollback: a count, nothing moved
    has_dst = checks.real_rows(dst, nslots, pad_slot_id)
    own = [_read(t, dst, has_dst) for t in (ring_x, ring_dt, ring_B)]

    A = A.float()

    def advance(h, x_t, dt_t, B_t):  # dt_t: one step size per head
        d = dt_t.float()[:, :, None, None]
        Bh = B_t.float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        return h * decay(A, d) + d * Bh * x_t.float()[..., None]

    h = checkpoint.float()
    for i in range(ring):  # the committed entries in order
        h = torch.where((i < committed)[:, None, None, None], advance(h, rx[:, i], rdt[:, i],
                                                                     rB[:, i]), h)
    bias = None if dt_bias is None else dt_bias[..., 0]
    steps = step_size(dt[..., 0], bias, dt_softplus, dt_limit)  # (batch, T, nheads)
    g = h
    for t in range(T):  # each token from the ones before it
        g = advance(g, x[:, t], steps[:, t], B[:, t])
        y = (g * C[:, t].float().repeat_interleave(heads_per_group, dim=1)[:, :, None]).sum(-1)
        if D is not None:
            y = y + D.float() * x[:, t].float()
        if z is not None:
            y = y * F.silu(z[:, t].float())
        out[:, t] = y.to(out.dtype)

    # the tokens do not fit after the committed entries: those become the checkpoint
    flush = committed + T > ring
    state[dst[has_dst & flush]] = h[has_dst & flush].to(state.dtype)
    state[dst[has_dst & ~flush]] = checkpoint[has_dst & ~flush]
    start = torch.where(flush, 0, committed)  # where the tokens go
    position = torch.arange(ring, device=x.device)
    token = (position[None, :] - start[:, None]).clamp(0, T - 1)  # (batch, ring)
    seqs = torch.arange(batch, device=x.device)[:, None]
    for rows, old, mine, new in zip((ring_x, ring_dt, ring_B), (rx, rdt, rB), own, (x, steps, B),
                                    strict=True):
        shape = (batch, ring, *[1] * (rows.dim() - 2))
        kept = (position[None, :] < start[:, None]).view(shape)
        added = ((position[None, :] >= start[:, None])
                 & (position[None, :] < start[:, None] + T)).view(shape)
        entries = torch.where(kept, old, torch.where(added, new[seqs, token].to(rows.dtype),
                                                     mine))
        rows[dst[has_dst]] = entries[has_dst]
    ring_len[dst[has_dst]] = (start[has_dst] + T).to(ring_len.dtype)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _per_channel(call: dict, name: str) -> torch.Tensor | None:
    """Where a per-head parameter laid out over headdim differs along it: ``None`` when it
    is tied by its strides (stride 0, or headdim 1), which holds one value per head."""
    t = call[name]
    if t is None or t.shape[-1] == 1 or t.stride(-1) == 0:
        return None
    first = t[..., :1]
    return (t != first) & ~(t.isnan() & first.isnan())


PER_HEAD = "one value per head (equal over headdim): the ring keeps one step size per head"


@replay_state_update.register_check
def _check(call: dict) -> None:
    state = call["state"]
    if isinstance(state, torch.Tensor) and state.dtype in QUANTIZED:
        checks.fail("state", "a float32, float16 or bfloat16 checkpoint: quantized "
                    "checkpoints (state_scale) are not supported by replay_state_update yet",
                    _dtype(state))
    state = checks.tensor(call, "state")
    if state.dim() != 4:
        checks.fail("state", "4 dimensions (slots, nheads, headdim, dstate): the Mamba2 "
                    "layout", tuple(state.shape))
    slots, nheads, dim, dstate = state.shape
    if dim < 1:
        checks.fail("state", "headdim >= 1", tuple(state.shape))
    checks.same_device(call, "state")
    spec = call[NACC] is not None
    x = checks.tensor(call, "x", ndim=(3, 4))
    if x.dim() != (4 if spec else 3):
        checks.fail("x", "(batch, T, nheads, dim) with num_accepted_tokens" if spec else
                    "(batch, nheads, dim) without num_accepted_tokens (T tokens a sequence "
                    "are speculative decoding)", tuple(x.shape))
    lead = tuple(x.shape[:-2])  # (batch,), or (batch, T) with num_accepted_tokens
    if tuple(x.shape[-2:]) != (nheads, dim):
        form = "(batch, T, " if spec else "(batch, "
        checks.fail("x", f"shape {form}{nheads}, {dim})"
                    + (": T tokens per sequence with num_accepted_tokens" if spec
                       else ": one token per sequence (T tokens need num_accepted_tokens)"),
                    tuple(x.shape))
    batch = x.shape[0]
    b = checks.tensor(call, "B", ndim=len(lead) + 2)
    ngroups = b.shape[-2]
    if tuple(b.shape[:-2]) != lead or b.shape[-1] != dstate or ngroups == 0 or nheads % ngroups:
        checks.fail("B", f"shape ({', '.join(map(str, lead))}, ngroups dividing {nheads}, "
                    f"{dstate})", tuple(b.shape))
    checks.tensor(call, "C", shape=b.shape)

    rx = checks.tensor(call, "ring_x", ndim=4)
    ring = rx.shape[1]
    if tuple(rx.shape) != (slots, ring, nheads, dim) or ring < 1:
        checks.fail("ring_x", f"shape ({slots}, L, {nheads}, {dim}) with L >= 1 ring entries "
                    "per row of state", tuple(rx.shape))
    for name, shape, dtypes in (
        ("ring_dt", (slots, ring, nheads), (torch.float32,)),  # step sizes as computed
        ("ring_B", (slots, ring, ngroups, dstate), checks.FLOAT_DTYPES),
    ):
        t = checks.tensor(call, name, ndim=len(shape), dtypes=dtypes)
        if tuple(t.shape) != shape:
            checks.fail(name, f"shape {shape}: {ring} entries per row of state, as ring_x",
                        tuple(t.shape))
    if spec and not 1 <= lead[1] <= ring:
        checks.fail("x", f"1 to {ring} tokens per sequence (the ring holds a call's tokens "
                    "after its committed entries)", tuple(x.shape))
    checks.index(call, NACC, rows=batch, padded=True)
    lengths = checks.tensor(call, "ring_len", ndim=1, dtypes=(torch.int32,))
    if lengths.shape[0] != slots:
        checks.fail("ring_len", f"shape ({slots},): one length per row of state",
                    tuple(lengths.shape))
    # the ring keeps the inputs as they came: appending rounds nothing
    for name, source in (("ring_x", "x"), ("ring_B", "B")):
        if call[name].dtype != call[source].dtype:
            checks.fail(name, f"the dtype of {source} ({_dtype(call[source])}): the ring keeps "
                        "the inputs as they came", _dtype(call[name]))
    for name in ROW:
        checks.writable(call, name)

    checks.tensor(call, "dt", shape=x.shape)
    checks.tensor(call, "A", shape=(nheads, dim, dstate))
    for name in ("D", "dt_bias"):
        checks.tensor(call, name, shape=(nheads, dim), optional=True)
    for name in ("z", "out"):
        checks.tensor(call, name, shape=x.shape, optional=True)
    if call["out"] is not None:
        checks.writable(call, "out")
        checks.same_dtype(call, "out", "x")
    checks.dt_limit(call)
    for name in INDICES:
        checks.index(call, name, rows=batch, padded=True)
    checks.enough_rows(call, "state", "state_batch_indices", batch)


def source_lengths(call: dict, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ring_len`` of the source rows ``src`` (0 where one is a pad), and which are rows
    (the replay ops' value checks)."""
    nslots = call["state"].shape[0]
    real = checks.real_rows(src, nslots, call["pad_slot_id"])
    if nslots == 0:
        return torch.zeros_like(src), real
    return torch.where(real, call["ring_len"][torch.where(real, src, 0)], 0), real


def check_lengths(call: dict, src: torch.Tensor, lengths: torch.Tensor,
                  real: torch.Tensor, *, on_device: bool = False) -> None:
    """The source rows' lengths (:func:`source_lengths`) lie in ``[0, L]``: a ValueError
    naming the first row that does not, or, ``on_device``, an assertion on the device."""
    expected = (f"values in [0, {call['ring_x'].shape[1]}] (the ring's entries) in the "
                "source rows")
    if on_device:
        checks.assert_within("ring_len", lengths, 0, call["ring_x"].shape[1], expected)
        return
    bad = real & ((lengths < 0) | (lengths > call["ring_x"].shape[1]))
    if bool(bad.any()):
        checks.fail("ring_len", expected, f"{int(lengths[bad][0])} in row {int(src[bad][0])}")


def _sources(call: dict) -> torch.Tensor:
    return _sequence_rows(call["x"], call["state_batch_indices"], None)[0]


def _rollback(call: dict, lengths: torch.Tensor, real: torch.Tensor) -> tuple[str, torch.Tensor]:
    """What a speculative call's ``num_accepted_tokens`` must be, and where it is not: in
    ``[0, T]``, and where the source is a row, no more tokens dropped than its ring holds."""
    tokens = call["x"].shape[1]
    nacc = call[NACC][:call["x"].shape[0]].long()
    bad = (nacc < 0) | (nacc > tokens) | (real & (lengths - tokens + nacc < 0))
    return (f"values in [0, {tokens}] (the previous call's tokens that stand) with "
            f"ring_len - {tokens} + num_accepted_tokens >= 0 in every source row (its "
            "committed entries; a row no speculative call wrote takes T)"), bad


@replay_state_update.register_value_check
def _check_values(call: dict) -> None:
    checks.indices_in_range(call, INDICES, call["x"].shape[0], call["state"].shape[0])
    src = _sources(call)
    lengths, real = source_lengths(call, src)
    check_lengths(call, src, lengths, real)
    if call[NACC] is not None:
        expected, bad = _rollback(call, lengths, real)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            checks.fail(NACC, expected, f"{int(call[NACC][b])} for sequence {b} (ring_len "
                        f"{int(lengths[b])})")
    for name in ("dt", "dt_bias"):
        differs = _per_channel(call, name)
        if differs is not None and bool(differs.any()):
            index = tuple(int(i) for i in differs.nonzero()[0])
            checks.fail(name, PER_HEAD, f"values that differ over headdim at {index}")


@replay_state_update.register_device_check
def _device_check(call: dict) -> None:
    checks.indices_in_range(call, INDICES, call["x"].shape[0], call["state"].shape[0],
                            on_device=True)
    src = _sources(call)
    lengths, real = source_lengths(call, src)
    check_lengths(call, src, lengths, real, on_device=True)
    if call[NACC] is not None:
        expected, bad = _rollback(call, lengths, real)
        torch._assert_async(~bad.any(), f"{NACC}: expected {expected}")
    for name in ("dt", "dt_bias"):
        differs = _per_channel(call, name)
        if differs is not None:
            torch._assert_async(~differs.any(), f"{name}: expected {PER_HEAD}")


@replay_state_update.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    heads, dim, n, ring = s.heads, s.head_dim, s.batch, EXAMPLE_RING
    A = -randn(heads, dt=torch.float32).exp()
    ring_len = torch.zeros(s.slots, dtype=torch.int32, device=device)
    ring_len[_example.rows(device)] = torch.tensor(  # empty, partly filled and full (a flush)
        [0, 1, ring - 1, ring], dtype=torch.int32, device=device)
    return {
        "state": randn(s.slots, heads, dim, s.d_state),
        "ring_x": randn(s.slots, ring, heads, dim),
        "ring_dt": F.softplus(randn(s.slots, ring, heads, dt=torch.float32)),
        "ring_B": randn(s.slots, ring, s.groups, s.d_state), "ring_len": ring_len,
        "x": randn(n, heads, dim),
        "dt": randn(n, heads)[..., None].expand(n, heads, dim),  # tied over headdim
        "A": A[:, None, None].expand(heads, dim, s.d_state),
        "B": randn(n, s.groups, s.d_state), "C": randn(n, s.groups, s.d_state),
        "D": randn(heads)[:, None].expand(heads, dim),
        "dt_bias": randn(heads)[:, None].expand(heads, dim), "dt_softplus": True,
        "state_batch_indices": _example.rows(device), "out": randn(n, heads, dim),
    }


@replay_state_update.register_strategy
def _calls(device: str, sizes: Any) -> Any:
    from ..testing.replay_strategies import replay_state_update_calls

    return replay_state_update_calls(device=device, sizes=sizes)
