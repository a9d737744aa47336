"""Check a provider against the native op.

For one argument set, :func:`assert_matches_native` runs the native op and the provider
on identical copies and asserts that

- outputs and written state rows agree within the tolerance of the dtype each is stored
  in (``tolerances.py``): the ops promise float32 arithmetic, so a float32 result that
  only agrees to 16-bit precision fails, and says it looks like reduced precision;
- every state row the call does not write is bit-identical afterwards (a source row
  under redirect included);
- nothing depends on rows the call does not address: those rows are poisoned with NaN
  before the run, so a provider that reads them produces NaN and fails;
- every output element is written: outputs start as NaN.

A failure names the op, the provider, the result that disagreed, the errors and where, and
the call's layout (:func:`describe_call`); a NaN is traced to the unaddressed row it came
from, or to output elements left unwritten.

:func:`check_impl` drives that over hypothesis-generated argument sets, keeping those the
provider's predicate accepts.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as Settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy

from ..op import IrOp, get_op
from .describe import describe_call
from .strategies import SMALL, Sizes, calls
from .tolerances import result_tolerance

# What a row of the state may not be, to be filled with when the call does not address it
POISON = float("nan")
# Unwritten output elements hold this after a run whose outputs start as it: exact in
# every float dtype, and no result the strategies' values make
UNWRITTEN = 1024.0
# The narrower dtypes a float32 (or float16) result's errors are measured against
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Unaddressed rows poisoned one at a time to find the one a provider read
MAX_SUSPECTS = 64


def touched_rows(op: IrOp | str, call: dict[str, Any]) -> tuple[set[int], set[int]]:
    """The state rows (of the tensors ``op.rows`` names) a valid bound call reads and
    writes, pads excluded: what the op's row spec says."""
    op = _as_op(op)
    rows = op.rows_of(call)
    pad = call[op.rows.pad]
    return rows.read_rows(pad), rows.written_rows(pad)


def _as_op(op: IrOp | str) -> IrOp:
    return get_op(op) if isinstance(op, str) else op


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
    """Each element's bytes, one row each: compared as bits, NaN equals itself."""
    flat = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return flat.reshape(-1, 1).view(torch.uint8)


def _at(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, index)) + ")"


def _unravel(flat: int, shape: torch.Size, rows: list[int] | None) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    index.reverse()
    if rows is not None:  # the result holds the listed rows of a state: name the row
        index[0] = rows[index[0]]
    return tuple(index)


@dataclass(frozen=True)
class _Rows:
    """The rows of the state tensors (every member of ``op.rows.state`` the call passes) one
    call reads, writes and
    leaves alone, and the values the unaddressed ones held before they were poisoned."""

    tensors: tuple[str, ...]
    pad: int
    read: frozenset[int]
    written: tuple[int, ...]
    unwritten: list[int]
    unaddressed: tuple[int, ...]
    original: dict[str, torch.Tensor]  # per tensor, its unaddressed rows as they were

    @classmethod
    def of(cls, op: IrOp, call: dict[str, Any]) -> _Rows:
        if op.rows is None:
            return cls((), 0, frozenset(), (), [], (), {})
        read, written = touched_rows(op, call)
        tensors = op.rows.members(call)
        slots = range(call[tensors[0]].shape[0])
        alone = tuple(r for r in slots if r not in read | written)
        original = {name: call[name][list(alone)].clone() for name in tensors}
        return cls(tensors, call[op.rows.pad], frozenset(read), tuple(sorted(written)),
                   [r for r in slots if r not in written], alone, original)

    def poison(self, call: dict[str, Any], rows: tuple[int, ...] | None = None) -> None:
        """NaN into ``rows`` (default: every unaddressed row) of each state tensor, the
        other unaddressed rows back to their values."""
        if not self.unaddressed:
            return
        rows = self.unaddressed if rows is None else rows
        for name in self.tensors:
            state = call[name]
            state[list(self.unaddressed)] = self.original[name]
            if rows:  # an integer member (a quantized state) is read through its float scales
                state[list(rows)] = (POISON if state.is_floating_point()
                                     else torch.iinfo(state.dtype).max)

    def role(self, row: int, pad_name: str) -> str:
        """What ``row`` is to the call, for a message."""
        if row in self.read:
            return "a source row the call reads"
        if row == self.pad:
            return f"the pad row, {pad_name}={self.pad}"
        return "a row the call does not address, NaN before the call"


