"""Quantized state rows: int16, int8 or float8 (e4m3) values with one float32 scale per
block of ``dstate`` values (``state_scale``: the state's shape less its last dimension,
``(slots, nheads, headdim)`` in the Mamba2 layout, as FlashInfer lays it out).

The native definition, which every provider matches:

- a block's scale is its absolute maximum over ``QMAX`` of the dtype (the largest value
  it holds: 32767, 127, 448); values are stored as ``h * (QMAX / absmax)`` rounded to
  nearest, ties to even, clamped to ``[-QMAX, QMAX]``, and read as ``q * scale``;
- an all-zero block has scale 0 and stores zeros, and so does a block whose scale would
  not be a normal float32 (absmax below ``QMAX * 2**-126``);
- a block holding inf or NaN stores zeros under a NaN scale, so it reads as NaN: a
  non-finite state stays non-finite, as in a float state.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import checks

QMAX = {torch.int16: 32767.0, torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
QUANTIZED = tuple(QMAX)
STATE_DTYPES = (*checks.FLOAT_DTYPES, *QUANTIZED)


def quantize(h: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` (float32, blocks along the last dimension) as ``dtype`` values and scales."""
    qmax = QMAX[dtype]
    absmax = h.abs().amax(-1)
    finite = absmax.isfinite()
    # a block too small for a normal float32 scale (all zero included) stores zeros
    zero = absmax < qmax * torch.finfo(torch.float32).tiny
    scale = torch.where(finite, torch.where(zero, 0.0, absmax / qmax), torch.nan)
    inverse = torch.where(finite & ~zero, qmax / absmax, 0.0)
    v = torch.where(finite[..., None], h * inverse[..., None], 0.0)
    if not dtype.is_floating_point:
        v = v.round()  # half to even
    return v.clamp(-qmax, qmax).to(dtype), scale  # a float8 cast rounds half to even


def values(rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """State rows as float32: dequantized by their scales where they have some."""
    return rows.float() if scale is None else rows.float() * scale[..., None]


def row_value(members: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """``RowSpec.value`` of a ``(state, state_scale)`` row: its float32 values, and one
    quantization step that a correct provider may differ by, since rounding follows the
    float32 arithmetic before it: the scale for integers, a float8 value's unit in the
    last place times the scale."""
    state, scale = members["state"], members["state_scale"]
    if scale is None:
        return state.float(), 0.0
    step = scale[..., None]
    if state.dtype.is_floating_point:  # e4m3: 3 mantissa bits, normal from 2^-6
        q = state.float().abs().clamp(min=2.0**-6)
        step = step * torch.exp2(torch.floor(torch.log2(q)) - 3)
    return values(state, scale), step


def check_scale(call: dict[str, Any], state: str = "state", scale: str = "state_scale") -> None:
    """A quantized state comes with float32 scales, one per block of its last dimension;
    a float state with none."""
    s = call[state]
    blocks = tuple(s.shape[:-1])
    if s.dtype in QUANTIZED:
        if call[scale] is None:
            checks.fail(scale, f"float32 scales of shape {blocks} for a "
                        f"{str(s.dtype).removeprefix('torch.')} {state}", None)
        checks.tensor(call, scale, shape=blocks, dtypes=(torch.float32,))
    elif call[scale] is not None:
        checks.fail(scale, f"None for a {str(s.dtype).removeprefix('torch.')} {state} (scales "
                    "go with int16, int8 and float8_e4m3fn states)", "a tensor")
