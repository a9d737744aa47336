"""Calls of the ops with sequences, for the tests of non-finite values and unchecked offsets.

Each builder returns a :class:`Seqs`: a bound call (outputs given, so a provider function
can be called directly, without the op's checks) with the facts those tests need: each
sequence's tokens, source and destination row, which argument is the state, how to read one
token's output, and which per-token inputs (and, for the replay ops, which ring members of
a row) can be poisoned. Sizes are small for Triton's interpreter; ``full=True`` gives
Mamba2's sizes for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mamba_ir import get_op

PAD = -1


@dataclass
class Seqs:
    op: str
    call: dict[str, Any]
    lengths: list[int]
    dst: list[int]  # each sequence's destination row
    state: str  # the state argument
    out: str | None  # the output argument (None: the provider returns it)
    out_axis: int  # the token axis of the output
    inputs: dict[str, int] = field(default_factory=dict)  # per-token inputs: token axis
    src: list[int] | None = None  # each sequence's source row (None: its destination)
    ring: tuple[str, ...] = ()  # row members holding ring entries (axis 1), replay's rows

    @property
    def starts(self) -> list[int]:
        return [sum(self.lengths[:b]) for b in range(len(self.lengths))]

    @property
    def sources(self) -> list[int]:
        return self.dst if self.src is None else self.src

    def members(self, call: dict[str, Any]) -> tuple[str, ...]:
        """The tensors a row of the state is (the op's row spec): replay's five, or one."""
        return get_op(self.op).rows.members(call)

    def values(self, call: dict[str, Any], rows: list[int]) -> torch.Tensor:
        """``rows`` as the op's row spec values them, one flat float32 row each: a replay
        row's checkpoint, filled ring entries and length (entries past the length are not
        part of the row), or the state's rows as they are."""
        spec, members = get_op(self.op).rows, self.members(call)
        if spec.value is None or len(members) == 1:
            return call[self.state][rows].float().flatten(1)
        return spec.value({n: call[n][rows] for n in members})[0]

    def clone(self) -> dict[str, Any]:
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.call.items()}

    def run(self, provider: str, call: dict[str, Any]) -> torch.Tensor | None:
        """The provider's function on ``call`` (no checks); returns the output (None for
        an op without one)."""
        got = get_op(self.op).impls[provider].fn(**call)
        return call[self.out] if self.out is not None else got

    def token(self, out: torch.Tensor, t: int) -> torch.Tensor:
        return out.select(self.out_axis, t)


def _gen(seed: int) -> Callable[..., torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _offsets(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def _rows(lengths: list[int], nslots: int) -> list[int]:
    """Distinct destination rows, in a shuffled order, away from row 0."""
    return [(3 * b + 2) % nslots for b in range(len(lengths))]


def chunk_scan(lengths: list[int], device: str = "cpu", *, full: bool = False,
               seed: int = 0, **over: Any) -> Seqs:
    h, p, n, g, chunk = (128, 64, 128, 8, 256) if full else (1, 4, 8, 1, 4)
    r, ntok, nslots = _gen(seed), sum(lengths), 2 * len(lengths) + 3
    dst = _rows(lengths, nslots)
    call = dict(
        state=r(nslots, h, p, n), x=r(ntok, h, p), dt=r(ntok, h) * 0.5, A=-r(h).exp(),
        B=r(ntok, g, n), C=r(ntok, g, n), chunk_size=chunk,
        cu_seqlens=_offsets(lengths, "cpu"), D=r(h), z=r(ntok, h, p), dt_bias=r(h) * 0.5,
        dt_softplus=True, dt_limit=(0.0, float("inf")),
        state_batch_indices=torch.tensor(dst, dtype=torch.int32), pad_slot_id=PAD,
        out=torch.zeros(ntok, h, p),
    )
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, ("state", "A", "D", "dt_bias"))
    return Seqs("mamba_chunk_scan", get_op("mamba_chunk_scan").bind(**call), list(lengths),
                dst, "state", "out", 0, {"x": 0, "dt": 0, "B": 0, "C": 0, "z": 0})


def ssu(lengths: list[int], device: str = "cpu", *, full: bool = False, seed: int = 0,
        **over: Any) -> Seqs:
    """Varlen ``selective_state_update`` (several tokens per sequence), dt, A, D tied."""
    h, p, n, g = (128, 64, 128, 8) if full else (1, 4, 8, 1)
    r, ntok, nslots = _gen(seed), sum(lengths), 2 * len(lengths) + 3
    dst = _rows(lengths, nslots)
    call = dict(
        state=r(nslots, h, p, n), x=r(ntok, h, p), dt=(r(ntok, h, 1) * 0.5).expand(ntok, h, p),
        A=-r(h, 1, 1).exp().expand(h, p, n), B=r(ntok, g, n), C=r(ntok, g, n),
        D=r(h, 1).expand(h, p), z=r(ntok, h, p), dt_bias=(r(h, 1) * 0.5).expand(h, p),
        dt_softplus=True, dt_limit=(0.0, float("inf")),
        state_batch_indices=torch.tensor(dst, dtype=torch.int32), pad_slot_id=PAD,
        cu_seqlens=_offsets(lengths, "cpu"), out=torch.zeros(ntok, h, p),
    )
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, ("A", "D", "dt_bias"))
    return Seqs("selective_state_update", get_op("selective_state_update").bind(**call),
                list(lengths), dst, "state", "out", 0,
                {"x": 0, "dt": 0, "B": 0, "C": 0, "z": 0})