@dataclass(frozen=True)
class _Result:
    """One result compared with native: a state's written rows, an output, the return."""

    label: str
    take: Callable[[dict[str, Any], Any], torch.Tensor]  # from a run's call and return
    rows: list[int] | None = None  # index 0 of ``take``'s tensor: these rows of a state
    # quantized rows: the step (per element) a correct provider may differ by, from a run
    step: Callable[[dict[str, Any]], Any] | None = None


def _results(op: IrOp, rows: _Rows, returned: Any) -> list[_Result]:
    out = []
    # a row of several tensors (a quantized state and its scales) compares as the values
    # its members encode; a row of one tensor compares that tensor
    value = op.rows.value if op.rows is not None and len(rows.tensors) > 1 else None
    if rows.written and value is not None:
        idx = list(rows.written)

        def members(c: dict[str, Any], i: list[int] = idx) -> dict[str, Any]:
            return {n: None if c[n] is None else c[n][i] for n in op.rows.states}

        out.append(_Result(f"{' + '.join(rows.tensors)} (written rows {idx}, as values)",
                           lambda c, _: value(members(c))[0], idx,
                           lambda c: value(members(c))[1]))
    for name in rows.tensors if value is None else ():
        if rows.written:
            idx = list(rows.written)
            out.append(_Result(f"{name} (written rows {idx})",
                               lambda c, _, n=name, i=idx: c[n][i], idx))
    out += [_Result(name, lambda c, _, n=name: c[n]) for name in op.allocate]
    if isinstance(returned, torch.Tensor):
        out.append(_Result("the returned tensor", lambda _, r: r))
    return out


