"""transformers ``generate()`` on a random-init ~1.2B Bamba: its own path against the same
model patched onto the IR ops and compiled.

    python -m benchmarks.hf_generate           # GPU, bf16: 2,048-token prompt, 256 new tokens
    python -m benchmarks.hf_generate --tiny    # CPU smoke run at a tiny size (JSON with --out)

Variants, one model, in one run, in this order:

- ``transformers``: the model as loaded, without mamba_ssm/causal_conv1d (transformers'
  torch path), with its default ``DynamicCache``: what ``generate()`` does out of the box;
- ``patched+compiled``: after ``mamba_ir.integrations.transformers.patch(model)``,
  ``model.forward = mamba_ir.compile(model.forward, mode=...)`` (CUDA graphs by default)
  with a ``StaticCache`` reused across calls (static shapes: one decode graph). The
  cache's states are allocated by one eager call before compiling, so the graphs only read
  and write them;
- ``patched``: the patched model, eager (default ``DynamicCache``).

Each variant generates greedily (``min_new_tokens == max_new_tokens``: always the full
count) after a warm-up call that compiles what it needs; ``generate_s`` is one timed call,
``prefill_s`` a timed call generating one token; decode tokens/s divides the other tokens
by the difference. Weights are random, so tokens are meaningless; ``matching_tokens`` says
how many leading tokens a variant shares with ``transformers`` (bf16 rounding may make
random-weight argmaxes diverge).
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DOCS, write_json

JSON = "hf_generate.json"
PLOT = "hf_generate.png"


def bamba_config(tiny: bool) -> Any:
    """The shape of the project's own end-to-end benchmark model (``bench_config``)."""
    from transformers import BambaConfig

    if tiny:
        return BambaConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=3, attn_layer_indices=[1],
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
            mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, pad_token_id=0,
        )
    return BambaConfig(
        vocab_size=32768, hidden_size=2048, num_hidden_layers=24, attn_layer_indices=[5, 11, 17],
        num_attention_heads=16, num_key_value_heads=4, intermediate_size=3072,
        mamba_n_heads=64, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=256, pad_token_id=0, max_position_embeddings=8192,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate(model: Any, ids: torch.Tensor, new: int, cache: Any = None) -> tuple[float, Any]:
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=new,
        max_new_tokens=new, pad_token_id=0,
    )
    if cache is not None:
        cache.reset()
        # our compiled forward, not generate()'s own compile of a static-cache model
        kwargs.update(past_key_values=cache, disable_compile=True)
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    _sync(ids.device)
    return time.perf_counter() - start, out[:, ids.shape[1]:]


def measure(
    name: str, model: Any, ids: torch.Tensor, new: int, cache: Any = None
) -> tuple[dict, torch.Tensor]:
    """Warm-up, then one timed 1-token and one timed ``new``-token generate()."""
    t0 = time.perf_counter()
    # compiles the prefill and decode graphs if any; CUDA graphs are recorded on a graph's
    # second run, so a second warm-up keeps the recording out of the timed calls
    for _ in range(2):
        _generate(model, ids, min(new, 3), cache)
    warm = time.perf_counter() - t0
    prefill, _ = _generate(model, ids, 1, cache)
    total, tokens = _generate(model, ids, new, cache)
    batch = ids.shape[0]
    row = {
        "variant": name,
        "warmup_s": round(warm, 2),
        "prefill_s": round(prefill, 4),
        "generate_s": round(total, 4),
        "tokens_per_s": round(batch * new / total, 1),
        "decode_tokens_per_s": round(batch * (new - 1) / max(total - prefill, 1e-9), 1),
    }
    print(f"{name:>18}: {row['tokens_per_s']:9.1f} tok/s generate, "
          f"{row['decode_tokens_per_s']:9.1f} tok/s decode, prefill {prefill:.3f} s "
          f"(warm-up {warm:.1f} s)", flush=True)
    return row, tokens


