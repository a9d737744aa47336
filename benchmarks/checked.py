"""Cost of the checked mode (``mamba_ir.compile(..., validate=True)``) on a decode step.

The step is one Mamba2 layer's state update in align mode, as the model runs it:
``copy_state_blocks`` into the running rows, then ``causal_conv1d_update`` and
``selective_state_update`` on them (the copies fold into the ops where the provider reads
from a source row). Compiled twice, with and without the device-side checks, timed as
CUDA-graph replays (and launched without a graph, where the checks' launch overhead
shows) at Mamba2 decode shapes (bf16 state, 128 heads x 64 x 128, conv
10240 channels, width 4) for several batch sizes.

    python -m benchmarks.checked [--out DIR]          # on the GPU machine
    python -m benchmarks.checked --smoke              # tiny shapes, any device (checks the script)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DOCS, progress, time_us, write_json

BATCHES = (1, 8, 32, 128, 256)
FULL = dict(nheads=128, headdim=64, dstate=128, ngroups=8, width=4)
SMOKE = dict(nheads=4, headdim=8, dstate=16, ngroups=2, width=4)


def step(ssm, conv, src, dst, xbc, conv_w, conv_b, x, dt, A, B, C, D, dt_bias):
    from mamba_ir import ops

    ops.copy_state_blocks(conv, src, dst)
    xbc = ops.causal_conv1d_update(xbc, conv, conv_w, conv_b, conv_state_indices=dst)
    ops.copy_state_blocks(ssm, src, dst)
    y = ops.selective_state_update(ssm, x, dt, A, B, C, D, None, dt_bias, dt_softplus=True,
                                   state_batch_indices=dst)
    return xbc, y


def inputs(batch: int, device: str, shape: dict[str, int], seed: int = 0) -> tuple:
    """A decode step on a cache of 2 x batch rows: running rows ``dst``, cached rows ``src``
    for half of the sequences (pad elsewhere)."""
    h, p, n, g, w = (shape[k] for k in ("nheads", "headdim", "dstate", "ngroups", "width"))
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    channels = h * p + 2 * g * n

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, device=device) * scale).to(dtype)

    rows = torch.randperm(2 * batch, generator=gen, device=device).to(torch.int32)
    dst, src = rows[:batch], rows[batch:].clone()
    src[torch.rand(batch, generator=gen, device=device) < 0.5] = -1
    return (
        rand(2 * batch, h, p, n, scale=0.5),
        rand(2 * batch, w - 1, channels).transpose(1, 2), src, dst,
        rand(batch, channels), rand(channels, w, scale=0.5), rand(channels),
        rand(batch, h, p), rand(batch, h, 1, scale=0.5).expand(batch, h, p),
        (-torch.rand(h, 1, 1, generator=gen, device=device) - 0.5).expand(h, p, n),
        rand(batch, g, n), rand(batch, g, n), rand(h, 1).expand(h, p), rand(h, 1).expand(h, p),
    )


def timed(fn: Any, args: tuple, device: str, graph: bool = True) -> float:
    if device == "cuda":
        return time_us(lambda: fn(*args), graph=graph)
    fn(*args)
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e6


def measure(device: str, shape: dict[str, int], batches: tuple[int, ...]) -> dict[str, Any]:
    import mamba_ir

    compiled = {name: mamba_ir.compile(step, validate=name == "checked")
                for name in ("plain", "checked")}
    rows = []
    for batch in progress(batches, "checked"):
        args = inputs(batch, device, shape)
        row: dict[str, Any] = {"batch": batch}
        for name, fn in compiled.items():
            row[f"{name}_us"] = timed(fn, args, device)  # CUDA-graph replay: the GPU's time
            # launched from Python without a graph: the checks' launch overhead shows here
            row[f"{name}_launch_us"] = timed(fn, args, device, graph=False)
        row["overhead_us"] = row["checked_us"] - row["plain_us"]
        row["checked_vs_plain"] = row["checked_us"] / row["plain_us"]
        row["launch_overhead_us"] = row["checked_launch_us"] - row["plain_launch_us"]
        rows.append(row)
    return {"shape": shape, "rows": rows,
            "reports": {k: [str(s) for s in fn.lowering_report] for k, fn in compiled.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="where checked_bench.json goes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        result = measure(device, SMOKE, (1, 4))
        print(result["rows"])
        return 0
    if device != "cuda":
        parser.error("the measurement needs a GPU (use --smoke to check the script)")
    result = measure(device, FULL, BATCHES)
    for row in result["rows"]:
        print(f"batch {row['batch']:4d}: plain {row['plain_us']:8.1f} us, checked "
              f"{row['checked_us']:8.1f} us (+{row['overhead_us']:.1f} us, "
              f"x{row['checked_vs_plain']:.2f}); without CUDA graphs +"
              f"{row['launch_overhead_us']:.1f} us")
    print(write_json("checked_bench.json", result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