def _run(fn: Callable[..., Any], call: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    run = _clone(call)
    return run, fn(**run)


@dataclass(frozen=True)
class _Gap:
    """How a result differs from native's."""

    bad: int
    total: int
    abs_err: float
    abs_at: tuple[int, ...]
    rel_err: float
    rel_at: tuple[int, ...]
    first_at: tuple[int, ...]
    got: float
    want: float
    nans: int  # elements NaN in the provider's result where native's are not
    nan_at: tuple[int, ...] | None


def _gap(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float,
         rows: list[int] | None, step: Any = 0.0) -> _Gap | None:
    g32, r32 = got.float(), ref.float()
    # isclose, with a per-element allowance of one quantization step on top of atol
    close = ((g32 - r32).abs() <= atol + step + rtol * r32.abs()) | (g32 == r32)
    if bool(close.all()):
        return None
    # where it fails: on the tensors' device, in float64 so the errors are exact
    g, r = got.double().reshape(-1), ref.double().reshape(-1)
    far = ~close.reshape(-1)
    diff = (g - r).abs()
    finite = torch.where(diff.isfinite(), diff, torch.zeros_like(diff))
    rel = (finite / r.abs()).nan_to_num(nan=0.0, posinf=0.0)
    nan = g.isnan() & ~r.isnan()
    first = int(far.nonzero()[0])

    def at(flat: torch.Tensor | int) -> tuple[int, ...]:
        return _unravel(int(flat), got.shape, rows)

    return _Gap(
        bad=int(far.sum()), total=g.numel(),
        abs_err=float(finite.max()), abs_at=at(finite.argmax()),
        rel_err=float(rel.max()), rel_at=at(rel.argmax()),
        first_at=at(first), got=float(g[first]), want=float(r[first]),
        nans=int(nan.sum()), nan_at=at(nan.nonzero()[0]) if bool(nan.any()) else None,
    )


def _describe_gap(label: str, gap: _Gap, atol: float, rtol: float) -> str:
    lines = [
        f"{label}: {gap.bad} of {gap.total} elements differ from native by more than "
        f"atol {atol:g} + rtol {rtol:g} * |native|; first at {_at(gap.first_at)} "
        f"(provider {gap.got:.8g}, native {gap.want:.8g})",
    ]
    if gap.nans < gap.bad:
        lines.append(f"max abs error {gap.abs_err:.3g} at {_at(gap.abs_at)}; "
                     f"max rel error {gap.rel_err:.3g} at {_at(gap.rel_at)}")
    if gap.nans:
        lines.append(f"{gap.nans} elements are NaN where native's are not, first at "
                     f"{_at(gap.nan_at)}")
    return "\n".join(lines)


def _reduced_precision(op: IrOp, got: torch.Tensor, ref: torch.Tensor,
                       tol: tuple[float, float]) -> str | None:
    """Why a result that misses its tolerance looks computed in 16 bits: it meets the
    tolerance of a 16-bit dtype narrower than the one it is held to."""
    for narrow in SIXTEEN_BIT:
        if narrow == ref.dtype:
            continue
        atol, rtol = result_tolerance(narrow, (), op)
        if (atol <= tol[0] and rtol <= tol[1]) or _gap(got, ref, atol, rtol, None) is not None:
            continue
        stored, name = (str(d).removeprefix("torch.") for d in (ref.dtype, narrow))
        return (
            f"computed at reduced precision: this {stored} result agrees with native only "
            f"to 16-bit precision (it meets {name}'s tolerance, atol {atol:g}, rtol {rtol:g}, "
            f"not {stored}'s). {op.name} promises float32 arithmetic whatever the storage "
            "dtype (docs/ops.md, Conventions): the provider seems to round inputs or "
            "intermediate values to float16 or bfloat16"
        )
    return None


def _nan_source(op: IrOp, provider: str, call: dict[str, Any], rows: _Rows,
                result: _Result, ref: torch.Tensor) -> str:
    """Where a NaN in the provider's ``result`` comes from: an unaddressed row it read
    (each poisoned alone), output elements it left unwritten, or its own arithmetic."""
    fn = op.impls[provider].fn

    def nan_in(trial: dict[str, Any]) -> bool:
        got = result.take(*_run(fn, trial))
        return bool((got.isnan() & ~ref.isnan()).any())

    trial = _clone(call)
    rows.poison(trial, ())
    if rows.unaddressed and not nan_in(trial):  # the NaN came from a poisoned row
        leaking = []
        for row in rows.unaddressed[:MAX_SUSPECTS]:
            rows.poison(trial, (row,))
            if nan_in(trial):
                leaking.append(row)
        if not leaking:
            return (f"the NaN comes from the rows the call does not address "
                    f"({', '.join(map(str, rows.unaddressed))}), but from none alone")
        names = " / ".join(rows.tensors)
        return (f"read a row the call does not address: {names} row "
                f"{', '.join(map(str, leaking))} (NaN before the call; with only row "
                f"{leaking[0]} NaN, {result.label} still gets NaN)")
    outputs = [n for n in op.allocate if call[n] is not None and bool(call[n].isnan().all())]
    if result.rows is None and outputs:
        for name in outputs:
            trial[name].fill_(UNWRITTEN)
        run, returned = _run(fn, trial)
        got = result.take(run, returned)
        unwritten = (got == UNWRITTEN) & (ref != UNWRITTEN)
        if bool(unwritten.any()):
            first = _unravel(int(unwritten.reshape(-1).nonzero()[0]), got.shape, None)
            return (f"left {int(unwritten.sum())} elements of {result.label} unwritten, "
                    f"first at {_at(first)} (outputs start as NaN)")
    return "computed NaN where native does not, from the addressed rows alone"


def assert_matches_native(op: IrOp | str, provider: str, call: dict[str, Any]) -> None:
    """Run native and ``provider`` on copies of ``call`` (arguments by name, defaults may be
    left out); assert they agree (see module doc). The AssertionError names what disagreed
    and shows the call (:func:`describe_call`)."""
    op = _as_op(op)
    call = op.bind(**call)
    for name, make in op.allocate.items():
        if call[name] is None:
            call[name] = make(call).fill_(POISON)
    op.check(call)
    rows = _Rows.of(op, call)
    rows.poison(call)
    before = {name: call[name].clone() for name in rows.tensors}

    def fail(finding: str) -> NoReturn:
        raise AssertionError(f"{op.name}, provider {provider!r}: {finding}\n"
                             f"{describe_call(call, op)}")

    ref, ref_out = _run(op.native, call)
    try:
        got, got_out = _run(op.impls[provider].fn, call)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"raised by provider {provider!r} on this\n{describe_call(call, op)}")
        raise

    for name in rows.tensors:
        for who, after in (("native", ref[name]), (provider, got[name])):
            changed = _changed_rows(before[name], after, rows.unwritten)
            if not changed:
                continue
            row, count, where = changed
            if who == "native":
                fail(f"native changed {name} row {row}, which the op's row spec says the "
                     "call does not write: the row spec (RowSpec.rows) and the native op "
                     "disagree")
            fail(f"changed {name} row {row}, which the call does not write "
                 f"({rows.role(row, op.rows.pad)}): {count} of {before[name][row].numel()} "
                 f"elements differ, first at {_at((row, *where))} "
                 f"(before {_value(before[name][row][where])}, "
                 f"after {_value(after[row][where])})")

    inputs = [v.dtype for k, v in call.items() if isinstance(v, torch.Tensor)
              and v.is_floating_point() and k not in op.mutates_args]
    for result in _results(op, rows, ref_out):
        want, have = result.take(ref, ref_out), result.take(got, got_out)
        if bool(want.isnan().any()):
            fail(f"native's {result.label} has NaN: the strategy built an invalid call")
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            shown = tuple(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            fail(f"{result.label}: got {shown}, native gives shape {tuple(want.shape)}")
        atol, rtol = result_tolerance(want.dtype, inputs, op)
        step = 0.0
        if result.step is not None:  # quantized: either neighbour of the exact value
            step = torch.maximum(torch.as_tensor(result.step(ref)),
                                 torch.as_tensor(result.step(got)))
        gap = _gap(have, want, atol, rtol, result.rows, step)
        if gap is None:
            continue
        finding = _describe_gap(result.label, gap, atol, rtol)
        if result.step is not None:
            finding += " (plus one quantization step)"
        if gap.nans:
            finding += "\n" + _nan_source(op, provider, call, rows, result, want)
        elif result.step is None and (
            note := _reduced_precision(op, have, want, (atol, rtol))
        ) is not None:
            finding += "\n" + note
        fail(finding)


def _value(x: torch.Tensor) -> str:
    """One element for a message; a NaN with its bits, since NaNs differ only in those."""
    value = float(x)
    if value == value:
        return f"{value:.8g}"
    bits = int.from_bytes(bytes(_bits(x).reshape(-1).tolist()), sys.byteorder)
    return f"nan, bits 0x{bits:0{2 * x.element_size()}x}"


def _changed_rows(before: torch.Tensor, after: torch.Tensor, rows: list[int]
                  ) -> tuple[int, int, tuple[int, ...]] | None:
    """The first of ``rows`` whose bits changed: (row, elements changed, first index in it)."""
    if not rows:
        return None
    differs = (_bits(before[rows]) != _bits(after[rows])).any(1).reshape(len(rows), -1)
    if not bool(differs.any()):
        return None
    which = int(differs.any(1).nonzero()[0])
    where = _unravel(int(differs[which].nonzero()[0]), before.shape[1:], None)
    return rows[which], int(differs[which].sum()), where


def check_impl(
    op: IrOp | str,
    provider: str,
    *,
    device: str = "cpu",
    sizes: Sizes = SMALL,
    max_examples: int | None = None,
    min_accepted: int = 1,
    strategy: SearchStrategy[dict[str, Any]] | None = None,
    settings: Settings | None = None,
) -> int:
    """Check ``provider`` against native on hypothesis argument sets its predicate accepts.

    ``strategy`` replaces the op's default argument sets (``calls(op, device, sizes)``),
    e.g. to pin the shapes of a provider that compiles a kernel per shape. Runs under
    ``settings`` when given (``max_examples``, when also given, overrides its count);
    else under the current hypothesis profile with ``max_examples`` (default 50), no
    deadline (a kernel's first call compiles it, and the Triton interpreter takes seconds
    a call) and the ``too_slow`` and ``filter_too_much`` health checks off (drawing the
    first call may initialise CUDA; the predicate filters). Returns how many examples the
    provider accepted; fails if fewer than ``min_accepted``.
    """
    op = _as_op(op)
    if provider not in op.impls:
        raise ValueError(f"provider: {provider!r} is not registered for {op.name} "
                         f"(registered: {', '.join(op.impls)})")
    if settings is None:
        settings = Settings(
            max_examples=50 if max_examples is None else max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
        )
    elif max_examples is not None:
        settings = Settings(settings, max_examples=max_examples)
    impl = op.impls[provider]
    accepted = 0
    refusals: Counter[str] = Counter()

    @settings
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
        f"{provider} accepted {accepted} of {settings.max_examples} examples; it refused "
        f"with {refused()}")
    return accepted
