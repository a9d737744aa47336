"""Registers and spills of the replay kernel at Mamba2 decode size, compiled for an H100.

Compiles the Triton ``replay_state_update`` launch of the benchmark's call
(``benchmarks.replay.replay_call`` on the CPU: nheads 128, headdim 64, dstate 128,
ngroups 8, bf16, a ring of 32) for sm_90 through ``compile_sm90``'s driver, once per
append route (the in-order one with its first chunk prefetched too), one token and
speculative (4 tokens), and prints one JSON object, {route:
[registers, spill store bytes, spill load bytes]} (``registers_sm90.ptxas_usage``). Run
without TRITON_INTERPRET (``tests/test_triton_replay.py`` does, through
``compile_sm90.run``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from compile_sm90 import CompileOnly
from registers_sm90 import ptxas_usage
from triton.runtime import driver

# the benchmark's call: its folder is not installed with the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.replay import replay_call, spec_replay_call  # noqa: E402


def main() -> None:
    driver.set_active(CompileOnly())
    import mamba_ir.impls.triton.replay_state_update as provider
    from mamba_ir import get_op
    from mamba_ir.impls.triton._common import positional

    op = get_op("replay_state_update")
    usage: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ptx: dict[str, str] = {}

        def compile_only(kernel: Any, grid: tuple[int, ...], **args: Any) -> None:
            fn, ordered, options = positional(kernel, args)
            ptx[fn.fn.__name__] = fn.warmup(*ordered, grid=grid, **options).asm["ptx"]

        provider.call_kernel = compile_only
        calls = {"": lambda: replay_call(64, 32, "aligned", device="cpu"),
                 "spec ": lambda: spec_replay_call(64, 32, device="cpu")}
        for form, call in calls.items():
            for route, knobs in (("direct", {}), ("rebuild", {"direct": False}),
                                 ("prefetch", {"prefetch": True})):
                if form and route == "prefetch":  # one token only
                    continue
                provider.launch(op.bind(**call()), **knobs)
                usage[form + route] = ptxas_usage(ptx["replay_kernel"], Path(tmp),
                                                  (form + route).replace(" ", "_"))
    print(json.dumps(usage))


if __name__ == "__main__":
    if triton.knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET: interpreted kernels do not compile")
    main()
