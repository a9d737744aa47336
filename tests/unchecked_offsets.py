"""Unchecked sequence offsets, driven through a provider's function (what a graph compiled
with the passes calls, without the op's value checks).

Every case puts the state, the output and the per-token inputs in the middle of larger
buffers filled with NaN, runs the provider and reports what went wrong: a write outside
the tensors (the buffers around them changed), an exception, or, where the clamped
offsets still describe sequences that do not overlap (``equivalent``), a result other
than native's on those offsets (a read outside the tensors brings NaN in).

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
from nonfinite_calls import BUILDERS, Seqs, conv_update

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


@dataclass(frozen=True)
class Case:
    name: str
    offsets: list[int] | None = None  # the offset tensor's values (None: the valid ones)
    # valid offsets that the clamped ones are the same sequences as (None: they overlap,
    # the result is not defined: only the buffers around the tensors are checked)
    equivalent: list[int] | None = None
    over: dict[str, Any] = field(default_factory=dict)  # other arguments, as lists
    equivalent_over: dict[str, Any] = field(default_factory=dict)


def cases(op: str, ntok: int, lengths: list[int], full: bool = False) -> list[Case]:
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


def _tensor(value: Any, device: str) -> Any:
    if isinstance(value, list):
        return torch.tensor(value, dtype=torch.int32, device=device)
    return value


def _build(op: str, device: str, full: bool, case: Case, offsets: list[int] | None,
           over: dict[str, Any]) -> Seqs:
    lengths = FULL_LENGTHS if full else LENGTHS
    make = conv_update if op == "causal_conv1d_update" else BUILDERS[op]
    seqs = make(lengths, device, full=full, **{k: _tensor(v, "cpu") for k, v in over.items()})
    if offsets is not None:
        seqs.call[OFFSETS[op]] = torch.tensor(offsets, dtype=torch.int32, device=device)
    return seqs


class Guarded:
    """The state, the output and the per-token inputs of a call moved into the middle of
    NaN-filled buffers, ``GUARD`` slots or tokens wider on each side."""

    def __init__(self, seqs: Seqs) -> None:
        self.seqs, self.call, self.buffers = seqs, seqs.call, []
        axes = {seqs.state: 0, **seqs.inputs}
        if seqs.out is not None:
            axes[seqs.out] = seqs.out_axis
        for name, axis in axes.items():
            t = self.call[name].contiguous()  # ties (stride 0) become plain tensors
            shape = list(t.shape)
            shape[axis] += 2 * GUARD
            big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
            middle = big.narrow(axis, GUARD, t.shape[axis])
            middle.copy_(t)
            self.call[name] = middle
            self.buffers.append((name, big, axis, t.shape[axis]))
        self.before = [big.clone() for _, big, _, _ in self.buffers]

    def touched_outside(self) -> list[str]:
        bad = []
        for (name, big, axis, size), before in zip(self.buffers, self.before, strict=True):
            for lo, n in ((0, GUARD), (GUARD + size, GUARD)):
                now, was = big.narrow(axis, lo, n), before.narrow(axis, lo, n)
                if not torch.equal(now.contiguous().view(torch.uint8),
                                   was.contiguous().view(torch.uint8)):
                    bad.append(name)
        return sorted(set(bad))


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
    want_guarded = Guarded(want)
    want_out = want.run("native", want_guarded.call)
    # the tokens of the equivalent sequences (tokens of none have no defined output)
    tokens = slice(case.equivalent[0], case.equivalent[-1])
    axis = seqs.out_axis
    pairs = [("state", guarded.call[seqs.state], want_guarded.call[want.state]),
             ("output", out.narrow(axis, tokens.start, tokens.stop - tokens.start),
              want_out.narrow(axis, tokens.start, tokens.stop - tokens.start))]
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
