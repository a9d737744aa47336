"""mamba_chunk_scan prefill benchmark: the Triton chunked scan against today's prefill path.

Mamba2 shapes (nheads=128, headdim=64, dstate=128, ngroups=8, chunk 256, bf16 inputs and
state; x, B, C, z and dt are column slices of one projection, as the model passes them),
2,048 / 8,192 / 32,768 tokens split evenly over 1, 8 and 64 sequences, timed as CUDA-graph
replays, in two forms: gated by ``silu(z)`` inside the op, and without ``z`` as the hybrid
model (``mamba_ir/models/mixer.py``) and vLLM's Mamba2 mixer call it (their gated RMSNorm
applies the gate after the scan). The path it replaces is the multi-token varlen
``selective_state_update`` (Triton provider) with dt, A, D and dt_bias tied over headdim,
gated.

Achieved rates are against peaks measured in the same run: TFLOP/s counts the tensor-core
products the kernels execute (causal blocks skipped), against a dense bf16 GEMM
(8192^3, torch.matmul); bytes/s counts what the op must move (x, z, B, C, dt read, out
written, each sequence's state row read and written), against a device copy of as many
bytes. ``--sweep`` also times a grid of launch configurations.

    python -m benchmarks.chunk_scan [--sweep] [--out DIR]        # on the GPU machine
    python -m benchmarks.chunk_scan --plot docs/chunk_scan_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DOCS, progress, roof_rate, time_us, write_json
from benchmarks.common import table as common_table

NHEADS, HEADDIM, DSTATE, NGROUPS, CHUNK = 128, 64, 128, 8, 256
TOKENS = (2048, 8192, 32768)
SEQS = (1, 8, 64)
# vLLM's mamba_chunk_scan_combined_varlen (chunk 256, with its gather of initial states and
# scatter of final states), quoted from issue 10, measured 2026-11-23 on an H100; not
# re-measured here (vLLM does not install on the benchmark machine).
VLLM_US = {(2048, 1): 183.0, (8192, 1): 590.0}
SWEEP_CASES = ((2048, 1), (2048, 8), (8192, 1), (8192, 8), (32768, 64))
GOAL_US = {(2048, 1): 146.0, (8192, 1): 472.0, (2048, 8): 188.0, (8192, 8): 514.0}


def make_call(ntok: int, nseq: int, *, seed: int = 0, device: str = "cuda") -> dict[str, Any]:
    """A prefill call in the model's layout: slices of one in_proj output, a state cache of
    2 x nseq rows read and written in place at random rows."""
    g = torch.Generator(device=device).manual_seed(seed)
    bf16, dev = torch.bfloat16, device
    inner, conv = NHEADS * HEADDIM, NHEADS * HEADDIM + 2 * NGROUPS * DSTATE
    proj = (torch.randn(ntok, inner + conv + NHEADS, generator=g, device=dev)).to(bf16)
    z, xbc, dt = proj.split([inner, conv, NHEADS], dim=-1)
    x, B, C = xbc.split([inner, NGROUPS * DSTATE, NGROUPS * DSTATE], dim=-1)
    lengths = [ntok // nseq] * nseq
    lengths[-1] += ntok - sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=dev)
    state = (torch.randn(2 * nseq, NHEADS, HEADDIM, DSTATE, generator=g, device=dev) * 0.5)
    rows = torch.randperm(2 * nseq, generator=g, device=dev)[:nseq].to(torch.int32)
    return dict(
        state=state.to(bf16),
        x=x.unflatten(-1, (NHEADS, HEADDIM)),
        dt=dt,
        A=-torch.rand(NHEADS, generator=g, device=dev) - 0.5,
        B=B.unflatten(-1, (NGROUPS, DSTATE)),
        C=C.unflatten(-1, (NGROUPS, DSTATE)),
        chunk_size=CHUNK,
        cu_seqlens=cu,
        D=torch.randn(NHEADS, generator=g, device=dev),
        z=z.unflatten(-1, (NHEADS, HEADDIM)),
        dt_bias=torch.rand(NHEADS, generator=g, device=dev) - 4.0,
        dt_softplus=True,
        state_batch_indices=rows,
        pad_slot_id=-1,
        out=torch.empty(ntok, NHEADS, HEADDIM, dtype=bf16, device=dev),
    )


def ssu_args(call: dict[str, Any]) -> dict[str, Any]:
    """The same step as today's prefill: multi-token varlen selective_state_update."""
    n = call["x"].shape[0]
    return dict(
        state=call["state"],
        x=call["x"],
        dt=call["dt"][..., None].expand(n, NHEADS, HEADDIM),
        A=call["A"][:, None, None].expand(NHEADS, HEADDIM, DSTATE),
        B=call["B"],
        C=call["C"],
        D=call["D"][:, None].expand(NHEADS, HEADDIM),
        z=call["z"],
        dt_bias=call["dt_bias"][:, None].expand(NHEADS, HEADDIM),
        dt_softplus=True,
        state_batch_indices=call["state_batch_indices"],
        pad_slot_id=-1,
        cu_seqlens=call["cu_seqlens"],
        out=call["out"],
    )


