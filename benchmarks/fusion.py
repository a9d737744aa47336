"""Align fusion under torch.compile: a decode step with a copy + SSU pair, fused vs unfused.

The step is the model code of align-mode prefix caching: ``copy_state_blocks(S, src, dst)``
then ``selective_state_update`` in place on ``dst``. Compiled three ways in one run:

- fused:    Triton SSU chosen; it reads from a source row, so the copy folds into it;
- unfused:  a Triton SSU provider that refuses src redirect (same kernel, registered here
            under another name), so the copy stays, lowered to Triton copy_state_blocks;
- no copy:  the SSU alone in place (the floor: what the step costs with nothing to copy).

Mamba2 decode shapes (see benchmarks/ssu.py), bf16 state, timed as CUDA-graph replays of
the compiled step, for copy fractions 1 (every sequence takes a cached block) and 1/4.
Also measured: the time the passes take as a share of compile time, on the step and on a
16-layer decode step (in/out projections, conv update and SSU with their copies per layer).

    python -m benchmarks.fusion [--out DIR]          # on the GPU machine
    python -m benchmarks.fusion --plot docs/fusion_bench.json
    python -m benchmarks.fusion --smoke              # tiny shapes, any device (checks the script)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DOCS, plot_series, progress, time_us, write_json

BATCHES = (1, 8, 32, 64, 128, 256)
FRACTIONS = (1.0, 0.25)
NHEADS, HEADDIM, DSTATE, NGROUPS = 128, 64, 128, 8
SMOKE = dict(nheads=4, headdim=8, dstate=16, ngroups=2)


def step(state, src, dst, x, dt, A, B, C, D, z, dt_bias):
    from mamba_ir import ops

    ops.copy_state_blocks(state, src, dst)
    return ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                      state_batch_indices=dst)


def ssu_only(state, src, dst, x, dt, A, B, C, D, z, dt_bias):
    from mamba_ir import ops

    return ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                      state_batch_indices=dst)


def step_inputs(batch: int, fraction: float, device: str, shape: dict[str, int],
                seed: int = 0) -> tuple:
    """A decode step's arguments: running rows ``dst``, cached rows ``src`` for a
    ``fraction`` of the sequences (pad elsewhere), on a cache of 2 x batch rows."""
    nheads, headdim, dstate, ngroups = (shape[k] for k in ("nheads", "headdim", "dstate",
                                                           "ngroups"))
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=device) * scale).to(dtype)

    rows = torch.randperm(2 * batch, generator=g, device=device).to(torch.int32)
    dst, src = rows[:batch], rows[batch:].clone()
    keep = torch.rand(batch, generator=g, device=device) < fraction
    src[~keep] = -1
    return (
        rand(2 * batch, nheads, headdim, dstate, scale=0.5), src, dst,
        rand(batch, nheads, headdim),
        rand(batch, nheads, 1, scale=0.5).expand(batch, nheads, headdim),
        (-torch.rand(nheads, 1, 1, generator=g, device=device) - 0.5).expand(
            nheads, headdim, dstate),
        rand(batch, ngroups, dstate), rand(batch, ngroups, dstate),
        rand(nheads, 1).expand(nheads, headdim),
        rand(batch, nheads, headdim),
        rand(nheads, 1).expand(nheads, headdim),
    )


def register_inplace_provider() -> str:
    """The Triton SSU under another name, refusing src redirect: the unfused baseline."""
    from mamba_ir import get_op

    op = get_op("selective_state_update")
    triton = op.impls["triton"]

    def inplace_only(**call: Any) -> bool | str:
        if call["dst_state_batch_indices"] is not None:
            return "in place only (the unfused baseline)"
        return triton.supports(**call)

    op.register_impl("triton_inplace", triton.fn, supports=inplace_only,
                     platforms=triton.platforms)
    return "triton_inplace"


def variants() -> dict[str, tuple[Any, dict[str, list[str]]]]:
    inplace = register_inplace_provider()
    copy = {"copy_state_blocks": ["triton"]}
    return {
        "fused": (step, {"selective_state_update": ["triton"], **copy}),
        "unfused": (step, {"selective_state_update": [inplace], **copy}),
        "no_copy": (ssu_only, {"selective_state_update": ["triton"], **copy}),
    }


def timed(fn: Any, args: tuple, device: str) -> float:
    if device == "cuda":
        return time_us(lambda: fn(*args))
    fn(*args)
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e6


def measure_steps(device: str, shape: dict[str, int], batches: tuple[int, ...]) -> dict:
    import mamba_ir

    result: dict[str, Any] = {"rows": [], "compile": {}, "reports": {}}
    compiled = {}
    for name, (fn, priority) in variants().items():
        compiled[name] = mamba_ir.compile(fn, priority=priority)
        start = time.perf_counter()
        compiled[name](*step_inputs(batches[0], 1.0, device, shape))
        if device == "cuda":
            torch.cuda.synchronize()
        result["compile"][name] = {"first_call_s": time.perf_counter() - start}

    for batch in progress(batches, "fusion"):
        for fraction in FRACTIONS:
            row = {"batch": batch, "copy_fraction": fraction,
                   "state_row_bytes": shape["nheads"] * shape["headdim"] * shape["dstate"] * 2}
            args = step_inputs(batch, fraction, device, shape)
            for name, fn in compiled.items():
                row[f"{name}_us"] = timed(fn, args, device)
            row["saved_us"] = row["unfused_us"] - row["fused_us"]
            row["fused_vs_unfused"] = row["fused_us"] / row["unfused_us"]
            result["rows"].append(row)

    # identical results fused and unfused, bit for bit (same kernels, rows read elsewhere)
    args = step_inputs(batches[len(batches) // 2], 0.5, device, shape, seed=1)
    out = {}
    for name in ("fused", "unfused"):
        call = tuple(a.clone() if 0 not in a.stride() else a for a in args)
        out[name] = (compiled[name](*call), call[0])
    result["fused_equals_unfused"] = bool(
        torch.equal(out["fused"][0], out["unfused"][0])
        and torch.equal(out["fused"][1], out["unfused"][1]))
    for name, c in compiled.items():
        report = c.lowering_report
        result["compile"][name].update(graphs=report.graphs, pass_s=report.pass_seconds,
                                       inductor_s=report.compile_seconds)
        result["reports"][name] = [str(s) for s in report.sites[:2]]
    return result


class Layers(torch.nn.Module):
    """A decode step of ``n`` Mamba2-style layers: in projection, conv update and SSU (each
    after its align copy), gate, out projection, residual."""

    def __init__(self, n: int, hidden: int, shape: dict[str, int], device: str) -> None:
        super().__init__()
        self.shape = shape
        nheads, headdim, dstate, ngroups = (shape[k] for k in ("nheads", "headdim", "dstate",
                                                               "ngroups"))
        inner = nheads * headdim
        self.conv_dim = inner + 2 * ngroups * dstate
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        kw = dict(device=device, dtype=dtype)
        self.inp = torch.nn.ModuleList(
            torch.nn.Linear(hidden, inner + self.conv_dim + nheads, bias=False, **kw)
            for _ in range(n))
        self.outp = torch.nn.ModuleList(
            torch.nn.Linear(inner, hidden, bias=False, **kw) for _ in range(n))
        self.conv_w = torch.nn.Parameter(torch.randn(n, self.conv_dim, 4, **kw) * 0.3)
        self.A = torch.nn.Parameter(-torch.rand(n, nheads, **kw) - 0.5)
        self.D = torch.nn.Parameter(torch.randn(n, nheads, **kw))
        self.dt_bias = torch.nn.Parameter(torch.randn(n, nheads, **kw))

    def forward(self, h, conv_cache, ssm_cache, src, dst):
        from mamba_ir import ops

        nheads, headdim, dstate, ngroups = (self.shape[k] for k in ("nheads", "headdim",
                                                                    "dstate", "ngroups"))
        batch, inner = h.shape[0], nheads * headdim
        for i in range(len(self.inp)):
            zxbcdt = self.inp[i](h)
            z, xbc, dt = torch.split(zxbcdt, [inner, self.conv_dim, nheads], dim=-1)
            ops.copy_state_blocks(conv_cache[i], src, dst)
            xbc = ops.causal_conv1d_update(xbc, conv_cache[i], self.conv_w[i], None,
                                           conv_state_indices=dst)
            x, B, C = torch.split(xbc, [inner, ngroups * dstate, ngroups * dstate], dim=-1)
            ops.copy_state_blocks(ssm_cache[i], src, dst)
            y = ops.selective_state_update(
                ssm_cache[i], x.reshape(batch, nheads, headdim),
                dt[:, :, None].expand(batch, nheads, headdim),
                self.A[i][:, None, None].expand(nheads, headdim, dstate),
                B.reshape(batch, ngroups, dstate), C.reshape(batch, ngroups, dstate),
                self.D[i][:, None].expand(nheads, headdim), z.reshape(batch, nheads, headdim),
                self.dt_bias[i][:, None].expand(nheads, headdim), dt_softplus=True,
                state_batch_indices=dst)
            h = h + self.outp[i](y.reshape(batch, inner))
        return h


def measure_compile_share(device: str, shape: dict[str, int], layers: int, hidden: int,
                          batch: int) -> dict[str, Any]:
    """Compile a ``layers``-layer decode step from an empty cache; the passes' share."""
    from torch._inductor.utils import fresh_inductor_cache

    import mamba_ir

    model = Layers(layers, hidden, shape, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    nheads, headdim, dstate = shape["nheads"], shape["headdim"], shape["dstate"]
    conv = torch.randn(layers, 2 * batch, model.conv_dim, 3, device=device, dtype=dtype)
    ssm = torch.randn(layers, 2 * batch, nheads, headdim, dstate, device=device, dtype=dtype)
    rows = torch.randperm(2 * batch, device=device).to(torch.int32)
    h = torch.randn(batch, hidden, device=device, dtype=dtype)
    args = (h, conv, ssm, rows[batch:], rows[:batch])
    torch._dynamo.reset()
    with torch.no_grad(), fresh_inductor_cache():
        compiled = mamba_ir.compile(model, priority={"*": ["triton"]})
        start = time.perf_counter()
        compiled(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiled(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        steady = time.perf_counter() - start
    report = compiled.lowering_report
    total = first - steady
    return {
        "layers": layers, "hidden": hidden, "batch": batch,
        "call_sites": len(report), "fused": len(report.fused),
        "compile_s": total, "inductor_s": report.compile_seconds, "pass_s": report.pass_seconds,
        "pass_share_of_compile": report.pass_seconds / total,
        "pass_share_of_inductor": report.pass_seconds / report.compile_seconds,
        "providers": sorted({f"{s.op}->{s.provider}" for s in report}),
    }


def plot(path: Path) -> Path:
    data = json.loads(path.read_text())
    env = data["environment"]
    rows = [r for r in data["rows"] if r["copy_fraction"] == 1.0]
    xs = [r["batch"] for r in rows]
    return plot_series(
        path.with_suffix(".png"), xs,
        {name: [r[f"{name}_us"] for r in rows] for name in ("unfused", "fused", "no_copy")},
        xlabel="batch (sequences, one token each)",
        ylabel="compiled decode step, us (CUDA graph replay)",
        title=f"copy + SSU, every sequence copies: {env.get('device', '?')}, {env['date']}",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # batch 8 would otherwise be tied to ngroups = 8 and cost one more compile per variant
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    if args.smoke:
        shape, batches, layers, hidden = SMOKE, (1, 2, 3), 2, 32
    else:
        shape = dict(nheads=NHEADS, headdim=HEADDIM, dstate=DSTATE, ngroups=NGROUPS)
        batches, layers, hidden = BATCHES, 16, 2048
    result = {"shape": shape}
    result.update(measure_steps(device, shape, batches))
    write_json("fusion_bench.json", result, args.out)  # kept if the second part fails
    result["compile_share"] = measure_compile_share(
        device, dict(shape, nheads=shape["nheads"] // 2), layers, hidden, 32)
    path = write_json("fusion_bench.json", result, args.out)
    for row in result["rows"]:
        print(row)
    print(json.dumps(result["compile_share"], indent=1))
    print(path)


if __name__ == "__main__":
    main()
