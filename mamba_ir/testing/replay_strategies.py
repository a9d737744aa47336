"""Hypothesis argument sets of ``replay_state_update`` and ``replay_materialize``: rings
empty, partly filled and full (a flush), redirected, shared and padded rows, every row
member a view of a larger cache, index tensors plain, strided, padded or (one source row
for every sequence) stride 0; speculative calls of ``replay_state_update`` (``T`` tokens
per sequence, each source row's count of accepted tokens drawn among those its ring can
roll back: a flush where the tokens do not fit after the committed entries).

Ring entries past a row's ``ring_len`` hold NaN: they are not part of the row, so a
provider that reads them into a result fails ``check_impl``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from hypothesis import strategies as st

from .strategies import SMALL, Sizes, assign_rows

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
CACHES = ("own", "layer", "interleaved")
INDEX_LAYOUTS = ("plain", "strided", "padded")
JUNK = 1 << 20  # what index padding holds: a row no call has, if ever read


def _in_cache(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` as a view of a larger cache: one layer of two, or rows interleaved with
    another layer's (twice the row stride)."""
    if how == "own":
        return t
    if how == "layer":
        cache = torch.empty((2, *t.shape), dtype=t.dtype, device=t.device)
        cache[1] = t
        return cache[1]
    cache = torch.empty((t.shape[0], 2, *t.shape[1:]), dtype=t.dtype, device=t.device)
    cache[:, 0] = t
    return cache[:, 0]


def _laid_out(t: torch.Tensor, how: str) -> torch.Tensor:
    """An index tensor as built, every other entry of a wider buffer, followed by entries
    past the batch (which the op ignores), or, ``shared``, its first entry for every
    sequence with stride 0 (source indices whose entries :func:`_shared` made equal)."""
    if how == "shared":
        return t[:1].expand(t.shape[0]) if t.shape[0] else t
    if how == "strided":
        wide = torch.full((2 * t.shape[0],), JUNK, dtype=t.dtype, device=t.device)
        wide[::2] = t
        return wide[::2]
    if how == "padded":
        return torch.cat([t, torch.full((2,), JUNK, dtype=t.dtype, device=t.device)])
    return t


def _shared(rng: random.Random, src: list[int], dst: list[int], nslots: int,
            pad: int) -> list[int]:
    """Sources for the ``shared`` layout (redirect only): every sequence reads one row that
    no sequence writes (the row rules), or the pad, so one stride-0 index names them all."""
    unwritten = [r for r in range(nslots) if r not in dst and r != pad]
    return [rng.choice([*unwritten, pad])] * len(src)


def _lengths(rng: random.Random, fill: str, ring: int) -> int:
    if fill == "full":
        return ring
    if fill == "partial" and ring > 1:
        return rng.randint(1, ring - 1)
    return 0


def _row_members(rng: random.Random, randn: Any, *, nslots: int, src: list[int],
                 fills: list[str], pad: int, ring: int, nheads: int, dim: int, ngroups: int,
                 dstate: int, state_dtype: torch.dtype, in_dtype: torch.dtype,
                 caches: dict[str, Any], device: str) -> tuple[dict[str, Any], list[int]]:
    """A replay row's members for ``nslots`` rows, each in its drawn cache, and the rows'
    lengths: stale in every row, each source's as its fill; entries past a row's length
    are NaN (not the row's)."""
    lengths = [rng.randint(0, ring) for _ in range(nslots)]
    for row, fill in zip(src, fills, strict=True):
        if row != pad:
            lengths[row] = _lengths(rng, fill, ring)
    ring_len = torch.tensor(lengths, dtype=torch.int32, device=device)
    past = torch.arange(ring, device=device)[None, :] >= ring_len[:, None]  # not in the row

    def ring_entries(*shape: int, dtype: torch.dtype, positive: bool = False) -> torch.Tensor:
        t = randn(nslots, ring, *shape)
        t = t.abs() * 0.5 if positive else t
        t[past] = float("nan")
        return t.to(dtype)

    members = {
        "state": _in_cache(randn(nslots, nheads, dim, dstate, dtype=state_dtype),
                           caches["state"]),
        "ring_x": _in_cache(ring_entries(nheads, dim, dtype=in_dtype), caches["ring_x"]),
        "ring_dt": _in_cache(ring_entries(nheads, dtype=torch.float32, positive=True),
                             caches["ring_dt"]),
        "ring_B": _in_cache(ring_entries(ngroups, dstate, dtype=in_dtype), caches["ring_B"]),
        "ring_len": _in_cache(ring_len, caches["ring_len"]),
    }
    return members, lengths