def eager_providers(model: Any, ids: torch.Tensor) -> list[str]:
    """The provider each eager op call chose (and why better-ranked ones refused) over a
    short generate(): the ``mamba_ir`` logger's DEBUG records."""
    import logging

    seen: set[str] = set()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.add(record.getMessage().removeprefix("eager "))

    log, keep = logging.getLogger("mamba_ir"), Keep()
    level = log.level
    log.addHandler(keep)
    log.setLevel(logging.DEBUG)
    try:
        _generate(model, ids[:, :64], 2)
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
    return sorted(seen)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model, JSON only to --out")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (2048)")
    parser.add_argument("--new", type=int, default=None, help="generated tokens (256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", default=None,
                        help="Inductor mode of the compiled variant (reduce-overhead on CUDA)")
    parser.add_argument("--variants", default="transformers,patched,patched+compiled")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (docs/{JSON})")
    args = parser.parse_args(argv)

    import transformers

    import mamba_ir
    from mamba_ir.integrations.transformers import patch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt = args.prompt or (32 if args.tiny else 2048)
    new = args.new or (8 if args.tiny else 256)
    mode = args.mode or ("reduce-overhead" if device.type == "cuda" else None)
    variants = args.variants.split(",")

    torch.manual_seed(0)
    config = bamba_config(args.tiny)
    with torch.device(device):
        model = transformers.BambaForCausalLM(config).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, config.vocab_size, (args.batch, prompt), device=device)
    print(f"Bamba {params / 1e9:.3f}B parameters, {dtype}, {device}; prompt {prompt} x "
          f"{args.batch}, {new} new tokens", flush=True)

    rows, reference = [], None
    payload: dict[str, Any] = {
        "benchmark": "transformers generate(), random-init Bamba",
        "model": {
            "config": f"bamba: {config.num_hidden_layers} layers "
                      f"({config.num_hidden_layers - len(config.attn_layer_indices)} Mamba2, "
                      f"{len(config.attn_layer_indices)} attention), hidden "
                      f"{config.hidden_size}, {config.mamba_n_heads} SSM heads x "
                      f"{config.mamba_d_head}, d_state {config.mamba_d_state}, vocab "
                      f"{config.vocab_size}",
            "parameters": params,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "transformers": transformers.__version__,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "batch": args.batch,
        "compile_mode": mode,
        "rows": rows,
    }
    out_path = args.out or (None if args.tiny else DOCS / JSON)

    def record(name: str, run: Any) -> None:
        nonlocal reference
        if name not in variants:
            return
        try:
            row, tokens = run()
        except Exception as exc:  # keep the other variants' figures
            traceback.print_exc()
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        else:
            if reference is None:
                reference = tokens
            same = (tokens == reference).all(0).long().cumprod(0).sum().item()
            row["matching_tokens"] = int(same)
            rows.append(row)
        if out_path is not None:
            _finish(payload, out_path)

    record("transformers", lambda: measure("transformers", model, ids, new))
    patch(model)

    def patched() -> tuple[dict, torch.Tensor]:
        row, tokens = measure("patched", model, ids, new)
        row["providers"] = eager_providers(model, ids)
        return row, tokens


    def compiled() -> tuple[dict, torch.Tensor]:
        torch._logging.set_logs(perf_hints=True)  # says why a graph ran without CUDA graphs
        cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + new)
        with torch.no_grad():  # allocate every state of the cache outside the graphs
            model(ids[:, :1], past_key_values=cache, use_cache=True)
        model.forward = mamba_ir.compile(model.forward, mode=mode)
        row, tokens = measure("patched+compiled", model, ids, new, cache)
        report = model.forward.lowering_report
        row["lowering"] = sorted({f"{s.op} -> {s.provider}" for s in report.sites})
        row["compile_s"] = round(report.compile_seconds, 1)
        counters = torch._dynamo.utils.counters
        row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        # a break splits the model into graphs Dynamo compiles per layer: say so, and why
        row["graph_breaks"] = sorted(str(reason) for reason in counters["graph_break"])
        row["graphs"] = int(counters["stats"].get("unique_graphs", 0))
        del model.forward  # back to the eager (patched) forward
        return row, tokens

    # the compiled variant before the eager one: the comparison that matters comes first
    record("patched+compiled", compiled)
    record("patched", patched)
    by_name = {r["variant"]: r for r in rows if "error" not in r}
    if "transformers" in by_name:
        base = by_name["transformers"]
        for row in by_name.values():
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
            row["decode_speedup"] = round(
                row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
    if out_path is not None:
        _finish(payload, out_path)
        _plot(payload, out_path.with_name(PLOT))
    for row in rows:
        print(row, flush=True)
    return payload


def _finish(payload: dict, path: Path) -> None:
    write_json(path.name, copy.deepcopy(payload), path.parent)


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "error" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["variant"] for r in rows]
    for k, (key, label) in enumerate((("tokens_per_s", "generate() incl. prefill"),
                                      ("decode_tokens_per_s", "decode only"))):
        xs = [i + (k - 0.5) * 0.38 for i in range(len(rows))]
        bars = ax.bar(xs, [r[key] for r in rows], width=0.38, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize="small")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("tokens/s")
    m = payload["model"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    ax.set_title(f"generate(): {payload['prompt_tokens']}-token prompt, "
                 f"{payload['new_tokens']} new, batch {payload['batch']}, "
                 f"{m['parameters'] / 1e9:.2f}B Bamba {m['dtype']}, {device}", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
