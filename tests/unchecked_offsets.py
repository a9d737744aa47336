"""Unchecked sequence offsets, row indices and ring lengths, driven through a provider's
function (what a graph compiled with the passes calls, without the op's value checks).

Every case puts the state (every member of a row: a replay row's checkpoint and ring, the
ring also between entries past either end), the output and the per-token inputs in the
middle of larger buffers filled with NaN, runs the provider and reports what went wrong: a
write outside the tensors (the buffers around them changed), an exception, or, where the
clamped values still describe a valid call (``equivalent``), a result other than native's
on that call (a read outside the tensors brings NaN in).

A provider that reads or writes outside its tensors can crash the interpreter (or the GPU
context), so tests run this file in a subprocess:

    python tests/unchecked_offsets.py OP[,OP...] PROVIDER [cuda]   # one JSON object
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if "cuda" not in sys.argv[3:]:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch
from nonfinite_calls import BUILDERS, PAD, RING_BUILDERS, Seqs, conv_update

from mamba_ir import get_op
from mamba_ir.testing import touched_rows

LENGTHS = [5, 7, 3]  # 15 tokens
FULL_LENGTHS = [700, 300, 1100]
GUARD = 4  # NaN rows (tokens, slots) on each side of a tensor
INT32_MAX = 2**31 - 1

OFFSETS = {
    "mamba_chunk_scan": "cu_seqlens",
    "selective_state_update": "cu_seqlens",
    "causal_conv1d_fn": "query_start_loc",
    "causal_conv1d_update": "query_start_loc",
    "selective_scan": "query_start_loc",
}
MAKE = {**BUILDERS, **RING_BUILDERS, "causal_conv1d_update": conv_update}
OPS = sorted({*OFFSETS, *RING_BUILDERS})  # the replay ops: no offsets, rows and rings


@dataclass(frozen=True)
class Case:
    name: str
    offsets: list[int] | None = None  # the offset tensor's values (None: the valid ones)
    # valid offsets that the clamped ones are the same sequences as (None: they overlap,
    # the result is not defined: only the buffers around the tensors are checked); for
    # the replay ops, one token per sequence, the tokens' bounds
    equivalent: list[int] | None = None
    over: dict[str, Any] = field(default_factory=dict)  # other arguments, as lists
    equivalent_over: dict[str, Any] = field(default_factory=dict)


def cases(op: str, ntok: int, lengths: list[int], full: bool = False) -> list[Case]:
    if op in RING_BUILDERS:
        return replay_cases(op, lengths, full)
    valid = [0, *[sum(lengths[: b + 1]) for b in range(len(lengths))]]
    a, b = valid[1], valid[2]
    out = [
        Case("past-the-tokens", [0, a, b, ntok + 25], valid),
        Case("negative-start", [-3, a, b, ntok], valid),
        Case("int32-max", [0, a, INT32_MAX, ntok], [0, a, ntok, ntok]),
        Case("all-negative", [-5, -2, -9, -1], [0, 0, 0, 0]),
        Case("non-monotonic", [0, b, a, ntok]),
    ]
    if op in ("mamba_chunk_scan", "selective_scan"):
        # checkpoints at every block boundary (a multiple of the scan's chunk), in rows no
        # sequence reads or writes (the destinations are rows 2, 5 and 8 of 9); a negative
        # count is 0, and boundaries past too few columns store nothing
        ckpt = [[0, 1], [3, 4], [6, 7]]
        over = {"block_size": 256 if full else 4, "checkpoint_state_indices": ckpt}
        one = {**over, "checkpoint_state_indices": [[r[0]] for r in ckpt]}
        out += [
            Case("negative-computed", None, valid, {**over, "num_computed_tokens": [-7, 3, -1]},
                 {**over, "num_computed_tokens": [0, 3, 0]}),
            Case("huge-computed-one-column", None, valid,
                 {**one, "num_computed_tokens": [INT32_MAX, 2, 0]}),
        ]
    return out


def replay_cases(op: str, lengths: list[int], full: bool = False) -> list[Case]:
    """Row indices past the rows, negative (not the pad), int32's maximum and an int64 past
    int32 (whose low half is a row), as sources and as destinations: such a row is a pad
    (a zero checkpoint and an empty ring; no write), as native reads it. Source ring
    lengths below 0 and past the ring: clamped to ``[0, ring]``; one outside
    ``[-2**15, 2**15)`` too where the destination is another row (in place Triton reads a
    length's low 16 bits, module docstring of ``_replay_kernel``: another length, still
    inside the ring). Rows that overlap (a source another sequence writes, one destination
    twice) give undefined values: only the buffers are checked."""
    seqs = RING_BUILDERS[op](lengths, full=full)  # the rows, as the cases are built on them
    spec, src, dst = get_op(op).rows, seqs.sources, seqs.dst
    nslots, ring = seqs.call[seqs.state].shape[0], seqs.call[seqs.ring[0]].shape[1]
    bounds = list(range(len(lengths) + 1))
    redirected, in_place = 0, 1  # the builder's sequences: 0 reads another row, 1 its own

    def rows(name: str, b: int, row: int) -> dict[str, list[int]]:
        values = list(src if name == spec.read else dst)
        values[b] = row
        return {name: values}

    def lengths_at(at: dict[int, int]) -> dict[str, list[int]]:
        """``ring_len`` with sequence b's source row holding ``at[b]``."""
        values = seqs.call["ring_len"].tolist()
        for b, length in at.items():
            values[src[b]] = length
        return {"ring_len": values}

    out = []
    for name in (spec.read, spec.write):
        for what, row in (("past-the-rows", nslots + 3), ("negative", -3),
                          ("int32-max", INT32_MAX)):
            out.append(Case(f"{name}-{what}", None, bounds, rows(name, in_place, row),
                            rows(name, in_place, PAD)))
        # int64 past int32: a kernel that narrows the index would name a real row
        wraps = {name: torch.tensor(rows(name, in_place, 2**32 + nslots - 2)[name])}
        out.append(Case(f"{name}-int64-past-int32", None, bounds, wraps,
                        rows(name, in_place, PAD)))
    r, i = redirected, in_place
    free = nslots - 2  # a row no sequence reads or writes
    assert free not in {*src, *dst}
    return out + [
        Case("ring-len-negative", None, bounds, lengths_at({r: -4, i: -1}),
             lengths_at({r: 0, i: 0})),
        Case("ring-len-past-the-ring", None, bounds, lengths_at({r: ring + 5, i: ring + 2}),
             lengths_at({r: ring, i: ring})),
        Case("ring-len-huge-redirected", None, bounds, lengths_at({r: INT32_MAX}),
             lengths_at({r: ring})),
        Case("ring-len-huge-in-place", over=lengths_at({i: INT32_MAX})),
        Case("ring-len-int32-min-in-place", over=lengths_at({i: -(2**31)})),
        # destinations out of order: a valid call
        Case("non-monotonic", None, bounds, rows(spec.write, r, free), rows(spec.write, r, free)),
        Case("non-monotonic-overlapping", over=rows(spec.read, r, dst[-1])),
        Case("one-destination-twice", over=rows(spec.write, i, dst[r])),
    ]


