"""Serving benchmark of the bench hybrid: time to first token by prompt length, decode by context.

Prefill: one prompt at a time through the compiled :class:`Engine` (token-budget steps,
align-mode checkpoints every block, cold prefix cache), timed from ``generate`` to the
first token on the host; tokens/s is the prompt length over that time. Each length runs
twice: launching the compiled step from Python, and replaying it from the CUDA graph
captured for its padded size (``prefill_graphs``). One further run per length under the
profiler gives the GPU time by kernel category.

Decode: one compiled decode step replayed from a CUDA graph at each (context, batch),
against the bytes roof of :func:`benchmarks.hybrid.step_bytes` (weights, states read and
written, the KV of every context read), with its kernel-time breakdown.

``mamba-ir bench --prefill`` (mamba_ir/cli.py) runs it from a clone of the repository.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, hybrid
from mamba_ir.models import Engine
from mamba_ir.models.cache import RESERVED_SLOTS

# kernel name fragments -> category (first match wins)
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    # the providers' kernel names (tests/test_benchmarks.py checks every one lands here)
    ("scan", ("chunk_", "state_pass", "ssd", "selective_state", "ssu", "scan_kernel",
              "replay")),
    ("conv", ("conv1d", "conv_", "stream_kernel", "tile_kernel", "final_window_kernel",
              "update_kernel")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "splitk", "gemv",
              "xmma")),
)


def gpu_time(fn: Any) -> dict[str, Any]:
    """GPU time of one ``fn()`` (ms) by category and the top kernels, from the profiler."""
    kernels = {name: us / 1e3 for name, us in common.kernel_times(fn).items()}
    by_category = common.by_category(kernels, CATEGORIES)
    total = sum(by_category.values())
    return {"gpu_ms": total, "gpu_ms_by_category": by_category,
            "share_by_category": {c: ms / total for c, ms in by_category.items()} if total else {},
            "top_kernels_ms": common.top(kernels, 10)}


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def _first_token(engine: Engine, prompt: list[int]) -> None:
    engine.reset()  # cold: no checkpoint of an earlier run is reused
    engine.generate([prompt], 1)  # ends with the logits' argmax on the host


def _ttft(engine: Engine, prompt: list[int], reps: int, graphs: bool) -> tuple[list, float]:
    """Host times to the first token (s) and the time of the first (compiling) run."""
    engine.prefill_graphs = graphs
    t0 = time.perf_counter()
    _first_token(engine, prompt)  # compiles (or captures) on first use; later lengths reuse
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _first_token(engine, prompt)
        times.append(time.perf_counter() - t0)
    return times, warm_s


def measure_prefill(engine: Engine, length: int, reps: int) -> dict[str, Any]:
    """TTFT launching the compiled step from Python and replaying its CUDA graph (one
    per padded size), and the GPU time by category of the former."""
    prompt = _prompt(length, engine.model.config.vocab_size, length)
    times, warm_s = _ttft(engine, prompt, reps, graphs=False)
    ttft = statistics.median(times)
    row = {"tokens": length, "ttft_ms": ttft * 1e3, "ttft_ms_all": [t * 1e3 for t in times],
           "prefill_tok_s": length / ttft, "steps": engine.stats.prefill_steps,
           "checkpoints": engine.prefix.stats.saved, "first_call_s": warm_s}
    row.update(gpu_time(lambda: _first_token(engine, prompt)))
    graph_times, capture_s = _ttft(engine, prompt, reps, graphs=True)
    graph_ttft = statistics.median(graph_times)
    row.update({"graph_ttft_ms": graph_ttft * 1e3,
                "graph_ttft_ms_all": [t * 1e3 for t in graph_times],
                "graph_prefill_tok_s": length / graph_ttft, "graph_first_call_s": capture_s})
    engine.prefill_graphs = False
    return row


def measure_decode(engine: Engine, context: int, batch: int) -> dict[str, Any]:
    inputs = hybrid.decode_batch(engine.model, batch, context)
    roof = hybrid.decode_roof(engine.model, engine.cache, batch, context)
    step = lambda: engine.decode_step(*inputs)  # noqa: E731
    with torch.inference_mode():
        us = common.time_us(step, graph=True)
        profile = gpu_time(common.capture(step).replay)
    roof_us = roof["roof_us"]
    return {"context": context, "batch": batch, "step_us": us, "tok_s": batch / (us * 1e-6),
            **roof, "roof_tok_s": batch / (roof_us * 1e-6), "x_roof": us / roof_us, **profile}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.plot_only:
        plot(out)
        return 0
    model = hybrid.model_from_args(args)
    config, dtype = model.config, hybrid.dtype_name(model)
    lengths, contexts, batches = args.lengths, args.contexts, args.batches
    max_len = max(max(lengths), max(contexts)) + 8
    block = args.block_size
    engine = Engine(
        model, block_size=block, max_requests=max(batches), max_len=max_len,
        num_slots=RESERVED_SLOTS + max(batches) + max_len // block + 8, compile=True,
        priority=args.priority, record_logits=False, prefill_tokens=args.prefill_tokens,
        state_dtype=args.state_dtype,
        state_rounding=args.state_rounding, **hybrid.decode_options(args),
    )
    state = hybrid.state_dtype_name(engine.cache)
    print(f"{config.describe()}: {model.num_parameters() / 1e9:.2f}B parameters, {dtype}, "
          f"{state} SSM state, block {block}, {args.prefill_tokens} tokens per prefill step")
    payload: dict[str, Any] = {
        "benchmark": "time to first token and decode, compiled random-init hybrid",
        "model": {"config": config.describe(), "parameters": model.num_parameters(),
                  "dtype": dtype, "state_dtype": state,
                  "decode": hybrid.decode_name(engine.cache), "block_size": block,
                  "prefill_tokens_per_step": args.prefill_tokens},
        "prefill": [], "decode": [],
    }
    for length in common.progress(lengths, "prefill"):
        row = measure_prefill(engine, length, args.reps)
        payload["prefill"].append(row)
        common.write_json(out.name, payload, out.parent)
        cats = ", ".join(f"{c} {ms:.1f}" for c, ms in row["gpu_ms_by_category"].items())
        print(f"\nprefill {length:>6}: TTFT {row['ttft_ms']:8.1f} ms "
              f"({row['prefill_tok_s']:9.0f} tok/s, {row['steps']} steps), with CUDA graphs "
              f"{row['graph_ttft_ms']:8.1f} ms ({row['graph_prefill_tok_s']:9.0f} tok/s); GPU "
              f"{row['gpu_ms']:.1f} ms: {cats}", flush=True)
    for context in contexts:
        for batch in batches:
            row = measure_decode(engine, context, batch)
            payload["decode"].append(row)
            common.write_json(out.name, payload, out.parent)
            print(f"decode context {context:>5} batch {batch:>3}: {row['step_us'] / 1e3:.2f} ms"
                  f" ({row['tok_s']:9.0f} tok/s), roof {row['roof_us'] / 1e3:.2f} ms -> "
                  f"{row['x_roof']:.2f}x roof; attention "
                  f"{row['gpu_ms_by_category']['attention']:.2f} ms", flush=True)
    payload["lowering"] = [s.to_dict() for s in engine.lowering_report()]
    path = common.write_json(out.name, payload, out.parent)
    print(f"wrote {path}")
    common.plot_or_hint(plot, path)
    return 0


def plot(path: Path) -> Path:
    """TTFT with its GPU time by category per prompt length, and decode against the roof."""
    plt = common.pyplot()
    data = json.loads(Path(path).read_text())
    env, pre, dec = data.get("environment", {}), data["prefill"], data["decode"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['tokens']}\nTTFT {r['ttft_ms']:.0f} ms\n(graphs {r['graph_ttft_ms']:.0f} ms)"
              f"\nGPU {r['gpu_ms']:.0f} ms" for r in pre]
    bottom = [0.0] * len(pre)
    for cat in [c for c, _ in CATEGORIES] + ["other"]:
        share = [100 * r["gpu_ms_by_category"].get(cat, 0.0) / r["gpu_ms"] for r in pre]
        bars = left.bar(labels, share, bottom=bottom, label=cat)
        for bar, value, base in zip(bars, share, bottom, strict=True):
            if value >= 4:
                left.text(bar.get_x() + bar.get_width() / 2, base + value / 2, f"{value:.0f}%",
                          ha="center", va="center", fontsize=7)
        bottom = [b + v for b, v in zip(bottom, share, strict=True)]
    left.set_ylim(0, 100)
    left.set_xlabel("prompt tokens (one request, cold cache)")
    left.set_ylabel("% of prefill GPU time")
    left.set_title("prefill: GPU time by kernel category", fontsize=10)
    left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for context in sorted({r["context"] for r in dec}):
        rows = [r for r in dec if r["context"] == context]
        x = [r["batch"] for r in rows]
        line = right.plot(x, [r["tok_s"] for r in rows], marker="o",
                          label=f"compiled + CUDA graph, context {context}")[0]
        right.plot(x, [r["roof_tok_s"] for r in rows], linestyle="--", color=line.get_color(),
                   label=f"bytes roof, context {context}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("batch (sequences, one token each)")
    right.set_ylabel("decode tokens/s")
    right.set_title("decode", fontsize=10)
    right.legend(fontsize=8)
    model = data["model"]
    fig.suptitle(f"{model['parameters'] / 1e9:.2f}B hybrid ({model['dtype']}), "
                 f"{env.get('device', '?')}, {env.get('date', '')}", fontsize=10)
    return common.save_figure(fig, Path(path).with_suffix(".png"))
