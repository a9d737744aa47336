"""Argument validation shared by the ops: every failure names the argument and what was expected.

Metadata (shape, dtype, device, layout) is checked on every call, traced ones included.
Index *values* are checked only where they can be read without tracing, that is in eager
calls; all checks run before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(name: str, expected: str, got: object) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def tensor(
    call: dict[str, Any],
    name: str,
    *,
    shape: Sequence[int] | None = None,
    ndim: int | Iterable[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    optional: bool = False,
) -> torch.Tensor | None:
    """Check one tensor argument and return it (``None`` when optional and absent)."""
    t = call[name]
    if t is None:
        if not optional:
            fail(name, "a tensor", "None")
        return None
    if not isinstance(t, torch.Tensor):
        fail(name, "a tensor", type(t).__name__)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(name, f"{' or '.join(map(str, allowed))} dimensions", _describe(t))
    if shape is not None and tuple(t.shape) != tuple(shape):
        fail(name, f"shape {tuple(shape)}", _describe(t))
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(name, f"dtype in ({names})", _describe(t))
    if device is not None and t.device != device:
        fail(name, f"a tensor on {device}", _describe(t))
    return t


def index(
    call: dict[str, Any],
    name: str,
    *,
    ndim: int | Iterable[int] = 1,
    rows: int | None = None,
    device: torch.device | None = None,
    optional: bool = True,
) -> torch.Tensor | None:
    """Check an integer index tensor (int32 or int64) with ``rows`` entries along dim 0."""
    t = tensor(call, name, ndim=ndim, dtypes=INDEX_DTYPES, device=device, optional=optional)
    if t is not None and rows is not None and t.shape[0] != rows:
        fail(name, f"{rows} rows (one per sequence)", _describe(t))
    return t


def same_device(call: dict[str, Any], anchor: str) -> None:
    """Every tensor argument lies on the device of ``anchor``."""
    device = call[anchor].device
    for name, value in call.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            fail(name, f"a tensor on the device of {anchor} ({device})", _describe(value))


def writable(call: dict[str, Any], name: str) -> None:
    """A tensor written in place must not have overlapping (e.g. stride-0) elements."""
    t = call[name]
    if t.numel() and any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)):
        fail(name, "no stride-0 dimension (it is written in place)", f"strides {t.stride()}")


def values_readable(*tensors: torch.Tensor | None) -> bool:
    """True when index values can be read: an eager call on real tensors, not being captured
    into a CUDA graph (reading values would synchronise, which capture forbids)."""
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
            return False
    return True


def rows_in_range(name: str, values: torch.Tensor, nslots: int, pad: int) -> None:
    """Every entry is a row of the state (``0 <= i < nslots``) or the pad id."""
    bad = (values != pad) & ((values < 0) | (values >= nslots))
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        fail(name, f"rows in [0, {nslots}) or pad_slot_id={pad}", f"index {first}")


def disjoint_rows(
    src_name: str,
    sources: Sequence[int],
    dst_name: str,
    destinations: Sequence[Sequence[int]],
    pad: int,
) -> None:
    """Destination rows are distinct, and no entry reads a row another entry writes.

    ``sources[i]`` is the row entry ``i`` reads, ``destinations[i]`` the rows it writes.
    An entry may read one of its own destination rows (in-place update).
    """
    owner: dict[int, int] = {}
    for i, rows in enumerate(destinations):
        for r in rows:
            if r == pad:
                continue
            if r in owner:
                fail(dst_name, "distinct destination rows", f"row {r} written twice")
            owner[r] = i
    for i, r in enumerate(sources):
        if r != pad and owner.get(r, i) != i:
            fail(
                src_name,
                f"no source row that another entry writes (entry {owner[r]} writes it)",
                f"row {r} read by entry {i}",
            )


def cumulative(name: str, offsets: torch.Tensor, ntokens: int) -> None:
    """Sequence start offsets: begin at 0, never decrease, end at the ``ntokens`` tokens."""
    v = offsets.tolist()
    if not v or v[0] != 0 or any(b < a for a, b in zip(v, v[1:], strict=False)) or v[-1] != ntokens:
        fail(name, f"non-decreasing offsets from 0 to {ntokens} (the number of tokens)", v)


def activation(call: dict[str, Any], name: str = "activation") -> None:
    if call[name] not in (None, "silu", "swish"):
        fail(name, "None, 'silu' or 'swish'", repr(call[name]))


def dt_limit(call: dict[str, Any], name: str = "dt_limit") -> None:
    """``None``, or ``(lo, hi)`` floats with ``lo <= hi``: the clamp applied to the step size."""
    limit = call[name]
    if limit is None:
        return
    try:
        lo, hi = (float(v) for v in limit)
    except (TypeError, ValueError):
        fail(name, "None or two floats (lo, hi)", repr(limit))
    if not lo <= hi:
        fail(name, "lo <= hi", repr(tuple(limit)))