def conv_fn(lengths: list[int], device: str = "cpu", *, full: bool = False, seed: int = 0,
            **over: Any) -> Seqs:
    dim, width = (8192 + 2 * 8 * 128, 4) if full else (6, 4)
    r, ntok, nslots = _gen(seed), sum(lengths), 2 * len(lengths) + 3
    dst = _rows(lengths, nslots)
    call = dict(
        x=r(ntok, dim).t(), weight=r(dim, width), bias=r(dim),
        conv_states=r(nslots, dim, width - 1), query_start_loc=_offsets(lengths, "cpu"),
        cache_indices=torch.tensor(dst, dtype=torch.int32),
        has_initial_state=torch.ones(len(lengths), dtype=torch.bool), activation="silu",
        pad_slot_id=PAD,
    )
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, ())
    return Seqs("causal_conv1d_fn", get_op("causal_conv1d_fn").bind(**call), list(lengths),
                dst, "conv_states", None, 1, {"x": 1})


def selective_scan(lengths: list[int], device: str = "cpu", *, full: bool = False,
                   seed: int = 0, **over: Any) -> Seqs:
    dim, n = (1536 * 2, 16) if full else (6, 4)
    r, ntok, nslots = _gen(seed), sum(lengths), 2 * len(lengths) + 3
    dst = _rows(lengths, nslots)
    call = dict(
        u=r(ntok, dim).t(), ssm_states=r(nslots, dim, n), delta=r(ntok, dim).t() * 0.5,
        A=-r(dim, n).exp(), B=r(n, ntok), C=r(n, ntok), D=r(dim), z=r(ntok, dim).t(),
        delta_bias=r(dim) * 0.5, delta_softplus=True, query_start_loc=_offsets(lengths, "cpu"),
        cache_indices=torch.tensor(dst, dtype=torch.int32),
        has_initial_state=torch.ones(len(lengths), dtype=torch.bool), pad_slot_id=PAD,
        out=torch.zeros(dim, ntok),
    )
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, ("ssm_states", "A", "D",
                                                                 "delta_bias"))
    return Seqs("selective_scan", get_op("selective_scan").bind(**call), list(lengths), dst,
                "ssm_states", "out", 1, {"u": 1, "delta": 1, "B": 1, "C": 1, "z": 1})


def _to(call: dict[str, Any], device: str, dtype: torch.dtype | None,
        keep_fp32: tuple[str, ...]) -> dict[str, Any]:
    """Every tensor on ``device``; floating ones (but ``keep_fp32``) in ``dtype`` when
    given, keeping their layout (transposed views stay transposed)."""
    out = {}
    for k, v in call.items():
        if isinstance(v, torch.Tensor):
            if dtype is not None and v.is_floating_point() and k not in keep_fp32:
                v = v.to(dtype)
            v = v.to(device)
        out[k] = v
    return out


def _replay_rows(lengths: list[int], r: Callable[..., torch.Tensor], full: bool
                 ) -> tuple[dict[str, torch.Tensor], list[int], list[int], tuple[int, ...]]:
    """Replay rows (checkpoint and ring) for one token (or copy) per sequence, and each
    sequence's source and destination row. Sequence b's source ring holds ``lengths[b]``
    entries scaled to the ring (the longest fills it: a flush; the others append); the first
    sequence reads another row than it writes (redirect: its entries move along), the others
    read their own. Entries past a row's length are NaN (not part of the row) and the rows
    no sequence reads hold stale lengths."""
    h, p, n, g = (128, 64, 128, 8) if full else (1, 4, 8, 1)
    ring = 16 if full else max(lengths)
    nslots = 2 * len(lengths) + 3
    dst = _rows(lengths, nslots)
    src = [dst[0] + 1, *dst[1:]]  # dst[0] + 1: a row no sequence writes
    ring_len = torch.tensor([(3 * row) % (ring + 1) for row in range(nslots)], dtype=torch.int32)
    for row, length in zip(src, lengths, strict=True):
        ring_len[row] = length * ring // max(lengths)
    past = torch.arange(ring)[None, :] >= ring_len[:, None]

    def entries(*shape: int) -> torch.Tensor:
        t = r(nslots, ring, *shape)
        t[past] = float("nan")
        return t

    rows = dict(state=r(nslots, h, p, n), ring_x=entries(h, p),
                ring_dt=entries(h).abs() * 0.3 + 0.05, ring_B=entries(g, n), ring_len=ring_len)
    return rows, src, dst, (h, p, n, g)


