"""How a call is laid out, in words: what a failure message shows so that its reader can
rebuild the call (shapes, dtypes, strides, offsets, views, stride-0 ties, index values,
rows)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..op import IrOp, get_op

MAX_VALUES = 32  # index tensors of at most this many elements are shown with their values


def describe_tensor(t: torch.Tensor, *, max_values: int = MAX_VALUES) -> str:
    """One tensor's layout: shape, dtype, device, strides, storage offset, whether it is a
    view into a larger buffer, its stride-0 dims; an integer or bool tensor of at most
    ``max_values`` elements also shows its values."""
    dtype = str(t.dtype).removeprefix("torch.")
    parts = [f"{tuple(t.shape)} {dtype} on {t.device}", f"strides {tuple(t.stride())}",
             f"offset {t.storage_offset()}"]
    if not t.is_contiguous():
        parts.append("non-contiguous")
    tied = [d for d, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True))
            if s == 0 and n > 1]
    if tied:
        parts.append(f"stride 0 in dim{'s' if len(tied) > 1 else ''} "
                     f"{', '.join(map(str, tied))} (one value broadcast)")
    if t.device.type != "meta":
        # elements the tensor can reach, ties counted once, against what its storage holds
        distinct = math.prod(n for n, s in zip(t.shape, t.stride(), strict=True) if s != 0)
        held = t.untyped_storage().nbytes() // t.element_size()
        if t.numel() and held > distinct:
            parts.append(f"a view into a buffer of {held} elements")
        if not t.is_floating_point() and t.numel() <= max_values:
            parts.append(f"values {t.tolist()}")
    return ", ".join(parts)


def describe_call(call: dict[str, Any], op: IrOp | str | None = None) -> str:
    """A bound call, one argument a line (tensors by :func:`describe_tensor`, other
    arguments by value), then, for an op with a row spec, the rows the call reads, writes
    and leaves alone. Reusable wherever a call must be named in a message."""
    op = get_op(op) if isinstance(op, str) else op
    width = max((len(name) for name in call), default=0)
    lines = []
    for name, value in call.items():
        shown = describe_tensor(value) if isinstance(value, torch.Tensor) else repr(value)
        lines.append(f"  {name:<{width}} : {shown}")
    if op is not None and op.rows is not None:
        lines.append(f"  {_rows_line(op, call)}")
    head = f"{op.name} call:" if op is not None else "call:"
    return "\n".join([head, *lines])


def _rows_line(op: IrOp, call: dict[str, Any]) -> str:
    spec = op.rows
    try:
        rows = op.rows_of(call)
        pad = call[spec.pad]
        read, written = rows.read_rows(pad), rows.written_rows(pad)
        slots = call[spec.primary].shape[0]
    except Exception as exc:  # an invalid call still gets its arguments described
        return f"rows: not computable ({type(exc).__name__}: {exc})"
    alone = sorted(set(range(slots)) - read - written)
    names = " / ".join(spec.members(call))
    return (f"rows of {names} ({slots} slots, {spec.pad}={pad}): reads {sorted(read)}, "
            f"writes {sorted(written)}, does not address {alone}")
