"""Tensor parallelism of one rank costs nothing: the bench hybrid built plainly and built as
rank 0 of a one-rank group (``TensorParallel()``), the same weights, time to first token and
a decode step of each, alternated in one run so that drift of the GPU shows as noise.

    python -m benchmarks.tp_one [--length 8192] [--batch 64] [--context 2048]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, prefill
from mamba_ir.models import Engine, TensorParallel, bench_config, random_model
from mamba_ir.models.cache import RESERVED_SLOTS

FORMS = {"plain": None, "tp=1": TensorParallel()}


def engine_of(tp: TensorParallel | None, args: argparse.Namespace) -> Engine:
    model = random_model(bench_config(), device="cuda", dtype=torch.bfloat16, tp=tp)
    max_len = max(args.length, args.context) + 8
    return Engine(model, max_requests=args.batch, max_len=max_len,
                  num_slots=RESERVED_SLOTS + args.batch + max_len // 256 + 8, compile=True,
                  record_logits=False)


def run(args: argparse.Namespace) -> int:
    engines = {name: engine_of(tp, args) for name, tp in FORMS.items()}
    rows: list[dict[str, Any]] = []
    for rnd in common.progress(range(args.rounds), "rounds"):
        for name, engine in engines.items():
            pre = prefill.measure_prefill(engine, args.length, args.reps)
            dec = prefill.measure_decode(engine, args.context, args.batch)
            rows.append({"round": rnd, "form": name, "ttft_ms": pre["graph_ttft_ms"],
                         "prefill_gpu_ms": pre["gpu_ms"], "decode_us": dec["step_us"]})
    print(common.table(rows, [("round", "round", "{:>5}"), ("form", "form", "{:>5}"),
                              ("ttft_ms", "TTFT ms", "{:>9.2f}"),
                              ("prefill_gpu_ms", "GPU ms", "{:>8.2f}"),
                              ("decode_us", "decode us", "{:>9.1f}")]))
    payload = {"benchmark": "bench hybrid plain vs one-rank tensor parallel, same run",
               "prompt_tokens": args.length, "decode_batch": args.batch,
               "decode_context": args.context, "rows": rows}
    out = Path(args.out)
    print(f"wrote {common.write_json(out.name, payload, out.parent)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(common.DOCS / "tp_one_bench.json"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
