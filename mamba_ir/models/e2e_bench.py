"""End-to-end decode benchmark: a ~1B-parameter hybrid, compiled with CUDA graphs vs eager.

One decode step of the whole model per batch size, timed (median) three ways: eager with
every op native, and compiled (lowering + fusion passes, fastest providers) replayed from
a CUDA graph. The roof is the bytes a step must move at least -- every weight once, each
sequence's conv and SSM state read and written, the attention KV read up to the context
-- divided by the device-to-device copy rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .. import set_priority
from .cache import RESERVED_SLOTS, StateCache
from .config import bench_config
from .engine import _Steps, compile_step
from .loading import random_model

logger = logging.getLogger("mamba_ir")


def _common() -> Any:
    try:
        from benchmarks import common
    except ImportError as exc:  # the benchmark plumbing lives beside the package
        raise SystemExit("run `python -m mamba_ir bench` from the repository root") from exc
    return common


def step_bytes(model: torch.nn.Module, cache: StateCache, batch: int, context: int) -> int:
    """Bytes one decode step must move at least (reads + writes)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}
                  .values())
    states = 2 * batch * cache.state_bytes_per_slot()
    kv = 0
    for layer in cache.attention_layers:
        k, v = cache.kv(layer)
        per_token = k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size()
        kv += batch * per_token * (context + 1)  # read the context, write one token
    return weights + states + kv