REPLAY_RING = ("ring_x", "ring_dt", "ring_B")
REPLAY_KEEP = ("ring_dt", "A", "D", "dt_bias")  # float32 at full size too (ring_dt always)


def replay(lengths: list[int], device: str = "cpu", *, full: bool = False, seed: int = 0,
           **over: Any) -> Seqs:
    """``replay_state_update``: one token per sequence from the rows of :func:`_replay_rows`;
    dt, A, D and dt_bias tied over headdim (one step size per head)."""
    r, batch = _gen(seed), len(lengths)
    rows, src, dst, (h, p, n, g) = _replay_rows(lengths, r, full)
    call = dict(
        **rows, x=r(batch, h, p), dt=(r(batch, h, 1) * 0.5).expand(batch, h, p),
        A=-r(h, 1, 1).exp().expand(h, p, n), B=r(batch, g, n), C=r(batch, g, n),
        D=r(h, 1).expand(h, p), z=r(batch, h, p), dt_bias=(r(h, 1) * 0.5).expand(h, p),
        dt_softplus=True, dt_limit=(0.0, float("inf")),
        state_batch_indices=torch.tensor(src, dtype=torch.int32),
        dst_state_batch_indices=torch.tensor(dst, dtype=torch.int32), pad_slot_id=PAD,
        out=torch.zeros(batch, h, p),
    )
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, REPLAY_KEEP)
    return Seqs("replay_state_update", get_op("replay_state_update").bind(**call),
                [1] * batch, dst, "state", "out", 0,
                {"x": 0, "dt": 0, "B": 0, "C": 0, "z": 0}, src, REPLAY_RING)


def materialize(lengths: list[int], device: str = "cpu", *, full: bool = False,
                seed: int = 0, **over: Any) -> Seqs:
    """``replay_materialize`` of the rows of :func:`_replay_rows`, one copy per sequence
    (no tokens, no output: only rows change)."""
    r = _gen(seed)
    rows, src, dst, (h, p, n, _) = _replay_rows(lengths, r, full)
    call = dict(**rows, A=-r(h, 1, 1).exp().expand(h, p, n),
                src=torch.tensor(src, dtype=torch.int32),
                dst=torch.tensor(dst, dtype=torch.int32), pad_slot_id=PAD)
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, REPLAY_KEEP)
    return Seqs("replay_materialize", get_op("replay_materialize").bind(**call),
                [0] * len(lengths), dst, "state", None, 0, {}, src, REPLAY_RING)


BUILDERS: dict[str, Callable[..., Seqs]] = {
    "mamba_chunk_scan": chunk_scan,
    "selective_state_update": ssu,
    "causal_conv1d_fn": conv_fn,
    "selective_scan": selective_scan,
    "replay_state_update": replay,
}
# ops whose rows hold rings of inputs: a poisoned ring entry is a poisoned row
RING_BUILDERS: dict[str, Callable[..., Seqs]] = {
    "replay_state_update": replay,
    "replay_materialize": materialize,
}


def conv_update(lengths: list[int], device: str = "cpu", *, full: bool = False,
                seed: int = 0, **over: Any) -> Seqs:
    """Varlen ``causal_conv1d_update`` (``query_start_loc``, several tokens per sequence)."""
    dim, width = (8192 + 2 * 8 * 128, 4) if full else (6, 4)
    r, ntok, nslots = _gen(seed), sum(lengths), 2 * len(lengths) + 3
    dst = _rows(lengths, nslots)
    call = dict(
        x=r(ntok, dim), conv_state=r(nslots, dim, width - 1), weight=r(dim, width),
        bias=r(dim), activation="silu", conv_state_indices=torch.tensor(dst, dtype=torch.int32),
        query_start_loc=_offsets(lengths, "cpu"), pad_slot_id=PAD,
    )
    call.update(over)
    call = _to(call, device, torch.bfloat16 if full else None, ())
    return Seqs("causal_conv1d_update", get_op("causal_conv1d_update").bind(**call),
                list(lengths), dst, "conv_state", None, 0, {"x": 0})
