"""End-to-end decode benchmark: a ~1B-parameter hybrid, compiled with CUDA graphs vs eager.

One decode step of the whole model per batch size, timed (median) two ways: eager with
every op native, and compiled (lowering + fusion passes, fastest providers) replayed from
a CUDA graph. The roof is the bytes a step must move at least -- every weight once, each
sequence's conv and SSM state read and written (under replay decode the checkpoint read,
the ring's entries and the flush, averaged over a ring cycle), the attention KV read up to
the context -- divided by the device-to-device copy rate measured in the same run.

``mamba-ir bench`` (mamba_ir/cli.py) runs it from a clone of the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, hybrid
from mamba_ir import set_priority
from mamba_ir.models import Engine
from mamba_ir.models.cache import RESERVED_SLOTS

logger = logging.getLogger("mamba_ir")

# kernel name fragments -> what the time is spent on (first match wins)
CATEGORIES = (
    ("selective_state_update", ("selective_state", "ssu")),
    ("causal_conv1d", ("conv1d", "conv_", "update_kernel")),
    ("copy_state_blocks", ("copy_state",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90", "sm80", "cublas", "splitk", "gemv")),
    ("inductor fused", ("triton_",)),
)


def kernel_profile(fn: Any, reps: int = 10) -> dict[str, Any]:
    """GPU time per replay of ``fn`` captured in a CUDA graph, by category and top kernels."""
    graph = common.capture(fn)
    graph.replay()
    kernels = common.kernel_times(graph.replay, reps)
    return {"kernel_us_per_step": common.by_category(kernels, CATEGORIES),
            "top_kernels_us": common.top(kernels, 12)}


def measure(engine: Engine, inputs: tuple, context: int, profile: bool = False
            ) -> dict[str, Any]:
    """One batch size: eager native, compiled (+CUDA graph) and the roof, in one row."""
    batch = inputs[0].shape[0]
    row: dict[str, Any] = {"batch": batch,
                           **hybrid.decode_roof(engine.model, engine.cache, batch, context)}
    roof_us = row["roof_us"]
    compiled = lambda: engine.decode_step(*inputs)  # noqa: E731
    with torch.inference_mode():
        with set_priority([]):
            row["eager_native_us"] = common.time_us(lambda: engine.steps.decode(*inputs),
                                                    graph=False)
        t1 = time.perf_counter()
        compiled()
        row["first_call_s"] = time.perf_counter() - t1
        row["cuda_graph"] = True
        try:
            row["compiled_us"] = common.time_us(compiled, graph=True)
        except Exception as exc:  # e.g. a provider that synchronises cannot be captured
            row["cuda_graph"] = False
            row["note"] = f"CUDA graph capture failed: {type(exc).__name__}: {exc}"
            torch.cuda.synchronize()
            row["compiled_us"] = common.time_us(compiled, graph=False)
        if profile and row["cuda_graph"]:
            try:
                row["profile"] = kernel_profile(compiled)
            except Exception as exc:  # the timing stands without the breakdown
                row["profile_error"] = f"{type(exc).__name__}: {exc}"
    for kind, us in (("eager", row["eager_native_us"]), ("compiled", row["compiled_us"]),
                     ("roof", roof_us)):
        row[f"{kind}_tok_s"] = batch / (us * 1e-6)
    row["compiled_roof_share"] = roof_us / row["compiled_us"]
    row["eager_roof_share"] = roof_us / row["eager_native_us"]
    return row


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.plot_only:
        plot(out)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA device")
    t0 = time.perf_counter()
    model = hybrid.model_from_args(args)
    max_batch = max(args.batches)
    engine = Engine(model, max_requests=max_batch, max_len=args.context + 1,
                    num_slots=max_batch + RESERVED_SLOTS, compile=True, priority=args.priority,
                    state_dtype=args.state_dtype,
                    state_rounding=args.state_rounding, **hybrid.decode_options(args))
    hybrid.random_states(engine.cache)
    config, params, dtype = model.config, model.num_parameters(), hybrid.dtype_name(model)
    state = hybrid.state_dtype_name(engine.cache)
    logger.info("model ready in %.1f s", time.perf_counter() - t0)
    print(f"{config.describe()}: {params / 1e9:.2f}B parameters, {dtype}, {state} SSM state, "
          f"{hybrid.decode_name(engine.cache)} decode, context {args.context}")

    payload: dict[str, Any] = {
        "benchmark": "end-to-end decode step, random-init hybrid",
        "model": {"config": config.describe(), "parameters": params, "dtype": dtype,
                  "state_dtype": state, "decode": hybrid.decode_name(engine.cache),
                  "context": args.context},
        "roof": "bytes(weights + 2 x states + KV read/write) / best measured copy rate",
        "rows": [],
    }
    for batch in common.progress(args.batches, "e2e decode"):
        inputs = hybrid.decode_batch(model, batch, args.context)
        row = measure(engine, inputs, args.context, profile=args.profile)
        payload["rows"].append(row)
        payload["lowering"] = [s.to_dict() for s in engine.lowering_report()]
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
    for site in engine.lowering_report():
        print(f"  {site}")
    common.plot_or_hint(plot, path)
    return 0


def plot(path: Path) -> Path:
    """Tokens/s per batch (compiled, eager, roof; log scale) from a benchmark JSON, as PNG."""
    plt = common.pyplot()
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
    return common.save_figure(fig, Path(path).with_suffix(".png"))
