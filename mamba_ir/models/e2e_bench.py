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
from .cache import StateCache
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


def _inputs(batch: int, context: int, vocab: int, device: torch.device) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(batch)
    return (
        torch.randint(0, vocab, (batch,), generator=g).to(device),
        torch.full((batch,), context, dtype=torch.int64, device=device),
        torch.arange(batch, device=device),
        torch.arange(1, batch + 1, dtype=torch.int32, device=device),
    )


def _measure(
    common: Any, steps: _Steps, compiled: Any, inputs: tuple, nbytes: int
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
    cache = StateCache(config, num_slots=max_batch + 1, max_requests=max_batch,
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
        row = _measure(common, steps, compiled, inputs, step_bytes(model, cache, batch,
                                                                    args.context))
        payload["rows"].append(row)
        payload["lowering"] = [s.to_dict() for s in compiled.lowering_report]
        path = common.write_json(out.name, payload, out.parent)  # kept after every batch
        print(f"\nbatch {batch:>3}: eager native {row['eager_native_us'] / 1e3:8.2f} ms "
              f"({row['eager_tok_s']:9.1f} tok/s), compiled"
              f"{' +graph' if row['cuda_graph'] else ''} {row['compiled_us'] / 1e3:8.2f} ms "
              f"({row['compiled_tok_s']:9.1f} tok/s), roof {row['roof_us'] / 1e3:6.2f} ms -> "
              f"{100 * row['compiled_roof_share']:.0f}% of roof", flush=True)
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
    """Tokens/s per batch (compiled, eager, roof) from a benchmark JSON, beside it as PNG."""
    common = _common()
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    env = data.get("environment", {})
    x = [r["batch"] for r in rows]
    png = Path(path).with_suffix(".png")
    common.plot_series(
        png, x,
        {"compiled (+CUDA graph)": [r["compiled_tok_s"] for r in rows],
         "eager native": [r["eager_tok_s"] for r in rows]},
        roof=[r["roof_tok_s"] for r in rows],
        roof_label="bytes-moved roof",
        xlabel="batch size",
        ylabel="decode tokens/s",
        title=f"{data['model']['config'].split(':')[0]} ~{data['model']['parameters'] / 1e9:.1f}B "
              f"decode, {env.get('device', '?')}, {env.get('date', '')}",
    )
    return png