def _tensor(value: Any, device: str) -> Any:
    if isinstance(value, list):
        return torch.tensor(value, dtype=torch.int32, device=device)
    return value


def _build(op: str, device: str, full: bool, case: Case, offsets: list[int] | None,
           over: dict[str, Any]) -> Seqs:
    lengths = FULL_LENGTHS if full else LENGTHS
    seqs = MAKE[op](lengths, device, full=full, **{k: _tensor(v, "cpu") for k, v in over.items()})
    if offsets is not None and op in OFFSETS:
        seqs.call[OFFSETS[op]] = torch.tensor(offsets, dtype=torch.int32, device=device)
    return seqs


class Guarded:
    """The state (every member of a row), the output and the per-token inputs of a call moved
    into the middle of NaN-filled buffers (an integer member: int's maximum), ``GUARD``
    slots or tokens wider on each side; a ring also ``GUARD`` entries wider on each side."""

    def __init__(self, seqs: Seqs) -> None:
        self.seqs, self.call, self.buffers = seqs, seqs.call, []
        axes = {name: (0,) for name in seqs.members(seqs.call)}
        axes.update({name: (0, 1) for name in seqs.ring})
        axes.update({name: (axis,) for name, axis in seqs.inputs.items()})
        if seqs.out is not None:
            axes[seqs.out] = (seqs.out_axis,)
        for name, dims in axes.items():
            t = self.call[name].contiguous()  # ties (stride 0) become plain tensors
            shape = list(t.shape)
            for axis in dims:
                shape[axis] += 2 * GUARD
            fill = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max
            big = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            inside = torch.zeros(shape, dtype=torch.bool, device=t.device)
            middle, mark = big, inside
            for axis in dims:
                middle = middle.narrow(axis, GUARD, t.shape[axis])
                mark = mark.narrow(axis, GUARD, t.shape[axis])
            middle.copy_(t)
            mark.fill_(True)
            self.call[name] = middle
            self.buffers.append((name, big, inside))
        self.before = [big.clone() for _, big, _ in self.buffers]

    def touched_outside(self) -> list[str]:
        bad = []
        for (name, big, inside), before in zip(self.buffers, self.before, strict=True):
            now, was = big[~inside], before[~inside]
            if not torch.equal(now.view(torch.uint8), was.view(torch.uint8)):
                bad.append(name)
        return sorted(set(bad))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _close(got: torch.Tensor, want: torch.Tensor, full: bool) -> None:
    """Agreement within the precision of the call: at Mamba2 size (bf16, chunked products)
    against the scale of the result, as the full-size chunk-scan tests compare."""
    got, want = got.float(), want.float()
    assert got.isnan().equal(want.isnan()), "NaN in different places"
    got, want = got.nan_to_num(), want.nan_to_num()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= (2e-2 * scale + 1e-3 if full else 1e-4 * scale + 1e-4), err


