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
