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

from typing import Any

import torch

from mamba_ir.ops.copy_state_blocks import copy_state_blocks as _op

from ._common import runnable, tl, triton

_WORDS = (torch.int32, torch.int16, torch.int8)
_SAME_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BLOCK = 4096  # words per program: 16 KiB in flight per program for int32 words

if triton is not None:

    @triton.jit
    def _copy_rows_kernel(
        state_ptr, src_ptr, dst_ptr, pad_slot_id, nslots, row_len, nchunks,
        s_row, s_src, s_dst,
        n1, n2, n3, s0, s1, s2, s3,
        BLOCK: tl.constexpr, FLAT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        chunk = pid % nchunks
        entry = pid // nchunks
        src = tl.load(src_ptr + entry * s_src).to(tl.int64)
        dst = tl.load(dst_ptr + entry * s_dst).to(tl.int64)
        # pads are skipped; a row copied onto itself costs nothing; rows outside the state
        # (unchecked, compiled) are never touched
        ok = (src != pad_slot_id) & (dst != pad_slot_id) & (src != dst)
        ok = ok & (src >= 0) & (src < nslots) & (dst >= 0) & (dst < nslots)
        offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = tl.where(ok, offs < row_len, False)
        if FLAT:
            where = offs
        else:  # inner index (i0, i1, i2, i3) of a row with inner sizes (., n1, n2, n3)
            i3 = offs % n3
            rest = offs // n3
            i2 = rest % n2
            rest = rest // n2
            i1 = rest % n1
            i0 = rest // n1
            where = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
        vals = tl.load(state_ptr + src * s_row + where, mask=mask)
        tl.store(state_ptr + dst * s_row + where, vals, mask=mask)


def _rows_contiguous(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _flat_words(state: torch.Tensor) -> torch.Tensor | None:
    """The state as (slots, words) in the widest integer word its rows allow, or None."""
    row_len = state[0].numel() if state.shape[0] else 0
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
    state = call["state"]
    if not _rows_contiguous(state) and state.element_size() not in _SAME_SIZE:
        return f"{state.dtype} rows with gaps: only 1/2/4/8-byte elements in strided rows"
    return True


def copy_state_blocks(
    state: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    pad_slot_id: int = -1,
    *,
    block: int = BLOCK,
    num_warps: int | None = None,
) -> None:
    """The op on Triton; ``block`` (words per program) and ``num_warps`` are for tuning."""
    if src.shape[0] == 0 or state.numel() == 0:
        return
    words = _flat_words(state) if _rows_contiguous(state) else None
    if words is not None:
        view, inner, strides, flat = words, (1, 1, 1), (0, 0, 0, 1), True
    else:
        view = state.view(_SAME_SIZE[state.element_size()])
        inner = (*(1,) * (5 - state.dim()), *view.shape[1:])[-3:]
        strides = (*(0,) * (5 - state.dim()), *view.stride()[1:])[-4:]
        flat = False
    row_len = view[0].numel()
    block = min(block, triton.next_power_of_2(row_len))
    nchunks = triton.cdiv(row_len, block)
    _copy_rows_kernel[(src.shape[0] * nchunks,)](
        view, src, dst, pad_slot_id, state.shape[0], row_len, nchunks,
        view.stride(0), src.stride(0), dst.stride(0),
        *inner, *strides,
        BLOCK=block, FLAT=flat, num_warps=num_warps or max(1, min(8, block // 512)),
    )


_op.register_impl("triton", copy_state_blocks, supports=supports)
