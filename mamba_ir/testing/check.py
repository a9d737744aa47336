"""Check a provider against the native op.

For one argument set, :func:`assert_matches_native` runs the native op and the provider
on identical copies and asserts that

- outputs and written state rows agree within the dtype tolerance table;
- every state row the call does not write is bit-identical afterwards (a source row
  under redirect included);
- nothing depends on rows the call does not address: those rows are poisoned with NaN
  before the run, so a provider that reads them produces NaN and fails;
- every output element is written: outputs start as NaN.

:func:`check_impl` drives that over hypothesis-generated argument sets, keeping those the
provider's predicate accepts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy

from ..op import IrOp, get_op
from ..ops._tokens import token_layout
from .strategies import SMALL, Sizes, calls
from .tolerances import tolerance

Rows = tuple[set[int], set[int]]


def _ssu_rows(call: dict[str, Any]) -> Rows:
    x, state = call["x"], call["state"]
    lead = x.shape[: x.dim() - (state.dim() - 2)]
    seq = token_layout(lead, call["cu_seqlens"], x.device)
    nacc = call["num_accepted_tokens"]
    src, dst = seq.rows(call["state_batch_indices"], call["dst_state_batch_indices"], nacc)
    written = set()
    for rows, n in zip(dst.tolist(), seq.lengths.tolist(), strict=True):
        written.update(rows[:n] if nacc is not None else rows[:1] if n > 0 else [])
    return _real(set(src.tolist()), call), _real(written, call)


def _real(rows: set[int], call: dict[str, Any]) -> set[int]:
    return rows - {call["pad_slot_id"]}


def _conv_rows(dst: Any, src: Any, lengths: list[int], reads: list[bool]) -> Rows:
    # index tensors may be longer than the sequences: the tail is ignored
    n = len(lengths)
    dst = list(range(n)) if dst is None else dst.tolist()[:n]
    src = dst if src is None else src.tolist()[:n]
    reads = reads[:n]
    read = {s for s, r in zip(src, reads, strict=True) if r}
    return read, {d for d, n in zip(dst, lengths, strict=True) if n > 0}


def _conv_fn_rows(call: dict[str, Any]) -> Rows:
    qsl = call["query_start_loc"]
    lengths = (qsl[1:] - qsl[:-1]).tolist()
    init = call["has_initial_state"]
    reads = [False] * len(lengths) if init is None else init.tolist()
    read, written = _conv_rows(call["cache_indices"], call["src_cache_indices"], lengths, reads)
    return _real(read, call), _real(written, call)


def _conv_update_rows(call: dict[str, Any]) -> Rows:
    x = call["x"]
    lead = (x.shape[0], x.shape[2]) if x.dim() == 3 else (x.shape[0],)
    lengths = token_layout(lead, call["query_start_loc"], x.device).lengths.tolist()
    src = call["src_conv_state_indices"]
    src = call["conv_state_indices"] if src is None else src
    read, written = _conv_rows(call["conv_state_indices"], src, lengths, [True] * len(lengths))
    return _real(read, call), _real(written, call)


def _copy_rows(call: dict[str, Any]) -> Rows:
    pad = call["pad_slot_id"]
    pairs = [
        (s, d)
        for s, d in zip(call["src"].tolist(), call["dst"].tolist(), strict=True)
        if s != pad and d != pad
    ]
    return {s for s, _ in pairs}, {d for _, d in pairs}


def _chunk_scan_rows(call: dict[str, Any]) -> Rows:
    from ..ops._rows import checkpoint_columns

    seq = token_layout(call["x"].shape[:1], call["cu_seqlens"], call["x"].device)
    src, dst = seq.rows(call["state_batch_indices"], call["dst_state_batch_indices"], None)
    written = {d for d, n in zip(dst[:, 0].tolist(), seq.lengths.tolist(), strict=True) if n > 0}
    if call["block_size"]:
        used = checkpoint_columns(seq.lengths, call["num_computed_tokens"], call["block_size"])
        ckpt = call["checkpoint_state_indices"][: seq.count]  # the tail is ignored
        for cols, k in zip(ckpt.tolist(), used.tolist(), strict=True):
            written.update(cols[:k])
    return _real(set(src.tolist()), call), _real(written, call)


# Which argument holds the state rows, and which rows a call reads and writes.
STATE_ROWS: dict[str, tuple[str, Callable[[dict[str, Any]], Rows]]] = {
    "selective_state_update": ("state", _ssu_rows),
    "causal_conv1d_fn": ("conv_states", _conv_fn_rows),
    "causal_conv1d_update": ("conv_state", _conv_update_rows),
    "copy_state_blocks": ("state", _copy_rows),
    "mamba_chunk_scan": ("state", _chunk_scan_rows),
}


def _selective_scan_rows(call: dict[str, Any]) -> Rows:
    from ..ops._rows import checkpoint_columns

    qsl = call["query_start_loc"]
    lengths, n = qsl[1:] - qsl[:-1], qsl.shape[0] - 1
    # per-sequence tensors may be longer than the sequences: the tail is ignored
    dst, src, init, done, ckpt = (
        None if call[k] is None else call[k][:n]
        for k in ("cache_indices", "src_cache_indices", "has_initial_state",
                  "num_computed_tokens", "checkpoint_state_indices")
    )
    reads = [False] * n if init is None else init.tolist()
    read, written = _conv_rows(dst, src, lengths.tolist(), reads)
    if call["block_size"]:
        used = checkpoint_columns(lengths.long(), done, call["block_size"])
        for cols, k in zip(ckpt.tolist(), used.tolist(), strict=True):
            written.update(cols[:k])
    return _real(read, call), _real(written, call)


STATE_ROWS["selective_scan"] = ("ssm_states", _selective_scan_rows)


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


def assert_matches_native(op: IrOp | str, provider: str, call: dict[str, Any]) -> None:
    """Run native and ``provider`` on copies of ``call``; assert they agree (see module doc)."""
    op = get_op(op) if isinstance(op, str) else op
    state_arg, rows_of = STATE_ROWS[op.name]
    call = dict(call)
    for name, make in op.allocate.items():
        if call[name] is None:
            call[name] = make(call).fill_(float("nan"))
    op.check(call)
    read, written = rows_of(call)
    state = call[state_arg]
    untouched = [r for r in range(state.shape[0]) if r not in read | written]
    if untouched:
        state[torch.tensor(untouched, device=state.device)] = float("nan")
    before = state.clone()

    ref, got = _clone(call), _clone(call)
    ref_out = op.native(**ref)
    got_out = op.impls[provider].fn(**got)

    atol, rtol = tolerance(
        *(v.dtype for v in call.values() if isinstance(v, torch.Tensor) and v.is_floating_point()),
        table=op.tolerances,
    )
    keep = sorted(set(range(state.shape[0])) - written)
    for name, result in (
        (f"{state_arg} (rows not written)", got[state_arg]),
        ("native", ref[state_arg]),
    ):
        if keep:
            idx = torch.tensor(keep, device=state.device)
            assert torch.equal(_bits(result[idx]), _bits(before[idx])), (
                f"{provider}: {name} changed"
            )
    if written:
        idx = torch.tensor(sorted(written), device=state.device)
        _close(f"{state_arg} (written rows)", got[state_arg][idx], ref[state_arg][idx], atol, rtol)
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
