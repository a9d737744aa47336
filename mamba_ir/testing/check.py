"""Check a provider against the native op.

For one argument set, :func:`assert_matches_native` runs the native op and the provider
on identical copies and asserts that

- outputs and written state rows agree within the dtype tolerance table;
- every state row the call does not write is bit-identical afterwards (a source row
  under redirect included);
- nothing depends on rows the call does not address: those rows are poisoned with NaN
  before the run (every tensor of a row: a quantized state's scales too), so a provider
  that reads them produces NaN and fails;
- every output element is written: outputs start as NaN.

:func:`check_impl` drives that over hypothesis-generated argument sets, keeping those the
provider's predicate accepts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy

from ..op import IrOp, get_op
from .strategies import SMALL, Sizes, calls
from .tolerances import tolerance


def touched_rows(op: IrOp | str, call: dict[str, Any]) -> tuple[set[int], set[int]]:
    """The state rows (of every member of ``op.rows.state``) a valid bound call reads and
    writes, pads excluded: what the op's row spec says."""
    op = get_op(op) if isinstance(op, str) else op
    rows = op.rows_of(call)
    pad = call[op.rows.pad]
    return rows.read_rows(pad), rows.written_rows(pad)


def _clone(call: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, torch.Tensor) else v for k, v in call.items()}


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides: stride-0 ties stay ties, gaps and transposes stay."""
    base = t
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if stride == 0 and size > 1:
            base = base.narrow(dim, 0, 1)
    copy = torch.empty_strided(base.shape, base.stride(), dtype=t.dtype, device=t.device)
    return copy.copy_(base).expand(t.shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.reshape(-1))
    return flat.view(torch.uint8)


def _poison(t: torch.Tensor, idx: torch.Tensor) -> None:
    # NaN where a row can hold it; an integer row (a quantized state) is read through its
    # float scales, which are poisoned beside it
    t[idx] = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max


def assert_matches_native(op: IrOp | str, provider: str, call: dict[str, Any]) -> None:
    """Run native and ``provider`` on copies of ``call``; assert they agree (see module doc)."""
    op = get_op(op) if isinstance(op, str) else op
    spec = op.rows
    call = dict(call)
    for name, make in op.allocate.items():
        if call[name] is None:
            call[name] = make(call).fill_(float("nan"))
    op.check(call)
    read, written = touched_rows(op, call)
    members = spec.members(call)  # every tensor of a state row
    nslots = call[spec.primary].shape[0]
    device = call[spec.primary].device
    untouched = [r for r in range(nslots) if r not in read | written]
    if untouched:
        for name in members:
            _poison(call[name], torch.tensor(untouched, device=device))
    before = {name: call[name].clone() for name in members}

    ref, got = _clone(call), _clone(call)
    ref_out = op.native(**ref)
    got_out = op.impls[provider].fn(**got)

    atol, rtol = tolerance(
        *(v.dtype for v in call.values() if isinstance(v, torch.Tensor) and v.is_floating_point()),
        table=op.tolerances,
    )
    keep = sorted(set(range(nslots)) - written)
    for name in members:
        for what, result in ((f"{name} (rows not written)", got[name]), ("native", ref[name])):
            if keep:
                idx = torch.tensor(keep, device=device)
                assert torch.equal(_bits(result[idx]), _bits(before[name][idx])), (
                    f"{provider}: {what} changed"
                )
    if written:
        idx = torch.tensor(sorted(written), device=device)
        if spec.value is None:
            for name in members:
                _close(f"{name} (written rows)", got[name][idx], ref[name][idx], atol, rtol)
        else:  # rows compared as the values their members encode, within one step
            (got_v, got_step), (ref_v, ref_step) = (
                spec.value({n: None if c[n] is None else c[n][idx] for n in spec.states})
                for c in (got, ref)
            )
            allowed = atol + rtol * ref_v.abs() + torch.maximum(
                torch.as_tensor(got_step, device=device), torch.as_tensor(ref_step, device=device)
            )
            what = f"{' + '.join(members)} (written rows, as values)"
            assert not ref_v.isnan().any(), (
                f"native {what} has NaN: the strategy built an invalid call")
            err = (got_v - ref_v).abs()
            bad = ~(err <= allowed)
            assert not bad.any(), (
                f"{what}: {int(bad.sum())} of {bad.numel()} values differ by more than "
                f"atol + rtol |native| + one step; worst {float(err[bad].max()):.3g} "
                f"at {tuple(int(i) for i in bad.nonzero()[0])}"
            )
    for name in op.allocate:
        _close(name, got[name], ref[name], atol, rtol)
    if isinstance(ref_out, torch.Tensor):
        _close("output", got_out, ref_out, atol, rtol)


def _close(what: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    assert not ref.isnan().any(), f"native {what} has NaN: the strategy built an invalid call"
    torch.testing.assert_close(
        got.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def check_impl(
    op: IrOp | str,
    provider: str,
    *,
    device: str = "cpu",
    sizes: Sizes = SMALL,
    max_examples: int = 50,
    min_accepted: int = 1,
    strategy: SearchStrategy[dict[str, Any]] | None = None,
) -> int:
    """Check ``provider`` against native on hypothesis argument sets its predicate accepts.

    ``strategy`` replaces the op's default argument sets (``calls(op, device, sizes)``),
    e.g. to pin the shapes of a provider that compiles a kernel per shape. Returns how
    many examples the provider accepted; fails if fewer than ``min_accepted``.
    """
    op = get_op(op) if isinstance(op, str) else op
    if provider not in op.impls:
        raise ValueError(f"provider: {provider!r} is not registered for {op.name} "
                         f"(registered: {', '.join(op.impls)})")
    impl = op.impls[provider]
    accepted = 0
    refusals: Counter[str] = Counter()

    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
    )
    @given(strategy if strategy is not None else calls(op.name, device=device, sizes=sizes))
    def run(call: dict[str, Any]) -> None:
        nonlocal accepted
        full = op.bind(**call)
        refusal = impl.refusal(full)
        if refusal is not None:
            refusals[refusal] += 1
        assume(refusal is None)
        accepted += 1
        assert_matches_native(op, provider, full)

    def refused() -> str:
        return "; ".join(f"{why!r} x{n}" for why, n in refusals.most_common(3))

    try:
        run()
    except Unsatisfiable as exc:  # the predicate refused every call drawn
        raise AssertionError(f"{provider} accepted none of the {op.name} calls drawn on "
                             f"{device}; it refused with {refused()}") from exc
    assert accepted >= min_accepted, (
        f"{provider} accepted {accepted} of {max_examples} examples; it refused with {refused()}")
    return accepted
