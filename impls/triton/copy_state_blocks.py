"""Triton copy_state_blocks: ``state[dst[i]] = state[src[i]]``, a memory-bound row copy.

Rows whose elements are contiguous are copied as flat runs of the widest integer word that
divides them, whatever the state's dtype, so every load and store is a 16-byte vector.
Other layouts (a strided view of a larger cache) go through an index decomposition over
up to four inner dimensions.

One pass reads each source row and writes its destination row. That equals the op's
gather-then-scatter for every call the op's check admits: no entry reads a row another
entry writes, so no read can observe an earlier write.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mamba_ir.ops.copy_state_blocks import copy_state_blocks as _op

from ._common import call_kernel, register, runnable, triton

if triton is not None:
    from ._copy_kernel import copy_rows_kernel

_WORDS = (torch.int32, torch.int16, torch.int8)
_SAME_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BLOCK = 4096  # words per program: 16 KiB in flight per program for int32 words


def _rows_contiguous(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _flat_words(state: torch.Tensor) -> torch.Tensor | None:
    """The state as (slots, words) in the widest integer word its rows allow, or None."""
    row_len = math.prod(state.shape[1:]) if state.shape[0] else 0
    flat = state.as_strided((state.shape[0], row_len), (state.stride(0), 1))
    for word in _WORDS:
        try:
            return flat.view(word)
        except RuntimeError:  # row length, row stride or offset not a multiple of the word
            continue
    return None


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    for name in _op.rows.members(call):
        state = call[name]
        if not _rows_contiguous(state) and state.element_size() not in _SAME_SIZE:
            return (f"{name}: {state.dtype} rows with gaps: only 1/2/4/8-byte elements in "
                    "strided rows")
    return True


def launch(call: dict[str, Any], *, block: int = BLOCK, num_warps: int | None = None) -> None:
    """Run the kernel on a bound call, once per tensor of a state row (a state's scales
    are a small second copy); ``block`` (words per program) and ``num_warps`` are for
    tuning."""
    for name in _op.rows.members(call):
        _copy_rows(call[name], call, block, num_warps)


def _copy_rows(
    state: torch.Tensor, call: dict[str, Any], block: int, num_warps: int | None
) -> None:
    src, dst = call["src"], call["dst"]
    if src.shape[0] == 0 or state.numel() == 0:
        return
    words = _flat_words(state) if _rows_contiguous(state) else None
    if words is not None:
        view, inner, inner_strides, flat = words, (1, 1, 1), (0, 0, 0, 1), True
    else:
        view = state.view(_SAME_SIZE[state.element_size()])
        inner = (*(1,) * (5 - state.dim()), *view.shape[1:])[-3:]
        inner_strides = (*(0,) * (5 - state.dim()), *view.stride()[1:])[-4:]
        flat = False
    row_len = math.prod(view.shape[1:])
    block = min(block, triton.next_power_of_2(row_len))
    nchunks = triton.cdiv(row_len, block)
    call_kernel(copy_rows_kernel, (src.shape[0] * nchunks,),
        state_ptr=view, src_ptr=src, dst_ptr=dst, pad_slot_id=call["pad_slot_id"],
        nslots=state.shape[0], row_len=row_len, nchunks=nchunks,
        s_row=view.stride(0), s_src=src.stride(0), s_dst=dst.stride(0),
        inner=inner, s_inner=inner_strides,
        BLOCK=block, FLAT=flat, num_warps=num_warps or max(1, min(8, block // 512)),
    )


copy_state_blocks = register(_op, launch, supports)
