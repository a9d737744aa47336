"""Compile the quantized-state variants of the Triton selective_state_update kernel for an
H100 (sm_90) without a GPU, as ``compile_sm90.py`` does for every kernel's default forms,
and report what the bit-exact quantization relies on in the PTX, and what ptxas allocates.

The interpreter checks the quantization bit for bit on the CPU, but three properties only
the compiler decides: the divisions are correctly rounded (``div.rn``, not an approximate
division), the add that rounds to an integer is not fused with the product before it
(an FMA would round the exact product instead of its float32 value), and float8 e4m3 is
written by the round-to-nearest-even conversion (a bf16 state's kernel, compiled too, is
the baseline: the z gate's sigmoid divides approximately in every variant). The decode
form is the benchmark's call (Mamba2, batch 64) at its default launch, also with
stochastic rounding (``sr``: the Philox bits of every stored value), where the registers
run short first (a one-byte tile on one warp spilled): ptxas's registers and spills are
reported.
Prints one JSON object: {variant: {"div_rn": n, "approx_div": n, "fused_rounding": n,
"e4m3_rn": n, "registers": n, "spill_bytes": n}}. Run without TRITON_INTERPRET
(``tests/test_triton_ssu.py`` does).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
from compile_sm90 import CompileOnly
from registers_sm90 import ptxas_usage
from triton.runtime import driver

# the benchmark's call: its folder is not installed with the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ssu import decode_call  # noqa: E402

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
    forms = {dtype: ("decode", "speculative", "sr") for dtype in (torch.bfloat16, *QUANTIZED)}
    forms[torch.bfloat16] += ("stream",)
    forms[torch.int8] += ("stream",)
    work = Path(tempfile.mkdtemp())
    for dtype in forms:
        for form in forms[dtype]:
            call = op.bind(**op.example(torch.device("cpu"), torch.bfloat16))
            if dtype in QUANTIZED:
                call["state"], call["state_scale"] = quantize(call["state"].float(), dtype)
            tuning: dict[str, Any] = {}
            if form in ("decode", "sr"):
                call = op.bind(**decode_call(64, redirect=False, state_dtype=dtype,
                                             device="cpu"))
                if form == "sr":  # stochastic rounding: the Philox bits of every value
                    call["rand_seed"] = torch.tensor(64)
            elif form == "speculative":  # two tokens per sequence, a slot for each
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
            name = f"{str(dtype).removeprefix('torch.')}-{form}"
            registers, spill_stores, spill_loads = ptxas_usage(ptx, work, name)
            report[name] = {
                "registers": registers,
                "spill_bytes": spill_stores + spill_loads,
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