@st.composite
def replay_state_update_calls(
    draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL
) -> dict[str, Any]:
    ngroups = draw(st.sampled_from([g for g in (1, 2, 4) if g <= sizes.max_heads]))
    nheads = ngroups * draw(st.integers(1, max(1, sizes.max_heads // ngroups)))
    dim = draw(st.integers(1, sizes.max_dim))
    dstate = draw(st.sampled_from(sizes.dstates))
    ring = draw(st.integers(1, sizes.max_tokens))
    nseq = draw(st.integers(0, sizes.max_seqs))
    fills = draw(st.lists(st.sampled_from(["empty", "partial", "full"]),
                          min_size=nseq, max_size=nseq))
    tokens = draw(st.integers(1, ring)) if draw(st.booleans()) else 0  # 0: one token, plain
    redirect = draw(st.booleans())
    use_indices = redirect or draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    state_dtype, in_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    caches = {name: draw(st.sampled_from(CACHES))
              for name in ("state", "ring_x", "ring_dt", "ring_B", "ring_len")}
    layout = draw(st.sampled_from(INDEX_LAYOUTS + (("shared",) if redirect else ())))
    A_tied, D_tied, x_strided = (draw(st.booleans()) for _ in range(3))
    has_D, has_z, has_bias, softplus = (draw(st.booleans()) for _ in range(4))
    dt_limit = draw(st.sampled_from([None, None, (0.0, float("inf")), (0.05, 0.5)]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    if use_indices:
        rows = assign_rows(rng, [1] * nseq, redirect=redirect, pad=pad)
        src, dst = rows.src, [r[0] for r in rows.dst]
        nslots = rows.nslots
        if layout == "shared":
            src = _shared(rng, src, dst, nslots, pad)
    else:  # sequence b reads and writes row b
        nslots, src = nseq + rng.randint(0, 2), list(range(nseq))
        dst = src
    members, lengths = _row_members(
        rng, randn, nslots=nslots, src=src, fills=fills, pad=pad, ring=ring, nheads=nheads,
        dim=dim, ngroups=ngroups, dstate=dstate, state_dtype=state_dtype, in_dtype=in_dtype,
        caches=caches, device=device)
    call: dict[str, Any] = {**members, "pad_slot_id": pad, "dt_softplus": softplus,
                            "dt_limit": dt_limit, "out": None}
    lead = (nseq, tokens) if tokens else (nseq,)
    x = randn(*lead, nheads, 2 * dim if x_strided else dim, dtype=in_dtype)
    call["x"] = x[..., ::2] if x_strided else x
    call["B"] = randn(*lead, ngroups, dstate, dtype=in_dtype)
    call["C"] = randn(*lead, ngroups, dstate, dtype=in_dtype)
    call["z"] = randn(*lead, nheads, dim, dtype=in_dtype) if has_z else None
    # one step size per head (tied over headdim), positive as softplus would make it
    dt = randn(*lead, nheads, 1, dtype=in_dtype) * 0.5
    call["dt"] = (dt if softplus else dt.abs()).expand(*lead, nheads, dim)
    call["num_accepted_tokens"] = None
    if tokens:  # at most the source ring's entries dropped (a pad source: any count)
        nacc = [rng.randint(0 if row == pad else max(0, tokens - lengths[row]), tokens)
                for row in src]
        call["num_accepted_tokens"] = _laid_out(
            torch.tensor(nacc, dtype=idx_dtype, device=device), layout)
    bias = randn(nheads, 1)
    call["dt_bias"] = (bias if softplus else bias.abs()).expand(nheads, dim) if has_bias else None
    a = -randn(nheads, 1, 1).exp() if A_tied else -randn(nheads, dim, dstate).exp()
    call["A"] = a.expand(nheads, dim, dstate)
    call["D"] = (randn(nheads, 1).expand(nheads, dim) if D_tied else randn(nheads, dim)) \
        if has_D else None
    call["state_batch_indices"] = call["dst_state_batch_indices"] = None
    if use_indices:
        sbi = _laid_out(torch.tensor(src, dtype=idx_dtype, device=device), layout)
        if redirect:
            call["state_batch_indices"] = sbi
            call["dst_state_batch_indices"] = _laid_out(  # destinations differ: never shared
                torch.tensor(dst, dtype=idx_dtype, device=device),
                "plain" if layout == "shared" else layout)
        else:
            call["state_batch_indices"] = sbi
    return call


@st.composite
def replay_materialize_calls(
    draw: st.DrawFn, device: str = "cpu", sizes: Sizes = SMALL
) -> dict[str, Any]:
    """Rows of every fill materialised into fresh rows, in place, from a pad or into one."""
    ngroups = draw(st.sampled_from([g for g in (1, 2, 4) if g <= sizes.max_heads]))
    nheads = ngroups * draw(st.integers(1, max(1, sizes.max_heads // ngroups)))
    dim = draw(st.integers(1, sizes.max_dim))
    dstate = draw(st.sampled_from(sizes.dstates))
    ring = draw(st.integers(1, sizes.max_tokens))
    ncopies = draw(st.integers(0, sizes.max_seqs))
    fills = draw(st.lists(st.sampled_from(["empty", "partial", "full"]),
                          min_size=ncopies, max_size=ncopies))
    redirect = draw(st.booleans())
    pad = draw(st.sampled_from([-1, 0]))
    state_dtype, in_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    idx_dtype = draw(st.sampled_from(INDEX_DTYPES))
    caches = {name: draw(st.sampled_from(CACHES))
              for name in ("state", "ring_x", "ring_dt", "ring_B", "ring_len")}
    # every entry is a copy (no padding past them); a stride-0 source: one row forked
    layout = draw(st.sampled_from(["plain", "strided", *(["shared"] if redirect else [])]))
    A_tied = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    rows = assign_rows(rng, [1] * ncopies, redirect=redirect, pad=pad)
    src, dst = rows.src, [r[0] for r in rows.dst]
    if layout == "shared":
        src = _shared(rng, src, dst, rows.nslots, pad)
    a = -randn(nheads, 1, 1).exp() if A_tied else -randn(nheads, dim, dstate).exp()
    members, _ = _row_members(
        rng, randn, nslots=rows.nslots, src=src, fills=fills, pad=pad, ring=ring,
        nheads=nheads, dim=dim, ngroups=ngroups, dstate=dstate, state_dtype=state_dtype,
        in_dtype=in_dtype, caches=caches, device=device)
    return {
        **members,
        "A": a.expand(nheads, dim, dstate),
        "src": _laid_out(torch.tensor(src, dtype=idx_dtype, device=device), layout),
        "dst": _laid_out(torch.tensor(dst, dtype=idx_dtype, device=device),
                         "plain" if layout == "shared" else layout),
        "pad_slot_id": pad,
    }
