"""Compile the quantized-state variants of the Triton selective_state_update kernel for an
H100 (sm_90) without a GPU, as ``compile_sm90.py`` does for every kernel's default forms,
and report what the bit-exact quantization relies on in the PTX.

The interpreter checks the quantization bit for bit on the CPU, but three properties only
the compiler decides: the divisions are correctly rounded (``div.rn``, not an approximate
division), the add that rounds to an integer is not fused with the product before it
(an FMA would round the exact product instead of its float32 value), and float8 e4m3 is
written by the round-to-nearest-even conversion. Prints one JSON object:
{variant: {"div_rn": n, "approx_div": n, "fused_rounding": n,
"e4m3_rn": n}}. Run without TRITON_INTERPRET (``tests/test_triton_ssu.py`` does).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import torch
import triton
from compile_sm90 import CompileOnly
from triton.runtime import driver

ROUNDER = "0f4B400000"  # 1.5 * 2**23, the constant whose addition rounds to an integer


def main() -> None:
    driver.set_active(CompileOnly())
    from mamba_ir import get_op
    from mamba_ir.impls.triton import selective_state_update as provider
    from mamba_ir.impls.triton._common import positional
    from mamba_ir.impls.triton.selective_state_update import Config
    from mamba_ir.ops._quant import QUANTIZED, quantize

    compiled: list[Any] = []

    def compile_only(kernel: Any, grid: tuple[int, ...], **args: Any) -> None:
        fn, ordered, options = positional(kernel, args)
        compiled.append(fn.warmup(*ordered, grid=grid, **options))

    provider.call_kernel = compile_only
    op = get_op("selective_state_update")
    launch = op.impls["triton"].fn.__wrapped__
    report: dict[str, dict[str, Any]] = {}
    # every new code path once per dtype (stores per token or once), the streaming store
    # (the same for every dtype) once: compiling is what CI pays for
    forms = {dtype: ("one-token", "speculative") for dtype in QUANTIZED}
    forms[torch.int8] += ("stream",)
    for dtype in QUANTIZED:
        for form in forms[dtype]:
            call = op.bind(**op.example(torch.device("cpu"), torch.bfloat16))
            call["state"], call["state_scale"] = quantize(call["state"].float(), dtype)
            tuning: dict[str, Any] = {}
            if form == "speculative":  # two tokens per sequence, a slot for each
                n = call["x"].shape[0]
                for name in ("x", "dt", "B", "C"):
                    call[name] = call[name][:, None].expand(n, 2, *call[name].shape[1:])
                call["out"] = torch.empty(call["x"].shape, dtype=call["x"].dtype)
                call["state_batch_indices"] = torch.arange(2 * n, dtype=torch.int32).view(n, 2)
                call["num_accepted_tokens"] = torch.ones(n, dtype=torch.int32)
            elif form == "stream":
                tuning["config"] = Config(block_d=16, num_warps=1, stream=True)
            if call["out"] is None:
                call["out"] = torch.empty(call["x"].shape, dtype=call["x"].dtype)
            launch(call, **tuning)
            ptx = compiled.pop().asm["ptx"]
            report[f"{str(dtype).removeprefix('torch.')}-{form}"] = {
                "div_rn": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
                "approx_div": len(re.findall(r"\bdiv\.(?:approx|full)\.", ptx)),
                "fused_rounding": len(re.findall(rf"\bfma\.[^;]*{ROUNDER}", ptx)),
                "e4m3_rn": len(re.findall(r"\bcvt\.rn\.satfinite\.e4m3x2\.f32\b", ptx)),
            }
    print(json.dumps(report))


if __name__ == "__main__":
    if triton.knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET: interpreted kernels do not compile")
    main()
