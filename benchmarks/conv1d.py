"""Triton causal_conv1d against the native op (eager and under torch.compile), with the roof.

Decode: ``causal_conv1d_update`` for batch 1..512, one token each. Prefill:
``causal_conv1d_fn`` on 2k, 8k and 32k tokens split evenly over 1, 8 or 64 sequences, every
sequence continuing a cached window. Mamba2 sizes: dim = 8192 + 2 * ngroups * dstate
(ngroups 8, dstate 128), width 4, bf16, conv state in the channel-contiguous layout,
rows scattered over a slot pool.

Bytes moved are what the op must touch once: tokens in and out, windows read and written,
weights. The roof is a device-to-device copy moving the same bytes, timed in the same run:
the better of a memcpy and an elementwise copy kernel (``benchmarks.common.roof_rate``).
Triton runs are replayed from a CUDA graph; the native op reads index values on the host
(a device sync), so native timings, eager or compiled, are plain launches.

    python -m benchmarks.conv1d [--sweep] [--out DIR]   # on a GPU: writes conv1d_bench.json
    python -m benchmarks.conv1d --plot                  # plots docs/conv1d_bench*.png from it
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DOCS, plot_series, progress, roof_rate, time_us, write_json

DIM = 8192 + 2 * 8 * 128
WIDTH = 4
DTYPE = torch.bfloat16
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PREFILL = tuple((tokens, seqs) for tokens in (2048, 8192, 32768) for seqs in (1, 8, 64))
JSON_NAME = "conv1d_bench.json"
COMPILE_BUDGET_S = 150.0  # past this much compile time the compiled baseline is skipped
# torch.compile unrolls the native prefill's per-sequence loop (after a graph break on
# query_start_loc.tolist()); 64 sequences took 96 s to compile on H100, so they are skipped
COMPILE_MAX_SEQS = 8
NOTES = {
    "bytes": "tokens in + outputs out + (width-1)-column windows read and written + weights",
    "roof": "device-to-device copy moving the same bytes (half read, half written), same "
            "run: copy_GBps a memcpy, kernel_copy_GBps an elementwise kernel, roof the better",
    "triton": "replayed from a CUDA graph (benchmarks.common.time_us)",
    "native": "plain launches: the native op reads index values on the host (device sync)",
    "compiled": "torch.compile(native), default mode, plain launches; graph breaks at the "
                "host reads of lengths / query_start_loc",
    "variants_us": "prefill: the tiled conv kernel at its default tiles and the streaming "
                   "kernel at chunk x channels / warps [/ qN: N x rows loaded ahead, else 4], "
                   "same run, CUDA-graph replays",
    "compiled_prefill": f"not compiled above {COMPILE_MAX_SEQS} sequences: the per-sequence "
                        "loop is unrolled into one graph per call shape (96 s at 64 sequences)",
}


def _elt() -> int:
    return torch.tensor([], dtype=DTYPE).element_size()


def _states(slots: int) -> torch.Tensor:
    return torch.randn(slots, WIDTH - 1, DIM, dtype=DTYPE, device="cuda").transpose(1, 2)


def decode_case(batch: int) -> tuple[dict[str, Any], int]:
    """A one-token-per-sequence update call, and the bytes it must move."""
    call = {
        "x": torch.randn(batch, DIM, dtype=DTYPE, device="cuda"),
        "conv_state": _states(2 * batch),
        "weight": torch.randn(DIM, WIDTH, dtype=DTYPE, device="cuda"),
        "bias": torch.randn(DIM, dtype=DTYPE, device="cuda"),
        "activation": "silu",
        "conv_state_indices": torch.randperm(2 * batch, device="cuda")[:batch].to(torch.int32),
    }
    e = _elt()
    nbytes = 2 * batch * DIM * e + 2 * batch * (WIDTH - 1) * DIM * e + DIM * (WIDTH + 1) * e
    return call, nbytes


def prefill_case(tokens: int, seqs: int) -> tuple[dict[str, Any], int]:
    """A varlen prefill call continuing ``seqs`` cached windows, and the bytes it must move."""
    starts = torch.arange(seqs + 1, dtype=torch.int32, device="cuda") * (tokens // seqs)
    call = {
        "x": torch.randn(tokens, DIM, dtype=DTYPE, device="cuda").t(),
        "weight": torch.randn(DIM, WIDTH, dtype=DTYPE, device="cuda"),
        "bias": torch.randn(DIM, dtype=DTYPE, device="cuda"),
        "conv_states": _states(2 * seqs),
        "query_start_loc": starts,
        "cache_indices": torch.randperm(2 * seqs, device="cuda")[:seqs].to(torch.int32),
        "has_initial_state": torch.ones(seqs, dtype=torch.bool, device="cuda"),
        "activation": "silu",
    }
    e = _elt()
    nbytes = 2 * tokens * DIM * e + 2 * seqs * (WIDTH - 1) * DIM * e + DIM * (WIDTH + 1) * e
    return call, nbytes


class Compiled:
    """The native function under torch.compile, with its compile time and a shared budget."""

    def __init__(self, native: Callable[..., Any], enabled: bool = True) -> None:
        self.fn = torch.compile(native)
        self.spent = 0.0
        self.enabled = enabled

    def time(self, call: dict[str, Any], skip: str | None = None
             ) -> tuple[float | None, float | None, str | None]:
        """(microseconds, first-call seconds, why not measured)."""
        if skip:
            return None, None, skip
        if not self.enabled:
            return None, None, "not run (--no-compiled)"
        if self.spent > COMPILE_BUDGET_S:
            return None, None, f"skipped: compile budget of {COMPILE_BUDGET_S:.0f} s spent"
        start = time.perf_counter()
        try:
            self.fn(**call)
            torch.cuda.synchronize()
        except Exception as exc:  # report why the baseline is missing, keep benchmarking
            return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        first = time.perf_counter() - start
        self.spent += first
        return time_us(lambda: self.fn(**call), graph=False), first, None


def measure(op_name: str, call: dict[str, Any], nbytes: int, compiled: Compiled,
            skip_compiled: str | None = None) -> dict[str, Any]:
    import mamba_ir

    op = mamba_ir.get_op(op_name)
    call = op.bind(**call)
    op.check(call)
    triton_fn = op.impls["triton"].fn
    row: dict[str, Any] = {"bytes": nbytes}
    rates = roof_rate(nbytes // 2)
    row["copy_GBps"], row["kernel_copy_GBps"] = rates["memcpy"] / 1e9, rates["kernel"] / 1e9
    row["roof_GBps"] = rates["roof"] / 1e9
    row["roof_us"] = nbytes / rates["roof"] * 1e6
    row["triton_us"] = time_us(lambda: triton_fn(**call))
    row["native_us"] = time_us(lambda: op.native(**call), graph=False)
    row["compiled_us"], row["compile_s"], why = compiled.time(call, skip_compiled)
    if why:
        row["compiled_note"] = why
    row["triton_frac"] = row["roof_us"] / row["triton_us"]
    if op_name == "causal_conv1d_fn":
        row["variants_us"] = prefill_variants(call)
    return row


# streaming-kernel configurations timed at every prefill size: (chunk, block_d, num_warps,
# x rows loaded ahead); the first two were the defaults below / from 16k tokens before the
# deeper queue was tried
STREAM_CONFIGS = (
    (32, 256, 2, 4), (128, 256, 2, 4), (64, 256, 2, 4), (16, 256, 2, 4), (8, 256, 2, 4),
    (8, 256, 2, 8), (16, 256, 2, 8), (32, 256, 2, 8), (64, 256, 2, 8), (128, 256, 2, 8),
    (256, 256, 2, 8),
    (16, 128, 1, 4), (32, 128, 1, 4), (16, 128, 1, 8), (32, 128, 1, 8), (64, 128, 1, 8),
    (128, 128, 1, 8),
)


def stream_key(chunk: int, block_d: int, warps: int, depth: int) -> str:
    """The ``variants_us`` key of a streaming configuration (queue depth 4 unmarked, as in
    earlier runs)."""
    return f"stream {chunk}x{block_d}/{warps}w" + ("" if depth == 4 else f"/q{depth}")


def prefill_variants(call: dict[str, Any]) -> dict[str, float]:
    """Microseconds of both conv kernels, the tiled one at its default tiles and the
    streaming one at each of ``STREAM_CONFIGS``, on a bound call."""
    from mamba_ir.impls.triton import causal_conv1d_fn as fn_impl

    times = {"tile": time_us(lambda: fn_impl.launch(call, kernel="tile"))}
    for chunk, block_d, warps, depth in STREAM_CONFIGS:
        times[stream_key(chunk, block_d, warps, depth)] = time_us(
            lambda c=chunk, d=block_d, w=warps, q=depth: fn_impl.launch(
                call, kernel="stream", block_t=c, block_d=d, num_warps=w, depth=q))
    return times


def sweep(results: dict[str, Any], out_dir: Path) -> None:
    """Time tile configurations at the largest sizes; the defaults come from here."""
    import mamba_ir
    from mamba_ir.impls.triton import causal_conv1d_fn as fn_impl
    from mamba_ir.impls.triton import causal_conv1d_update as update_impl

    rows = results.setdefault("sweep", [])
    update = mamba_ir.get_op("causal_conv1d_update")
    call, nbytes = decode_case(512)
    call = update.bind(**call)
    for block_d, warps in progress(((128, 2), (256, 2), (256, 4), (512, 4)), "sweep decode"):
        us = time_us(lambda c=call, b=block_d, w=warps: update_impl.launch(
            c, block_d=b, num_warps=w))
        rows.append({"op": "update", "batch": 512, "block_d": block_d, "num_warps": warps,
                     "us": us, "GBps": nbytes / us / 1e3})
    write_json(JSON_NAME, results, out_dir)
    fn = mamba_ir.get_op("causal_conv1d_fn")
    tiles = [(t, d, w) for t in (8, 16, 32) for d in (128, 256, 512) for w in (4, 8)
             if 16 <= t * d // (32 * w) <= 64]
    for tokens, seqs in progress(((2048, 8), (32768, 8)), "sweep prefill"):
        call, nbytes = prefill_case(tokens, seqs)
        call = fn.bind(**call)
        for block_t, block_d, warps in tiles:
            us = time_us(lambda c=call, t=block_t, d=block_d, w=warps: fn_impl.launch(
                c, kernel="tile", block_t=t, block_d=d, num_warps=w))
            rows.append({"op": "fn", "tokens": tokens, "seqs": seqs, "block_t": block_t,
                         "block_d": block_d, "num_warps": warps, "us": us,
                         "GBps": nbytes / us / 1e3})
        write_json(JSON_NAME, results, out_dir)


def run(out_dir: Path, with_sweep: bool, with_compiled: bool = True) -> None:
    import mamba_ir

    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "shape": {"dim": DIM, "width": WIDTH, "dtype": str(DTYPE).removeprefix("torch.")},
        "notes": NOTES,
        "decode": [],
        "prefill": [],
    }
    if with_sweep:
        sweep(results, out_dir)
    # prefill first: a run cut short keeps the figures the defaults are chosen from
    compiled_fn = Compiled(mamba_ir.get_op("causal_conv1d_fn").native, with_compiled)
    for tokens, seqs in progress(PREFILL, "prefill"):
        call, nbytes = prefill_case(tokens, seqs)
        skip = "skipped: see notes.compiled_prefill" if seqs > COMPILE_MAX_SEQS else None
        results["prefill"].append({"tokens": tokens, "seqs": seqs, **measure(
            "causal_conv1d_fn", call, nbytes, compiled_fn, skip)})
        write_json(JSON_NAME, results, out_dir)
    compiled_update = Compiled(mamba_ir.get_op("causal_conv1d_update").native, with_compiled)
    for batch in progress(BATCHES, "decode"):
        call, nbytes = decode_case(batch)
        results["decode"].append({"batch": batch, **measure(
            "causal_conv1d_update", call, nbytes, compiled_update)})
        write_json(JSON_NAME, results, out_dir)
    print(table(results))


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:9.1f}"


def _roof(row: dict[str, Any]) -> float:
    """The roof in GB/s (data measured before the copy-kernel roof has the memcpy only)."""
    return row.get("roof_GBps", row["copy_GBps"])


def table(results: dict[str, Any]) -> str:
    head = (f"{'case':<22}{'MB':>8}{'roof GB/s':>10}{'triton us':>10}{'GB/s':>7}{'% roof':>7}"
            f"{'native us':>11}{'compiled us':>12}")
    lines = [f"{results.get('environment', {}).get('device', '')}  "
             f"{results.get('environment', {}).get('date', '')}", head]
    cases = [(f"decode batch {r['batch']}", r) for r in results["decode"]]
    cases += [(f"prefill {r['tokens']} tok/{r['seqs']} seq", r) for r in results["prefill"]]
    for name, r in cases:
        gbps = r["bytes"] / r["triton_us"] / 1e3
        lines.append(f"{name:<22}{r['bytes'] / 1e6:8.2f}{_roof(r):10.0f}"
                     f"{r['triton_us']:10.1f}{gbps:7.0f}{100 * r['triton_frac']:6.0f}%"
                     f"{_us(r['native_us']):>11}{_us(r['compiled_us']):>12}")
    for r in results["prefill"]:
        if "variants_us" in r:
            best = min(r["variants_us"].items(), key=lambda kv: kv[1])
            lines.append(f"prefill {r['tokens']} tok/{r['seqs']} seq: tile "
                         f"{r['variants_us']['tile']:.1f} us, best {best[0]} {best[1]:.1f} us "
                         f"({100 * r['roof_us'] / best[1]:.0f}% roof)")
    return "\n".join(lines)


def plot(path: Path = DOCS / JSON_NAME) -> None:
    results = json.loads(path.read_text())
    env = results["environment"]
    where = f"{env.get('device', '?')}, {env['date']}"

    def gbps(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [r["bytes"] / r[key] / 1e3 if r.get(key) else float("nan") for r in rows]

    dec = results["decode"]
    label = ("copy roof (better of memcpy and copy kernel)" if "roof_GBps" in dec[0]
             else "device-to-device copy (memcpy)")
    plot_series(
        DOCS / "conv1d_bench_decode.png", [r["batch"] for r in dec],
        {"triton": gbps(dec, "triton_us"), "native (eager)": gbps(dec, "native_us"),
         "native (torch.compile)": gbps(dec, "compiled_us")},
        roof=[_roof(r) for r in dec], roof_label=label, xlabel="batch (one token per sequence)",
        ylabel="bytes moved / time (GB/s)",
        title=f"causal_conv1d_update, dim {DIM}, width {WIDTH}, bf16\n{where}",
    )
    pre = results["prefill"]
    tokens = sorted({r["tokens"] for r in pre})
    series: dict[str, list[float]] = {}
    for seqs in sorted({r["seqs"] for r in pre}):
        rows = [r for r in pre if r["seqs"] == seqs]
        series[f"triton, {seqs} seq"] = gbps(rows, "triton_us")
    mid = [r for r in pre if r["seqs"] == 8]
    series["native (eager), 8 seq"] = gbps(mid, "native_us")
    series["native (torch.compile), 8 seq"] = gbps(mid, "compiled_us")
    plot_series(
        DOCS / "conv1d_bench_prefill.png", tokens, series,
        roof=[_roof(r) for r in mid], roof_label=label, xlabel="total tokens",
        ylabel="bytes moved / time (GB/s)",
        title=f"causal_conv1d_fn, dim {DIM}, width {WIDTH}, bf16\n{where}",
    )
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="directory for the JSON")
    parser.add_argument("--sweep", action="store_true", help="also time tile configurations")
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the torch.compile baseline (it compiles for minutes)")
    parser.add_argument("--plot", action="store_true", help="plot the JSON instead of measuring")
    args = parser.parse_args()
    if args.plot:
        plot(args.out / JSON_NAME)
    else:
        run(args.out, args.sweep, not args.no_compiled)


if __name__ == "__main__":
    main()