def chunk_lengths(ntok: int, nseq: int) -> list[int]:
    base = [ntok // nseq] * nseq
    base[-1] += ntok - sum(base)
    return [min(CHUNK, n - i) for n in base for i in range(0, n, CHUNK)]


def executed_flops(ntok: int, nseq: int, cfg: Any) -> float:
    """Tensor-core FLOPs the two kernels execute (per head; causal blocks skipped)."""
    bm, bk = cfg.scan_block_m, cfg.scan_block_k
    total = 0.0
    for length in chunk_lengths(ntok, nseq):
        total += 2 * length * HEADDIM * DSTATE  # chunk state: x^T (B * weights)
        for m0 in range(0, length, bm):
            rows = min(bm, length - m0)
            total += 2 * rows * DSTATE * HEADDIM  # C @ H_in^T
            cols = math.ceil(min(m0 + bm, length) / bk) * bk
            total += 2 * rows * cols * (DSTATE + HEADDIM)  # C B^T, then (.) @ x
    return total * NHEADS


def op_bytes(ntok: int, nseq: int, gated: bool = True) -> int:
    """Bytes the op must move: inputs read once, output written, state rows read + written."""
    tiles = 3 if gated else 2  # x, out (and z)
    per_tok = 2 * (tiles * NHEADS * HEADDIM + 2 * NGROUPS * DSTATE + NHEADS)  # + B, C, dt
    return ntok * per_tok + 2 * nseq * NHEADS * HEADDIM * DSTATE * 2


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    us = time_us(lambda: torch.matmul(a, b, out=c))
    return 2 * 8192**3 / (us * 1e-6) / 1e12


def kernel_times(fn: Any) -> dict[str, float]:
    """Mean device time per launch of each kernel in ``fn``, from the profiler (eager)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return {
        e.key: e.device_time_total / e.count
        for e in prof.key_averages()
        if "kernel" in e.key and e.count
    }


def sweep_configs() -> list[Any]:
    from mamba_ir.impls.triton.mamba_chunk_scan import Config

    base = Config()
    variants = [
        # the launch choices of the versions before, each undone: D x in the epilogue,
        # 64-token steps on the diagonal block, one-chunk sequences through the state pass
        dict(scan_d_diag=False),
        dict(scan_diag_k=64),
        dict(single_chunk_pass=False),
        # around the default (2026-11-23): each slower when last measured
        dict(scan_maxnreg=112),
        dict(scan_block_k=32),
        dict(scan_stages=2),
        dict(scan_block_m=128, scan_warps=8),
        dict(dt_block_h=16),
    ]
    return [base] + [Config(**{**asdict(base), **v}) for v in variants]


def config_key(cfg: Any) -> str:
    """The fields that differ from the default Config (``default`` if none)."""
    from mamba_ir.impls.triton.mamba_chunk_scan import Config

    base = asdict(Config())
    diff = [f"{k}={v}" for k, v in asdict(cfg).items() if base[k] != v]
    return ",".join(diff) or "default"


def measure(ntok: int, nseq: int, sweep: bool) -> dict[str, Any]:
    from mamba_ir.impls.triton.mamba_chunk_scan import default_config
    from mamba_ir.impls.triton.mamba_chunk_scan import mamba_chunk_scan as scan
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as ssu

    call = make_call(ntok, nseq)
    cfg = default_config(HEADDIM, DSTATE, CHUNK)
    nbytes = op_bytes(ntok, nseq)
    row: dict[str, Any] = {"tokens": ntok, "seqs": nseq, "bytes": nbytes}
    row.update({f"{k}_tbs": v / 1e12 for k, v in roof_rate(nbytes).items()})
    row["triton_us"] = time_us(lambda: scan(**call))
    row["ssu_us"] = time_us(lambda: ssu(**ssu_args(call)), reps=50 if ntok > 8192 else 100)
    row["flops"] = executed_flops(ntok, nseq, cfg)
    row["triton_tflops"] = row["flops"] / (row["triton_us"] * 1e-6) / 1e12
    row["triton_tbs"] = nbytes / (row["triton_us"] * 1e-6) / 1e12
    row["triton_vs_roof"] = row["triton_tbs"] / row["roof_tbs"]
    row["speedup_vs_ssu"] = row["ssu_us"] / row["triton_us"]
    if (ntok, nseq) in VLLM_US:
        row["vllm_quoted_us"] = VLLM_US[(ntok, nseq)]
    if (ntok, nseq) in GOAL_US:
        row["goal_us"] = GOAL_US[(ntok, nseq)]
    row["kernels_us"] = kernel_times(lambda: scan(**call))
    plain = {**call, "z": None}  # the same inputs, as the model calls the op
    row["model_us"] = time_us(lambda: scan(**plain))
    row["model_tbs"] = op_bytes(ntok, nseq, gated=False) / (row["model_us"] * 1e-6) / 1e12
    row["model_kernels_us"] = kernel_times(lambda: scan(**plain))
    if sweep and (ntok, nseq) in SWEEP_CASES:
        row["sweep"] = {}
        for c in sweep_configs():
            try:
                row["sweep"][config_key(c)] = time_us(lambda c=c: scan(**call, config=c))
                print(f"sweep {ntok}x{nseq} {config_key(c)}: {row['sweep'][config_key(c)]:.1f} us",
                      flush=True)
            except Exception as exc:  # a config that does not compile: say so, go on
                row.setdefault("sweep_errors", {})[config_key(c)] = f"{exc}"[:200]
    return row


def agreement() -> dict[str, float]:
    """Max |difference| of Triton against native (fp32 per-token loop) on one call."""
    from mamba_ir import get_op
    from mamba_ir.impls.triton.mamba_chunk_scan import mamba_chunk_scan as scan

    base = make_call(2048, 8, seed=1)
    got = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    scan(**got)
    get_op("mamba_chunk_scan").native(**ref)
    rows = base["state_batch_indices"].long()
    return {
        "out_max_abs": (got["out"].float() - ref["out"].float()).abs().max().item(),
        "out_max_abs_ref": ref["out"].float().abs().max().item(),
        "state_max_abs": (got["state"][rows].float() - ref["state"][rows].float())
        .abs().max().item(),
    }


COLUMNS = [
    ("tokens", "tokens", "{:>6}"),
    ("seqs", "seqs", "{:>4}"),
    ("triton_us", "triton us", "{:>9.1f}"),
    ("model_us", "no-z us", "{:>7.1f}"),
    ("goal_us", "goal us", "{:>7.0f}"),
    ("vllm_quoted_us", "vLLM us*", "{:>8.0f}"),
    ("ssu_us", "ssu us", "{:>8.0f}"),
    ("speedup_vs_ssu", "x ssu", "{:>5.1f}"),
    ("triton_tflops", "TFLOP/s", "{:>7.0f}"),
    ("triton_tbs", "TB/s", "{:>5.2f}"),
    ("triton_vs_roof", "%copy", "{:>6.1%}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    return common_table(rows, COLUMNS)


def plot(json_path: Path) -> Path:
    """Time against tokens, one line per (provider, sequences); vLLM's quoted points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows, env = data["rows"], data["environment"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for nseq, marker in zip(SEQS, "osd", strict=True):
        sel = [r for r in rows if r["seqs"] == nseq]
        x = [r["tokens"] for r in sel]
        ax.plot(x, [r["triton_us"] for r in sel], marker=marker, color="tab:blue",
                label=f"triton mamba_chunk_scan, {nseq} seq")
        if all("model_us" in r for r in sel):
            ax.plot(x, [r["model_us"] for r in sel], marker=marker, color="tab:cyan",
                    linestyle="--", label=f"the same without z (the model's call), {nseq} seq")
        ax.plot(x, [r["ssu_us"] for r in sel], marker=marker, color="tab:red", alpha=0.6,
                linestyle=":", label=f"multi-token SSU (today), {nseq} seq")
    vx = sorted(VLLM_US)
    ax.scatter([t for t, _ in vx], [VLLM_US[k] for k in vx], marker="x", color="black",
               zorder=5, label="vLLM, 1 seq (quoted, not re-measured)")
    gx = sorted(GOAL_US)
    ax.scatter([t for t, _ in gx], [GOAL_US[k] for k in gx], marker="_", s=200,
               color="tab:green", zorder=5, label="goal (1.25x vLLM)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the call")
    ax.set_ylabel("time per call (us, CUDA graph)")
    ax.set_title(f"Mamba2 prefill scan, bf16, 128 heads x 64 x 128, chunk 256\n"
                 f"{env.get('device', '?')}, {env['date']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    path = json_path.with_suffix(".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configs")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory for the JSON")
    parser.add_argument("--plot", type=Path, help="only draw the PNG from this JSON")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    from mamba_ir.impls.triton.mamba_chunk_scan import default_config

    peak = gemm_tflops()
    cases = [(t, s) for t in TOKENS for s in SEQS]
    rows = [measure(t, s, args.sweep) for t, s in progress(cases, "chunk scan")]
    for row in rows:
        row["triton_vs_gemm"] = row["triton_tflops"] / peak
    print(f"dense bf16 GEMM peak: {peak:.0f} TFLOP/s")
    print(table(rows))
    print("* quoted, not re-measured")
    if args.sweep:
        for row in [r for r in rows if "sweep" in r]:
            best = sorted(row["sweep"].items(), key=lambda kv: kv[1])[:3]
            print(row.get("sweep_errors", ""))
            print(row["tokens"], row["seqs"], "  ".join(f"{k}: {v:.1f}us" for k, v in best))
    check = agreement()
    print("agreement with native:", check)
    payload = {
        "shapes": dict(nheads=NHEADS, headdim=HEADDIM, dstate=DSTATE, ngroups=NGROUPS,
                       chunk_size=CHUNK, inputs="bfloat16 column slices of one projection",
                       state="bfloat16", A="float32 (nheads,)", D="float32 (nheads,)",
                       dt_bias="float32 (nheads,)", dt_softplus=True,
                       z="triton_us: given; model_us: None (the model's call)"),
        "gemm_bf16_tflops": peak,
        "vllm_quoted_us": {f"{t}x{s}": v for (t, s), v in VLLM_US.items()},
        "goal_us": {f"{t}x{s}": v for (t, s), v in GOAL_US.items()},
        "default_config": config_key(default_config(HEADDIM, DSTATE, CHUNK)),
        "agreement": check,
        "rows": rows,
    }
    path = write_json("chunk_scan_bench.json", payload, args.out)
    print(path)
    print(plot(path))


if __name__ == "__main__":
    main()