# kernel name fragments -> what the time is spent on (first match wins)
_CATEGORIES = (
    ("selective_state_update", ("selective_state", "ssu")),
    ("causal_conv1d", ("conv1d", "conv_", "_update_kernel")),
    ("copy_state_blocks", ("copy_state",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90", "sm80", "cublas", "splitk", "gemv")),
    ("inductor fused", ("triton_",)),
)


def kernel_profile(fn: Any, reps: int = 10) -> dict[str, Any]:
    """GPU time per replay of ``fn`` captured in a CUDA graph, by category and top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    graph = _common().capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type == DeviceType.CUDA and evt.self_device_time_total > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + evt.self_device_time_total / reps
    by_category: dict[str, float] = {}
    for name, us in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in _CATEGORIES if any(k in low for k in keys)), "other")
        by_category[cat] = by_category.get(cat, 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"kernel_us_per_step": by_category, "top_kernels_us": dict(top)}


def _inputs(batch: int, context: int, vocab: int, device: torch.device) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(batch)
    return (
        torch.randint(0, vocab, (batch,), generator=g).to(device),
        torch.full((batch,), context, dtype=torch.int64, device=device),
        torch.arange(batch, device=device),
        # running slots: after the zero and scratch slots
        torch.arange(RESERVED_SLOTS, batch + RESERVED_SLOTS, dtype=torch.int32, device=device),
    )


def _measure(
    common: Any, steps: _Steps, compiled: Any, inputs: tuple, nbytes: int,
    profile: bool = False,
) -> dict[str, Any]:
    """One batch size: eager native, compiled (+CUDA graph) and the roof, in one row."""
    batch = inputs[0].shape[0]
    for t in inputs:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    rates = common.roof_rate(nbytes)
    roof_us = nbytes / rates["roof"] * 1e6
    row: dict[str, Any] = {"batch": batch, "bytes_per_step": nbytes, "roof_us": roof_us,
                           "copy_rate_GBps": {k: v / 1e9 for k, v in rates.items()}}
    with torch.inference_mode():
        with set_priority([]):
            row["eager_native_us"] = common.time_us(lambda: steps.decode(*inputs), graph=False)
        t1 = time.perf_counter()
        compiled(*inputs)
        row["first_call_s"] = time.perf_counter() - t1
        row["cuda_graph"] = True
        try:
            row["compiled_us"] = common.time_us(lambda: compiled(*inputs), graph=True)
        except Exception as exc:  # e.g. a provider that synchronises cannot be captured
            row["cuda_graph"] = False
            row["note"] = f"CUDA graph capture failed: {type(exc).__name__}: {exc}"
            torch.cuda.synchronize()
            row["compiled_us"] = common.time_us(lambda: compiled(*inputs), graph=False)
        if profile and row["cuda_graph"]:
            try:
                row["profile"] = kernel_profile(lambda: compiled(*inputs))
            except Exception as exc:  # the timing stands without the breakdown
                row["profile_error"] = f"{type(exc).__name__}: {exc}"
    for kind, us in (("eager", row["eager_native_us"]), ("compiled", row["compiled_us"]),
                     ("roof", roof_us)):
        row[f"{kind}_tok_s"] = batch / (us * 1e-6)
    row["compiled_roof_share"] = roof_us / row["compiled_us"]
    row["eager_roof_share"] = roof_us / row["eager_native_us"]
    return row


def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.plot_only:
        plot(out)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA device")
    common = _common()
    device = torch.device(args.device or "cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16
    config = bench_config()
    if args.layers:
        config = config.with_(num_layers=args.layers,
                              attn_layer_indices=tuple(i for i in config.attn_layer_indices
                                                       if i < args.layers))
    t0 = time.perf_counter()
    model = random_model(config, device=device, dtype=dtype)
    max_batch, max_len = max(args.batches), args.context + 1
    cache = StateCache(config, num_slots=max_batch + RESERVED_SLOTS, max_requests=max_batch,
                       max_len=max_len, device=device, dtype=dtype)
    with torch.no_grad():
        for buf in cache.buffers():
            buf.normal_(0, 0.1)
    steps = _Steps(model, cache)
    compiled = compile_step(steps.decode, args.priority)
    params = model.num_parameters()
    logger.info("model ready in %.1f s", time.perf_counter() - t0)
    print(f"{config.describe()}: {params / 1e9:.2f}B parameters, {dtype}, context "
          f"{args.context}")

    payload: dict[str, Any] = {
        "benchmark": "end-to-end decode step, random-init hybrid",
        "model": {"config": config.describe(), "parameters": params,
                  "dtype": str(dtype).removeprefix("torch."), "context": args.context},
        "roof": "bytes(weights + 2 x states + KV read/write) / best measured copy rate",
        "rows": [],
    }
    for batch in common.progress(args.batches, "e2e decode"):
        inputs = _inputs(batch, args.context, config.vocab_size, device)
        row = _measure(common, steps, compiled, inputs,
                       step_bytes(model, cache, batch, args.context), profile=args.profile)
        payload["rows"].append(row)
        payload["lowering"] = [s.to_dict() for s in compiled.lowering_report]
        path = common.write_json(out.name, payload, out.parent)  # kept after every batch
        print(f"\nbatch {batch:>3}: eager native {row['eager_native_us'] / 1e3:8.2f} ms "
              f"({row['eager_tok_s']:9.1f} tok/s), compiled"
              f"{' +graph' if row['cuda_graph'] else ''} {row['compiled_us'] / 1e3:8.2f} ms "
              f"({row['compiled_tok_s']:9.1f} tok/s), roof {row['roof_us'] / 1e3:6.2f} ms -> "
              f"{100 * row['compiled_roof_share']:.0f}% of roof", flush=True)
        for cat, us in sorted(row.get("profile", {}).get("kernel_us_per_step", {}).items(),
                              key=lambda kv: -kv[1]):
            print(f"    {cat:<24} {us:9.1f} us")
    print(f"wrote {path}")
    print("lowering report:")
    for site in compiled.lowering_report:
        print(f"  {site}")
    try:
        plot(path)
    except ImportError:
        print("matplotlib missing: plot later with `python -m mamba_ir bench --plot-only`")
    return 0


def plot(path: Path) -> Path:
    """Tokens/s per batch (compiled, eager, roof; log scale) from a benchmark JSON, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(path).read_text())
    rows, env = data["rows"], data.get("environment", {})
    x = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [r["compiled_tok_s"] for r in rows], marker="o", label="compiled + CUDA graph")
    ax.plot(x, [r["eager_tok_s"] for r in rows], marker="o", label="eager, native ops")
    ax.plot(x, [r["roof_tok_s"] for r in rows], linestyle="--", color="black",
            label="bytes-moved roof")
    for r in rows:
        ax.annotate(f"{100 * r['compiled_roof_share']:.0f}% of roof",
                    (r["batch"], r["compiled_tok_s"]), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences, one token each)")
    ax.set_ylabel("decode tokens/s")
    model = data["model"]
    ax.set_title(f"{model['parameters'] / 1e9:.2f}B hybrid ({model['dtype']}, context "
                 f"{model['context']}), {env.get('device', '?')}, {env.get('date', '')}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
