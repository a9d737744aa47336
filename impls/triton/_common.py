"""What every Triton implementation needs: whether Triton can run a call at all."""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the provider stays registered and refuses with the reason
    triton = None
    tl = None

PROVIDER = "triton"


def runnable(call: dict[str, Any]) -> bool | str:
    """True when Triton can run on the call's tensors, else why not."""
    if triton is None:
        return "triton is not installed (pip install mamba-ir[triton])"
    devices = {v.device.type for v in call.values() if isinstance(v, torch.Tensor)}
    if devices - {"cuda"} and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors on {sorted(devices - {'cuda'})}: Triton needs CUDA (or TRITON_INTERPRET=1)"
    return True


def stride0(t: torch.Tensor | None) -> int:
    """The stride of a per-sequence (or per-channel) tensor along its first dimension, which
    kernels step by instead of assuming 1 (a column of a 2-D index tensor has stride 2 or
    more, a broadcast bias stride 0); 0 for an absent tensor, never dereferenced."""
    return 0 if t is None else t.stride(0)


MAX_CONV_WIDTH = 8  # the taps are unrolled; wider windows are refused rather than compiled huge


def runnable_conv(call: dict[str, Any]) -> bool | str:
    """:func:`runnable`, and a conv width the unrolled conv kernels handle."""
    ok = runnable(call)
    if ok is not True:
        return ok
    width = call["weight"].shape[1]
    if not 2 <= width <= MAX_CONV_WIDTH:
        return f"conv width {width}: the Triton kernels handle widths 2..{MAX_CONV_WIDTH}"
    return True
