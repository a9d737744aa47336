"""What every Triton provider shares on the host: whether Triton can run a call, the
registration of a launcher as the op's provider (run on its tensors' CUDA device), kernel
launches by keyword, the heuristics of optional arguments, and strides.

A provider module is ``supports`` (the predicate), ``launch`` (the launcher: one bound call
in, kernel launches out) and ``<op> = register(_op, launch, supports)``; its kernels live in
``_*_kernel(s).py`` and share the jitted helpers of ``_jit.py`` (docs/providers.md).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from mamba_ir.op import IrOp

try:
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Heuristics
except ImportError:  # the provider stays registered and refuses with the reason
    triton = None
    tl = None
    Heuristics = None

PROVIDER = "triton"

Launcher = Callable[..., Any]


def runnable(call: dict[str, Any]) -> bool | str:
    """True when Triton can run on the call's tensors, else why not."""
    if triton is None:
        return "triton is not installed (pip install mamba-ir[triton])"
    devices = {v.device.type for v in call.values() if isinstance(v, torch.Tensor)}
    if devices - {"cuda"} and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors on {sorted(devices - {'cuda'})}: Triton needs CUDA (or TRITON_INTERPRET=1)"
    return True


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


def on_device(index: int, launch: Launcher, call: dict[str, Any], **tuning: Any) -> Any:
    """``launch(call, **tuning)`` with CUDA device ``index`` current (-1: a CPU call).

    Triton launches on the current device, not on its arguments' one: a call on ``cuda:1``
    while ``cuda:0`` is current fails ("Pointer argument cannot be accessed from Triton").
    Compiled graphs already run under their device, so the switch is entered only when the
    device differs; the common path costs one comparison.
    """
    if index < 0 or index == torch.cuda.current_device():
        return launch(call, **tuning)
    with torch.cuda.device(index):
        return launch(call, **tuning)


def register(op: IrOp, launch: Launcher, supports: Callable[..., bool | str]) -> Launcher:
    """Register ``launch`` as ``op``'s Triton provider; returns the provider function.

    ``launch(call, **tuning)`` takes one call's arguments by name (all of the op's, defaults
    filled) and keyword-only tuning parameters. The provider function takes the op's
    arguments as the op does (positionally or by name; dispatch passes all of them by
    name, the fast path), plus the tuning keywords, and runs ``launch`` on the device of the
    call's first argument (every op's first argument is a tensor). Its signature is the
    op's, so no provider repeats it.
    """
    params = op.signature.parameters
    names = frozenset(params)
    first = next(iter(params))
    knobs = [p for p in inspect.signature(launch).parameters.values() if p.kind is p.KEYWORD_ONLY]
    knob_names = tuple(p.name for p in knobs)

    def provider(*args: Any, **kwargs: Any) -> Any:
        tuning = {k: kwargs.pop(k) for k in knob_names if k in kwargs}
        call = kwargs if not args and kwargs.keys() == names else op.bind(*args, **kwargs)
        return on_device(call[first].get_device(), launch, call, **tuning)

    provider.__name__ = provider.__qualname__ = op.name
    provider.__module__ = launch.__module__
    provider.__doc__ = f"{op.name} on Triton: ``{launch.__module__}.launch`` on the call's device."
    provider.__signature__ = op.signature.replace(parameters=[*params.values(), *knobs])
    provider.__wrapped__ = launch
    op.register_impl(PROVIDER, provider, supports=supports)
    return provider


def call_kernel(kernel: Any, grid: tuple[int, ...], **args: Any) -> None:
    """``kernel[grid](**args)`` at the host cost of a positional launch.

    Triton binds keywords more slowly than positions, and its ``@triton.heuristics`` wrapper
    copies every argument once per flag: together a fifth of an SSU launch's host time
    (measured on a CPU without a GPU, the driver faked). Here the flags are computed in one
    pass over ``args`` and the kernel's arguments go over in its order; the others
    (``num_warps``, ...) stay keywords.
    """
    fn, ordered, options = positional(kernel, args)
    fn[grid](*ordered, **options)


def positional(kernel: Any, args: dict[str, Any]) -> tuple[Any, list[Any], dict[str, Any]]:
    """(the jitted function, its arguments in order, the launch options) of ``kernel`` on
    ``args`` (consumed), its ``@triton.heuristics`` flags computed: what
    :func:`call_kernel` launches, for a caller that compiles without launching."""
    if isinstance(kernel, Heuristics):
        for flag, rule in kernel.values.items():
            args[flag] = rule(args)
        kernel = kernel.fn
    return kernel, [args.pop(name) for name in kernel.arg_names], args


def given(arg: str) -> Callable[[dict[str, Any]], bool]:
    """A ``@triton.heuristics`` flag: whether the optional argument ``arg`` was passed (an
    absent tensor is passed as ``None``; the flag keeps the kernel from reading it)."""
    return lambda args: args[arg] is not None


def stride0(t: torch.Tensor | None) -> int:
    """The stride of a per-sequence (or per-channel) tensor along its first dimension, which
    kernels step by instead of assuming 1 (a column of a 2-D index tensor has stride 2 or
    more, a broadcast bias stride 0); 0 for an absent tensor, never dereferenced."""
    return 0 if t is None else t.stride(0)


def index_strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(per sequence, per column) strides of a 1-D or 2-D index tensor: a 1-D one is one
    column (column stride 0); zeros for an absent tensor, never dereferenced."""
    if t is None:
        return 0, 0
    return t.stride(0), t.stride(1) if t.dim() == 2 else 0


def strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """The strides of ``t``'s last ``ndim`` dimensions, as kernels take them (one tuple per
    tensor); zeros for an absent tensor, never dereferenced."""
    return (0,) * ndim if t is None else t.stride()[t.dim() - ndim:]
