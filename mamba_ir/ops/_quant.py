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

Stochastic rounding (``rand_seed``) replaces round-to-nearest where a state is stored,
for these and for float16 and bfloat16 states: a value ``v`` between the neighbours
``lo < v < hi`` on its dtype's grid becomes ``hi`` when ``r < (v - lo) / (hi - lo)``, else
``lo``, where ``r`` is the element's 32 Philox bits (``_philox.state_bits``) less their
low 8, times ``2**-24``: unbiased to ``2**-24`` of a step. The grid is the integers for
int16 and int8 (after the clamp); for float8 e4m3, float16 and bfloat16 it steps by
``2**(e - mantissa bits)`` at binary exponent ``e``, ``e`` at least -6, -14 and -119
(bfloat16's step stays a normal float32: below ``2**-119`` it rounds between multiples of
``2**-126``). Values beyond the largest finite value, inf and NaN round to nearest.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import checks

QMAX = {torch.int16: 32767.0, torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# (mantissa bits, smallest binary exponent of a step) of the float grids rounded to
FLOAT_GRIDS = {torch.float8_e4m3fn: (3, -6), torch.float16: (10, -14), torch.bfloat16: (7, -119)}
QUANTIZED = tuple(QMAX)
STATE_DTYPES = (*checks.FLOAT_DTYPES, *QUANTIZED)
ROUNDED = (*QUANTIZED, torch.float16, torch.bfloat16)  # states a stochastic round applies to


def quantize(
    h: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` (float32, blocks along the last dimension) as ``dtype`` values and scales;
    rounded stochastically by ``bits`` (one per value) where given."""
    qmax = QMAX[dtype]
    absmax = h.abs().amax(-1)
    finite = absmax.isfinite()
    # a block too small for a normal float32 scale (all zero included) stores zeros
    zero = absmax < qmax * torch.finfo(torch.float32).tiny
    scale = torch.where(finite, torch.where(zero, 0.0, absmax / qmax), torch.nan)
    inverse = torch.where(finite & ~zero, qmax / absmax, 0.0)
    v = torch.where(finite[..., None], h * inverse[..., None], 0.0)
    if bits is not None:
        return round_stochastic(v.clamp(-qmax, qmax), dtype, bits), scale
    if not dtype.is_floating_point:
        v = v.round()  # half to even
    return v.clamp(-qmax, qmax).to(dtype), scale  # a float8 cast rounds half to even


def round_stochastic(v: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """``v`` (float32) rounded to ``dtype`` stochastically by ``bits`` (module docstring);
    integers must already lie within the dtype."""
    r = (bits >> 8).float() * 2.0**-24
    if dtype.is_floating_point:
        mbits, emin = FLOAT_GRIDS[dtype]
        _, e = torch.frexp(v)  # v = m * 2**e with 0.5 <= |m| < 1: binary exponent e - 1
        k = (e - 1).clamp(min=emin) - mbits
        step, inverse = _power_of_two(k), _power_of_two(-k)
    else:
        step = inverse = torch.ones((), device=v.device)
    t = v * inverse  # exact: a power of two
    low = t.floor()
    q = torch.where(r < t - low, low + 1, low) * step
    if dtype.is_floating_point:
        q = torch.where(v.abs() <= torch.finfo(dtype).max, q, v)  # NaN too: to nearest
    return q.to(dtype)


def _power_of_two(k: torch.Tensor) -> torch.Tensor:
    """``2.0**k`` in float32 for integer ``k`` in [-126, 127], built from its bits (exact,
    where exp2 need not be)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


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


def check_seed(call: dict[str, Any], state: str = "state", seed: str = "rand_seed") -> None:
    """A stochastic rounding seed is one int64 on the state's device, for a state whose
    stores round (16-bit float or quantized)."""
    t = checks.tensor(call, seed, dtypes=(torch.int64,), optional=True)
    if t is None:
        return
    if t.numel() != 1:
        checks.fail(seed, "one int64 value (shape () or (1,))", tuple(t.shape))
    s = call[state]
    if t.device != s.device:
        checks.fail(seed, f"a tensor on {s.device} (that of {state}), so that CUDA graphs "
                    "replay it", t.device)
    if s.dtype not in ROUNDED:
        names = ", ".join(str(d).removeprefix("torch.") for d in ROUNDED)
        checks.fail(seed, f"None for a {str(s.dtype).removeprefix('torch.')} {state} "
                    f"(stochastic rounding applies to {names} states)", "a tensor")
