"""Registers and spills of the chunk-scan kernels at Mamba2 size, compiled for an H100.

The scan and chunk-state kernels are tuned to a 128-register cap (``Config.scan_maxnreg``,
``Config.state_maxnreg``) at which they do not spill; a change that makes them spill costs
10-40 % on the GPU (docs/bench-chunk-scan.md) and shows nowhere else on a machine without
one. This script compiles each launch of the benchmark's call
(``benchmarks.chunk_scan.make_call`` on the CPU: nheads 128, headdim 64, dstate 128,
ngroups 8, chunk 256, bf16; with and without z) for sm_90 through ``compile_sm90``'s
driver, runs ptxas with ``-v`` on each kernel's PTX and prints one JSON object,
{form: {kernel: [registers, spill store bytes, spill load bytes]}}. Run without
TRITON_INTERPRET (``tests/test_triton_registers.py`` does, through ``compile_sm90.run``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from compile_sm90 import CompileOnly
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver

# the benchmark's call: its folder is not installed with the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.chunk_scan import CHUNK, make_call  # noqa: E402


def ptxas_usage(ptx: str, work: Path, name: str) -> list[int]:
    """[registers, spill store bytes, spill load bytes] that ptxas (the one Triton runs for
    sm_90) reports for ``ptx``."""
    source = work / f"{name}.ptx"
    source.write_text(ptx)
    done = subprocess.run(
        [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(source),
         "-o", str(work / f"{name}.cubin")],
        capture_output=True, text=True, check=True,
    )
    log = done.stderr + done.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output for {name}:\n{log}")
    return [int(regs[1]), int(spills[1]), int(spills[2])]


def main() -> None:
    driver.set_active(CompileOnly())
    import mamba_ir.impls.triton.mamba_chunk_scan as provider
    from mamba_ir import get_op
    from mamba_ir.impls.triton._common import positional

    call = make_call(2 * CHUNK + 40, 2, device="cpu")  # a short and a long sequence

    op = get_op("mamba_chunk_scan")
    usage: dict[str, dict[str, list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ptx: dict[str, str] = {}

        def compile_only(kernel: Any, grid: tuple[int, ...], **args: Any) -> None:
            fn, ordered, options = positional(kernel, args)
            ptx[fn.fn.__name__] = fn.warmup(*ordered, grid=grid, **options).asm["ptx"]

        provider.call_kernel = compile_only
        for form in ("gated", "no-z"):
            ptx.clear()
            provider.launch(op.bind(**{**call, "z": call["z"] if form == "gated" else None}))
            usage[form] = {name: ptxas_usage(text, work, name) for name, text in ptx.items()}
    print(json.dumps(usage))


if __name__ == "__main__":
    if triton.knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET: interpreted kernels do not compile")
    main()
