"""Hypothesis strategies that build valid argument sets for each op.

Each strategy draws the *structure* of a call (layout, dtypes, sizes, which sequences are
padded, which read from another row) and a seed for the tensor values, so failures shrink
to small structures. Every argument set obeys the ops' row rules: destination rows are
distinct, and no sequence reads a row another sequence writes; sources may be shared
(a common prefix) or equal to the sequence's own destination (in-place).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from ..op import IrOp, get_op
from ..ops._quant import QUANTIZED, ROUNDED, quantize

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
STATE_DTYPES = (*FLOATS, *QUANTIZED)  # a quantized state comes with its scales
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Sizes:
    """Upper bounds for drawn shapes: small for the CPU and the Triton interpreter."""

    max_seqs: int = 4
    max_tokens: int = 4
    max_heads: int = 4
    max_dim: int = 16
    dstates: tuple[int, ...] = (1, 4, 8, 16)
    max_channels: int = 40
    max_prefill: int = 12
    max_scan_tokens: int = 24
    scan_chunks: tuple[int, ...] = (4, 8, 16)


SMALL = Sizes()


@dataclass
class Rows:
    """Per-sequence row assignment: where each sequence reads and the rows it writes."""

    nslots: int
    src: list[int]
    dst: list[list[int]]


def assign_rows(
    rng: random.Random, writes: list[int], *, redirect: bool, pad: int, pad_prob: float = 0.2
) -> Rows:
    """Rows for sequences that write ``writes[b]`` rows each.

    In place (``redirect`` False) a sequence reads its first destination row. With
    redirect it reads its own row, a fresh row (possibly shared with other sequences),
    or the pad id.
    """
    total = sum(writes)
    nslots = total + rng.randint(1, 4) + (pad == 0)
    pool = [r for r in range(nslots) if r != pad]
    rng.shuffle(pool)
    dst = []
    for k in writes:
        rows = [pool.pop() for _ in range(k)]
        dst.append([pad if rng.random() < pad_prob else r for r in rows])
    shared = pool[: max(1, len(pool) // 2)]
    src = []
    for rows in dst:
        choice = rng.random()
        if not redirect or choice < 0.3:
            src.append(rows[0] if rows else pad)
        elif choice < 0.85:
            src.append(rng.choice(shared))
        else:
            src.append(pad)
    return Rows(nslots, src, dst)


def sequence_rows(
    rng: random.Random, writes: list[int], *, indexed: bool, redirect: bool, pad: int
) -> Rows:
    """Rows for a call: sequence b owns row b when the call passes no indices."""
    if indexed or redirect:
        return assign_rows(rng, writes, redirect=redirect, pad=pad)
    n = len(writes)
    return Rows(n + rng.randint(0, 2), list(range(n)), [[b] for b in range(n)])


def _offsets(lengths: list[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    return _index([0, *itertools.accumulate(lengths)], dtype, device)


def _conv_states(randn, nslots: int, dim: int, state_len: int, dtype, channel_last: bool):
    """(slots, dim, state_len), contiguous along dim (vLLM's layout) or along state_len."""
    if channel_last:
        return randn(nslots, state_len, dim, dtype=dtype).transpose(1, 2)
    return randn(nslots, dim, state_len, dtype=dtype)


def _gen(seed: int, device: str) -> Callable[..., torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    return randn


def _maybe_strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """The same values in a non-contiguous layout: every other element of a wider buffer."""
    if not strided:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _index(values: list[Any], dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


# How an index tensor is laid out: as built; every other entry of a wider buffer; a column
# (or the leading columns) of a wider 2-D tensor; followed by entries past the sequences
# (vLLM pads index tensors to a CUDA-graph batch; the ops ignore the tail).
INDEX_LAYOUTS = ("plain", "strided", "column", "padded")
JUNK = 1 << 20  # what padding and unused columns hold: a row no call has, if ever read


def _laid_out(t: torch.Tensor | None, how: str, tail: int = 2) -> torch.Tensor | None:
    """``t`` (a per-sequence tensor, 1-D or 2-D) in the layout ``how`` (INDEX_LAYOUTS)."""
    if t is None or how == "plain":
        return t
    junk = JUNK if t.dtype != torch.bool else True
    if how == "strided":
        return _maybe_strided(t, True)
    if how == "column":
        wide = torch.full((*t.shape[:1], (t.shape[1] if t.dim() == 2 else 1) + 1), junk,
                          dtype=t.dtype, device=t.device)
        if t.dim() == 1:
            wide[:, 0] = t
            return wide[:, 0]
        wide[:, : t.shape[1]] = t
        return wide[:, : t.shape[1]]
    return torch.cat([t, torch.full((tail, *t.shape[1:]), junk, dtype=t.dtype, device=t.device)])


def _bias(randn, dim: int, dtype: torch.dtype, how: str) -> torch.Tensor | None:
    """A conv bias: none, contiguous, every other element of a wider buffer, or one value
    broadcast with stride 0."""
    if how == "none":
        return None
    if how == "tied":
        return randn(1, dtype=dtype).expand(dim)
    return _maybe_strided(randn(dim, dtype=dtype), how == "strided")


def _in_cache(t: torch.Tensor, how: str) -> torch.Tensor:
    """A state as a view of a larger cache: one layer of two (same row layout, offset
    storage) or rows interleaved with another layer's (twice the row stride)."""
    if how == "own":
        return t
    if how == "layer":
        cache = torch.empty((2, *t.shape), dtype=t.dtype, device=t.device).copy_(t[None])
        return cache[1]
    cache = torch.empty((t.shape[0], 2, *t.shape[1:]), dtype=t.dtype, device=t.device)
    cache[:, 0] = t
    return cache[:, 0]


def _state_rows(
    h: torch.Tensor, dtype: torch.dtype, cache: str, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 state values ``h`` as a state of ``dtype`` (and its scales, quantized: some
    blocks all zero, some tiny or large, outputs still finite in float16), each a view of a
    cache laid out as ``cache`` says."""
    if dtype not in QUANTIZED:
        return _in_cache(h.to(dtype), cache), None
    blocks = h.shape[:-1]
    magnitude = torch.ones(blocks).flatten()
    for i in range(magnitude.numel()):
        magnitude[i] = rng.choice([1.0, 1.0, 1.0, 0.0, 1e-6, 30.0])
    q, scale = quantize(h * magnitude.view(*blocks, 1).to(h.device), dtype)
    return _in_cache(q, cache), _in_cache(scale, cache)


@st.composite
def selective_state_update_calls(draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL):
    mamba2 = draw(st.booleans())
    ngroups = draw(st.sampled_from([g for g in (1, 2, 4) if g <= sizes.max_heads])) if mamba2 else 1
    nheads = ngroups * draw(st.integers(1, max(1, sizes.max_heads // ngroups))) if mamba2 else 1
    dim = draw(st.integers(1, sizes.max_dim))
    dstate = draw(st.sampled_from(sizes.dstates))
    form = draw(st.sampled_from(["single", "multi", "varlen"]))
    nseq = draw(st.integers(0 if form == "varlen" else 1, sizes.max_seqs))
    per_seq = draw(st.integers(1, sizes.max_tokens)) if form == "multi" else 1
    lengths = [per_seq] * nseq
    if form == "varlen":
        lengths = draw(st.lists(st.integers(0, sizes.max_tokens), min_size=nseq, max_size=nseq))
    spec = form != "single" and draw(st.booleans())
    redirect = draw(st.booleans())
    use_indices = spec or redirect or draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    state_dtype, in_dtype = draw(st.sampled_from(STATE_DTYPES)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    # Mamba2 ties dt, A, D and dt_bias over headdim (stride 0); each may be tied or not
    dt_tied, A_tied, D_tied, bias_tied = (mamba2 and draw(st.booleans()) for _ in range(4))
    strided = draw(st.booleans())
    packed = mamba2 and draw(st.booleans())  # x, z, B, C sliced from one projection output
    cache = draw(st.sampled_from(["own", "layer", "interleaved"]))
    layout = draw(st.sampled_from(INDEX_LAYOUTS))
    has_D, has_z, has_bias, softplus = (draw(st.booleans()) for _ in range(4))
    dt_limit = draw(st.sampled_from([None, None, (0.0, float("inf")), (0.05, 0.5)]))
    # source columns past this step's tokens: vLLM's accepted count may exceed them
    extra_cols = draw(st.integers(0, 1)) if spec else 0
    seed = draw(st.integers(0, 2**31 - 1))
    rng, randn = random.Random(seed), _gen(seed, device)

    ncols = max([*lengths, 1]) + extra_cols if spec else 1
    writes = [ncols if spec else 1] * nseq
    rows = sequence_rows(rng, writes, indexed=use_indices, redirect=redirect, pad=pad)
    heads = (nheads,) if mamba2 else ()
    groups = (ngroups,) if mamba2 else ()
    lead = (sum(lengths),) if form == "varlen" else (nseq, per_seq) if form == "multi" else (nseq,)

    call: dict[str, Any] = {"pad_slot_id": pad, "dt_softplus": softplus, "dt_limit": dt_limit}
    call["state"], call["state_scale"] = _state_rows(
        randn(rows.nslots, *heads, dim, dstate), state_dtype, cache, rng
    )
    if packed:
        hd, gn = nheads * dim, ngroups * dstate
        proj = randn(*lead, 2 * hd + 2 * gn + 1, dtype=in_dtype)
        call["x"] = proj[..., :hd].unflatten(-1, (nheads, dim))
        z = proj[..., hd : 2 * hd].unflatten(-1, (nheads, dim))
        call["B"] = proj[..., 2 * hd : 2 * hd + gn].unflatten(-1, (ngroups, dstate))
        call["C"] = proj[..., 2 * hd + gn : 2 * hd + 2 * gn].unflatten(-1, (ngroups, dstate))
    else:
        call["x"] = _maybe_strided(randn(*lead, *heads, dim, dtype=in_dtype), strided)
        z = randn(*lead, *heads, dim, dtype=in_dtype)
        call["B"] = randn(*lead, *groups, dstate, dtype=in_dtype)
        call["C"] = _maybe_strided(randn(*lead, *groups, dstate, dtype=in_dtype), strided)
    if dt_tied:
        call["dt"] = randn(*lead, nheads, 1, dtype=in_dtype, scale=0.5).expand(*lead, nheads, dim)
    else:
        call["dt"] = _maybe_strided(randn(*lead, *heads, dim, dtype=in_dtype, scale=0.5), strided)
    if A_tied:
        call["A"] = -randn(nheads, 1, 1).exp().expand(nheads, dim, dstate)
    else:
        call["A"] = -randn(*heads, dim, dstate).exp()

    def param(tied: bool) -> torch.Tensor:
        return randn(nheads, 1).expand(nheads, dim) if tied else randn(*heads, dim)

    call["D"] = param(D_tied) if has_D else None
    call["dt_bias"] = param(bias_tied) if has_bias else None
    if not softplus:  # the step size is positive, as softplus would make it
        call["dt"] = call["dt"].abs()
        call["dt_bias"] = None if call["dt_bias"] is None else call["dt_bias"].abs()
    call["z"] = z if has_z else None
    call["cu_seqlens"] = None
    if form == "varlen":
        call["cu_seqlens"] = _maybe_strided(_offsets(lengths, idx_dtype, device), strided)
    call["state_batch_indices"] = call["dst_state_batch_indices"] = call["num_accepted_tokens"] = (
        None
    )
    if use_indices:
        if spec:
            accepted = [rng.randint(1, ncols) for _ in lengths]
            # the source sits in the column the accepted count names; other columns are
            # the destinations (in place) or unused (redirect)
            src_cols = [list(r) for r in rows.dst]
            for b, n in enumerate(accepted):
                src_cols[b][n - 1] = rows.src[b]
            call["num_accepted_tokens"] = _index(accepted, idx_dtype, device)
            if redirect:
                call["state_batch_indices"] = _index(src_cols, idx_dtype, device).reshape(
                    nseq, ncols
                )
                call["dst_state_batch_indices"] = _index(rows.dst, idx_dtype, device).reshape(
                    nseq, ncols
                )
            else:
                call["state_batch_indices"] = _index(rows.dst, idx_dtype, device).reshape(
                    nseq, ncols
                )
        else:
            two_d = draw(st.booleans())
            src = _index(rows.src, idx_dtype, device)
            dst = _index([r[0] for r in rows.dst], idx_dtype, device)
            if redirect:
                call["state_batch_indices"], call["dst_state_batch_indices"] = src, dst
            else:
                call["state_batch_indices"] = dst
            if two_d:
                for name in ("state_batch_indices", "dst_state_batch_indices"):
                    if call[name] is not None:
                        call[name] = call[name][:, None]
        for name in ("state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens"):
            call[name] = _laid_out(call[name], layout)
    call["out"] = None
    call["rand_seed"] = None
    if state_dtype in ROUNDED and draw(st.booleans()):  # any 64-bit seed, negative included
        seed = draw(st.sampled_from([0, -1, 2**63 - 1, rng.randrange(-(2**63), 2**63)]))
        call["rand_seed"] = torch.tensor([seed] if rng.random() < 0.5 else seed, device=device)
    return call


@st.composite
def causal_conv1d_fn_calls(draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL):
    dim = draw(st.integers(1, sizes.max_channels))
    width = draw(st.sampled_from([2, 3, 4]))
    state_len = width - 1 + draw(st.sampled_from([0, 0, 2]))
    nseq = draw(st.integers(1, sizes.max_seqs))
    lengths = draw(st.lists(st.integers(0, sizes.max_prefill), min_size=nseq, max_size=nseq))
    redirect, use_indices = draw(st.booleans()), draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    x_dtype, state_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    channel_last = draw(st.booleans())
    bias = draw(st.sampled_from(["none", "plain", "strided", "tied"]))
    layout, qsl_strided = draw(st.sampled_from(INDEX_LAYOUTS)), draw(st.booleans())
    projected = channel_last and draw(st.booleans())  # x: channels sliced from a projection
    cache = draw(st.sampled_from(["own", "layer", "interleaved"]))
    activation = draw(st.sampled_from([None, "silu"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng, randn = random.Random(seed), _gen(seed, device)

    use_indices = use_indices or redirect
    rows = sequence_rows(rng, [1] * nseq, indexed=use_indices, redirect=redirect, pad=pad)
    ntok = sum(lengths)
    if projected:
        x = randn(ntok, dim + 3, dtype=x_dtype)[:, 1 : dim + 1].t()
    else:
        x = randn(ntok, dim, dtype=x_dtype).t() if channel_last else randn(dim, ntok, dtype=x_dtype)
    states = _conv_states(randn, rows.nslots, dim, state_len, state_dtype, channel_last)
    initial = torch.tensor([rng.random() < 0.7 for _ in range(nseq)], device=device)
    return {
        "x": x,
        "weight": randn(dim, width, dtype=x_dtype, scale=0.5),
        "bias": _bias(randn, dim, x_dtype, bias),
        "conv_states": _in_cache(states, cache),
        "query_start_loc": _maybe_strided(_offsets(lengths, idx_dtype, device), qsl_strided),
        "cache_indices": _laid_out(_index([r[0] for r in rows.dst], idx_dtype, device), layout)
        if use_indices
        else None,
        "has_initial_state": _laid_out(initial, layout),
        "activation": activation,
        "pad_slot_id": pad,
        "src_cache_indices": _laid_out(_index(rows.src, idx_dtype, device), layout)
        if redirect
        else None,
    }


@st.composite
def causal_conv1d_update_calls(draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL):
    dim = draw(st.integers(1, sizes.max_channels))
    width = draw(st.sampled_from([2, 3, 4]))
    form = draw(st.sampled_from(["single", "multi", "varlen"]))
    nseq = draw(st.integers(1, sizes.max_seqs))
    per_seq = draw(st.integers(1, sizes.max_tokens)) if form == "multi" else 1
    lengths = [per_seq] * nseq
    if form == "varlen":
        lengths = draw(st.lists(st.integers(0, sizes.max_tokens), min_size=nseq, max_size=nseq))
    spec = draw(st.booleans())
    explicit_offset = draw(st.booleans())
    extra = draw(st.integers(0, 3))
    state_len = width - 1 + extra + (max(max(lengths) - 1, 0) if spec else 0)
    redirect, use_indices = draw(st.booleans()), draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    x_dtype, state_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    channel_last = draw(st.booleans())
    bias = draw(st.sampled_from(["none", "plain", "strided", "tied"]))
    layout, qsl_strided = draw(st.sampled_from(INDEX_LAYOUTS)), draw(st.booleans())
    projected = form != "multi" and draw(st.booleans())  # x: channels sliced from a projection
    cache = draw(st.sampled_from(["own", "layer", "interleaved"]))
    activation = draw(st.sampled_from([None, "silu", "swish"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng, randn = random.Random(seed), _gen(seed, device)

    use_indices = use_indices or redirect
    rows = sequence_rows(rng, [1] * nseq, indexed=use_indices, redirect=redirect, pad=pad)
    if form == "multi":
        x = randn(nseq, per_seq, dim, dtype=x_dtype).transpose(1, 2)
    else:
        ntok = sum(lengths) if form == "varlen" else nseq
        x = randn(ntok, dim + 3, dtype=x_dtype)[:, 1 : dim + 1] if projected else randn(
            ntok, dim, dtype=x_dtype
        )
    states = _conv_states(randn, rows.nslots, dim, state_len, state_dtype, channel_last)

    def per_seq_index(values: list[int]) -> torch.Tensor:
        return _laid_out(_index(values, idx_dtype, device), layout)

    call: dict[str, Any] = {
        "x": x,
        "conv_state": _in_cache(states, cache),
        "weight": randn(dim, width, dtype=x_dtype, scale=0.5),
        "bias": _bias(randn, dim, x_dtype, bias),
        "activation": activation,
        "conv_state_indices": per_seq_index([r[0] for r in rows.dst]) if use_indices else None,
        "num_accepted_tokens": None,
        "query_start_loc": None,
        "pad_slot_id": pad,
        "src_conv_state_indices": per_seq_index(rows.src) if redirect else None,
        "src_token_offset": None,
    }
    if form == "varlen":
        call["query_start_loc"] = _maybe_strided(_offsets(lengths, idx_dtype, device), qsl_strided)
    if spec:
        call["num_accepted_tokens"] = per_seq_index([rng.randint(1, extra + 1) for _ in lengths])
    if explicit_offset:
        call["src_token_offset"] = per_seq_index([rng.randint(0, extra) for _ in lengths])
    return call


@st.composite
def copy_state_blocks_calls(draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL):
    row_shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    ncopies = draw(st.integers(0, sizes.max_seqs * 2))
    pad = draw(st.sampled_from([-1, 0]))
    dtype = draw(st.sampled_from(STATE_DTYPES))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    layout = draw(st.sampled_from(["plain", "strided", "column"]))
    cache = draw(st.sampled_from(["own", "layer", "interleaved"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng, randn = random.Random(seed), _gen(seed, device)
    rows = assign_rows(rng, [1] * ncopies, redirect=True, pad=pad)
    state, scale = _state_rows(randn(rows.nslots, *row_shape), dtype, cache, rng)
    return {
        "state": state, "state_scale": scale,
        "src": _laid_out(_index(rows.src, idx_dtype, device), layout),
        "dst": _laid_out(_index([r[0] for r in rows.dst], idx_dtype, device), layout),
        "pad_slot_id": pad,
    }


@st.composite
def mamba_chunk_scan_calls(draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL):
    ngroups = draw(st.sampled_from([g for g in (1, 2, 4) if g <= sizes.max_heads]))
    nheads = ngroups * draw(st.integers(1, max(1, sizes.max_heads // ngroups)))
    dim = draw(st.integers(1, sizes.max_dim))
    dstate = draw(st.sampled_from(sizes.dstates))
    chunk = draw(st.sampled_from(sizes.scan_chunks))
    nseq = draw(st.integers(0, sizes.max_seqs))
    lengths = draw(
        st.lists(st.integers(0, sizes.max_scan_tokens), min_size=nseq, max_size=nseq)
    )
    computed = draw(st.one_of(st.none(), st.lists(
        st.integers(0, 3 * chunk), min_size=nseq, max_size=nseq)))
    block = chunk * draw(st.sampled_from([0, 1, 2]))
    redirect = draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    state_dtype, in_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    sliced = draw(st.booleans())
    cache = draw(st.sampled_from(["own", "layer", "interleaved"]))
    layout = draw(st.sampled_from(INDEX_LAYOUTS))
    d_shape = draw(st.sampled_from([None, "head", "channel"]))
    has_z, has_bias, softplus = (draw(st.booleans()) for _ in range(3))
    limit = draw(st.sampled_from([None, (0.0, 0.25), (0.05, float("inf"))]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng, randn = random.Random(seed), _gen(seed, device)

    ncols = 0
    for c, n in zip(computed or [0] * nseq, lengths, strict=True):
        ncols = max(ncols, (c + n) // block - c // block if block else 0)
    ncols += rng.randint(0, 1)
    rows = assign_rows(rng, [1 + ncols] * nseq, redirect=redirect, pad=pad)
    ntok = sum(lengths)
    width = nheads * dim + 2 * ngroups * dstate
    if sliced:  # x, B, C as column slices of one conv output, dt of the projection
        xbc = randn(ntok, width + 3, dtype=in_dtype)[:, 1 : width + 1]
        x, b, c = xbc.split([nheads * dim, ngroups * dstate, ngroups * dstate], dim=-1)
        x = x.unflatten(-1, (nheads, dim))
        b, c = (t.unflatten(-1, (ngroups, dstate)) for t in (b, c))
        dt = randn(ntok, nheads + 5, dtype=in_dtype, scale=0.5)[:, 2 : nheads + 2]
    else:
        x = randn(ntok, nheads, dim, dtype=in_dtype)
        b, c = (randn(ntok, ngroups, dstate, dtype=in_dtype) for _ in range(2))
        dt = randn(ntok, nheads, dtype=in_dtype, scale=0.5)
    state = _in_cache(randn(rows.nslots, nheads, dim, dstate, dtype=state_dtype), cache)
    call: dict[str, Any] = {
        "state": state, "x": x, "dt": dt if softplus else dt.abs(),
        "A": -randn(nheads).exp(), "B": b, "C": c, "chunk_size": chunk,
        "cu_seqlens": _offsets(lengths, idx_dtype, device),
        "D": None if d_shape is None
        else randn(nheads) if d_shape == "head" else randn(nheads, dim),
        "z": randn(ntok, nheads, dim, dtype=in_dtype) if has_z else None,
        "dt_bias": None, "dt_softplus": softplus, "dt_limit": limit,
        "state_batch_indices": _index(rows.src, idx_dtype, device),
        "dst_state_batch_indices": _index([r[0] for r in rows.dst], idx_dtype, device)
        if redirect
        else None,
        "pad_slot_id": pad, "block_size": block,
        "num_computed_tokens": None if computed is None else _index(computed, idx_dtype, device),
        "checkpoint_state_indices": _index([r[1:] for r in rows.dst], idx_dtype, device).reshape(
            nseq, ncols
        )
        if block
        else None,
        "out": None,
    }
    if has_bias:
        bias = randn(nheads, scale=0.5)
        call["dt_bias"] = bias if softplus else bias.abs()
    if not redirect:  # in place: each sequence reads and writes its first row
        call["state_batch_indices"] = _index([r[0] for r in rows.dst], idx_dtype, device)
    for name in ("state_batch_indices", "dst_state_batch_indices", "num_computed_tokens",
                 "checkpoint_state_indices"):
        call[name] = _laid_out(call[name], layout)
    return call


def calls(
    op: IrOp | str, device: str = "cpu", sizes: Sizes = SMALL
) -> st.SearchStrategy[dict[str, Any]]:
    """Valid argument sets for ``op`` (or the op of that name): its registered strategy."""
    op = get_op(op) if isinstance(op, str) else op
    if op.strategy is None:
        raise ValueError(f"op: {op.name} has no strategy (declare one with "
                         f"{op.name}.register_strategy, or pass check_impl(strategy=...))")
    return op.strategy(device=device, sizes=sizes)


def _channel_first(randn, ntok: int, widths: list[int], dtype, layout: str) -> list[torch.Tensor]:
    """Per-token tensors ``(width, tokens)``: contiguous along tokens, transposed views of
    ``(tokens, width)``, or column blocks of one projection output (vLLM's views)."""
    if layout == "dim_major":
        return [randn(w, ntok, dtype=dtype) for w in widths]
    if layout == "token_major":
        return [randn(ntok, w, dtype=dtype).t() for w in widths]
    base = randn(ntok, sum(widths) + 2, dtype=dtype)[:, 1:-1]
    return [part.t() for part in base.split(widths, dim=1)]


@st.composite
def selective_scan_calls(draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL):
    ngroups = draw(st.sampled_from([0, 1, 2]))  # 0: B and C as (dstate, tokens)
    groups = max(ngroups, 1)
    dim = groups * draw(st.integers(1, max(1, sizes.max_channels // (2 * groups))))
    dstate = draw(st.sampled_from(sizes.dstates))
    nseq = draw(st.integers(0, sizes.max_seqs))
    lengths = draw(
        st.lists(st.integers(0, sizes.max_scan_tokens), min_size=nseq, max_size=nseq)
    )
    block = draw(st.sampled_from([0, 0, 3, 8]))
    computed = draw(st.one_of(st.none(), st.lists(
        st.integers(0, 20), min_size=nseq, max_size=nseq)))
    redirect, use_indices = draw(st.booleans()), draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    state_dtype, in_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    layout = draw(st.sampled_from(["dim_major", "token_major", "sliced"]))
    state_view, given_out, tail = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    has_D, has_z, has_bias, softplus, has_init = (draw(st.booleans()) for _ in range(5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng, randn = random.Random(seed), _gen(seed, device)

    def per_seq(t: torch.Tensor | None) -> torch.Tensor | None:
        """With ``tail``, entries past the sequences that name no row (vLLM pads index
        tensors to a CUDA-graph batch; the op ignores them)."""
        if t is None:
            return None
        junk = torch.full((2 * tail, *t.shape[1:]), 1 << 20, dtype=t.dtype, device=t.device)
        return torch.cat([t, junk])

    ncols = 0
    for c, n in zip(computed or [0] * nseq, lengths, strict=True):
        ncols = max(ncols, (c + n) // block - c // block if block else 0)
    ncols += rng.randint(0, 1) if block else 0
    indexed = use_indices or redirect or bool(block)
    rows = sequence_rows(rng, [1 + ncols] * nseq, indexed=indexed, redirect=redirect, pad=pad)
    ntok = sum(lengths)
    u, z = _channel_first(randn, ntok, [dim, dim], in_dtype, layout)
    delta, b, c = _channel_first(randn, ntok, [dim, groups * dstate, groups * dstate], in_dtype,
                                 layout)
    delta.mul_(0.5)
    if not softplus:  # the step size is positive, as softplus would make it
        delta.abs_()
    if ngroups:
        b, c = b.unflatten(0, (ngroups, dstate)), c.unflatten(0, (ngroups, dstate))
    state = randn(rows.nslots + 2 * state_view, dim, dstate, dtype=state_dtype)
    if state_view:  # rows of a larger cache
        state = state[1:-1]
    bias = randn(dim, scale=0.5) if has_bias else None
    call: dict[str, Any] = {
        "u": u, "ssm_states": state, "delta": delta, "A": -randn(dim, dstate).exp(),
        "B": b, "C": c, "D": randn(dim) if has_D else None, "z": z if has_z else None,
        "delta_bias": bias if softplus or bias is None else bias.abs(),
        "delta_softplus": softplus,
        "query_start_loc": _offsets(lengths, idx_dtype, device),
        "cache_indices": _index([r[0] for r in rows.dst], idx_dtype, device) if indexed else None,
        "has_initial_state": torch.tensor([rng.random() < 0.7 for _ in range(nseq)],
                                          dtype=torch.bool, device=device) if has_init else None,
        "pad_slot_id": pad, "block_size": block,
        "src_cache_indices": _index(rows.src, idx_dtype, device) if redirect else None,
        "num_computed_tokens": None if computed is None else _index(computed, idx_dtype, device),
        "checkpoint_state_indices": _index([r[1:] for r in rows.dst], idx_dtype, device).reshape(
            nseq, ncols
        )
        if block
        else None,
        "out": randn(ntok, dim, dtype=in_dtype).t() if given_out else None,
    }
    for name in ("cache_indices", "has_initial_state", "src_cache_indices",
                 "num_computed_tokens", "checkpoint_state_indices"):
        call[name] = per_seq(call[name])
    return call
