"""Compile the Triton providers' kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter runs a kernel as Python, so what only the compiler rejects (a name bound
in one branch of a runtime ``if`` and read after it, a type that differs between the
branches, a shape a ``tl.dot`` refuses) passes every CPU test and fails on the GPU. This
script runs each provider's launch on its op's example calls with a driver that targets
sm_90 and launches nothing: every kernel goes through Triton's whole pipeline to a cubin.
It prints one JSON object, {op: [compiled kernel names]}. Run without TRITON_INTERPRET
(``tests/test_triton_compile.py`` does): Triton decides at definition time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


def run(script: str) -> Any:
    """Run ``script`` (a file beside this one that compiles without launching) in a fresh
    process without TRITON_INTERPRET, and return the JSON object of its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, said explicitly
    path = Path(__file__).with_name(script)
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class CompileOnly:
    """The driver calls a launch makes, answered for an H100 that is not there."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def main() -> None:
    driver.set_active(CompileOnly())
    import mamba_ir.impls.triton as providers
    from mamba_ir import get_op
    from mamba_ir.impls.triton._common import positional
    from mamba_ir.impls.triton.mamba_chunk_scan import Config as ScanConfig

    compiled: dict[str, list[str]] = {}
    current: list[str] = []

    def compile_only(kernel: Any, grid: tuple[int, ...], **args: Any) -> None:
        fn, ordered, options = positional(kernel, args)
        fn.warmup(*ordered, grid=grid, **options)
        current.append(fn.fn.__name__)

    for module in list(sys.modules.values()):
        if module and module.__name__.startswith(providers.__name__) and hasattr(
                module, "call_kernel"):
            module.call_kernel = compile_only

    # each launch form a provider has, beyond its default
    forms: dict[str, list[dict[str, Any]]] = {
        "selective_state_update": [{}],
        "mamba_chunk_scan": [{}, {"config": ScanConfig(contrib_half=False)},
                             {"config": ScanConfig(scan_diag_k=64,
                                                   single_chunk_pass=False,
                                                   scan_d_diag=False)}],
        "selective_scan": [{}],
        "causal_conv1d_fn": [{}, {"kernel": "tile"}, {"kernel": "stream", "depth": 8}],
        "causal_conv1d_update": [{}],
        "copy_state_blocks": [{}],
        "replay_state_update": [{}, {"direct": False}],
    }
    for name, tunings in forms.items():
        op = get_op(name)
        launch = op.impls["triton"].fn.__wrapped__
        for dtype in (torch.bfloat16, torch.float32):
            call = op.bind(**op.example(torch.device("cpu"), dtype))
            for arg, make in op.allocate.items():
                if call[arg] is None:
                    call[arg] = make(call)
            for tuning in tunings:
                launch(call, **tuning)
        compiled[name] = sorted(set(current))
        current.clear()
    compiled["selective_state_update (stored states)"] = _stored_state_forms(launch_of, current)
    compiled["flashinfer index preparation"] = _flashinfer_prepare(current)
    print(json.dumps(compiled))


def launch_of(name: str) -> Any:
    from mamba_ir import get_op

    return get_op(name).impls["triton"].fn.__wrapped__


def _stored_state_forms(launch_of: Any, current: list[str]) -> list[str]:
    """The SSU on quantized states and with stochastic rounding (``rand_seed``): their
    store is a branch of its own (the Philox bits, the rounding of each grid)."""
    from mamba_ir import get_op
    from mamba_ir.ops._quant import QUANTIZED, quantize

    op = get_op("selective_state_update")
    for dtype in (torch.bfloat16, torch.float16, torch.int16, torch.int8, torch.float8_e4m3fn):
        for seed in (None, torch.tensor(3)):
            if seed is None and dtype not in QUANTIZED:
                continue  # rounding to nearest of a float state: the default form above
            call = op.bind(**op.example(torch.device("cpu"), torch.float32))
            h = call["state"].float()
            call["state"], call["state_scale"] = (
                quantize(h, dtype) if dtype in QUANTIZED else (h.to(dtype), None))
            call["rand_seed"] = seed
            call["out"] = torch.empty_like(call["x"])
            launch_of("selective_state_update")(call)
    # dstate 6: quads of elements straddle headdim rows, each value draws its own Philox
    call = op.bind(**op.example(torch.device("cpu"), torch.float32))
    for name in ("state", "A", "B", "C"):
        call[name] = call[name][..., :6]
    call["state"] = call["state"].to(torch.bfloat16)
    call["rand_seed"], call["out"] = torch.tensor(3), torch.empty_like(call["x"])
    launch_of("selective_state_update")(call)
    names = sorted(set(current))
    current.clear()
    return names


def _flashinfer_prepare(current: list[str]) -> list[str]:
    """The FlashInfer provider's one Triton launch before FlashInfer's kernel, in each form
    (in place, destinations, speculative with pad sources, varlen)."""
    from mamba_ir.impls.flashinfer import selective_state_update as fi

    def compile_only(kernel: Any, grid: tuple[int, ...], **args: Any) -> None:
        from mamba_ir.impls.triton._common import positional

        fn, ordered, options = positional(kernel, args)
        fn.warmup(*ordered, grid=grid, **options)
        current.append(fn.__name__)

    fi.call_kernel = compile_only
    state = torch.zeros(8, 2, 64, 16, dtype=torch.bfloat16)
    i32 = dict(dtype=torch.int32)
    sbi, dst = torch.tensor([1, 2, 3], **i32), torch.tensor([4, 5, 6], **i32)
    spec = torch.tensor([[1, 2], [3, 4]], **i32)
    nacc, cu = torch.tensor([1, 2], **i32), torch.tensor([0, 2, 3], **i32)
    fi._prepare(state, torch.zeros(3, 2, 64), sbi, None, None, None, -1, False)
    fi._prepare(state, torch.zeros(3, 1, 2, 64), sbi, dst, None, None, -1, True)
    fi._prepare(state, torch.zeros(2, 2, 2, 64), spec, None, nacc, None, -1, True)
    fi._prepare(state, torch.zeros(3, 2, 64), spec, spec, nacc, cu, -1, True)
    names = sorted(set(current))
    current.clear()
    return names


if __name__ == "__main__":
    if triton.knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET: interpreted kernels do not compile")
    main()