def run_case(op: str, provider: str, case: Case, device: str = "cpu",
             full: bool = False) -> str | None:
    """What went wrong in one case, or None."""
    seqs = _build(op, device, full, case, case.offsets, case.over)
    guarded = Guarded(seqs)
    try:
        out = seqs.run(provider, guarded.call)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # an unchecked call must not raise either
        return f"raised {type(exc).__name__}: {exc}"
    touched = guarded.touched_outside()
    if touched:
        return f"wrote outside {touched}"
    if case.equivalent is None:
        return None
    over = case.equivalent_over or case.over
    want = _build(op, device, full, case, case.equivalent, over)
    # rows the case holds other values in than the equivalent call (a ring length outside
    # the ring): compared only where the call writes them
    given = _build(op, device, full, case, case.offsets, case.over).call
    differ = {r for name in seqs.members(given) for r in range(given[name].shape[0])
              if not torch.equal(_bits(given[name][r]), _bits(want.call[name][r]))}
    _, written = touched_rows(op, want.call)
    keep = [r for r in range(given[seqs.state].shape[0]) if r not in differ - written]
    want_guarded = Guarded(want)
    want_out = want.run("native", want_guarded.call)
    # the tokens of the equivalent sequences (tokens of none have no defined output)
    tokens = slice(case.equivalent[0], case.equivalent[-1])
    axis = seqs.out_axis
    pairs = [(name, guarded.call[name][keep], want_guarded.call[name][keep])
             for name in seqs.members(guarded.call)]
    if out is not None:
        pairs.append(("output", out.narrow(axis, tokens.start, tokens.stop - tokens.start),
                      want_out.narrow(axis, tokens.start, tokens.stop - tokens.start)))
    for what, got, exp in pairs:
        try:
            _close(got, exp, full)
        except AssertionError as exc:
            return f"{what} differs from native on offsets {case.equivalent}: {exc}"
    return None


def main() -> None:
    ops, provider = sys.argv[1].split(","), sys.argv[2]
    device = "cuda" if "cuda" in sys.argv[3:] else "cpu"
    full = device == "cuda"
    lengths = FULL_LENGTHS if full else LENGTHS
    report = {f"{op} {c.name}": run_case(op, provider, c, device, full)
              for op in ops for c in cases(op, sum(lengths), lengths, full)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
