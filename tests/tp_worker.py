"""One rank of the tensor-parallel tests (tests/test_tp.py): serves the prompts with its
shard of the model, eager and compiled with the passes, cold and from prefix-cache hits,
and saves what it saw for the test process to compare with the unsharded model."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from mamba_ir.models import Engine, HybridConfig, TensorParallel, random_model

BLOCK = 8
NEW_TOKENS = 4
# every sharded size divisible by 4; 2 B/C groups (split at tp 2, replicated at tp 4) and
# 2 KV heads (likewise); biases on, so a row-parallel bias added on every rank would show
CONFIG = HybridConfig(vocab_size=61, hidden_size=32, num_layers=2, attn_layer_indices=(1,),
                      mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                      num_attention_heads=4, num_key_value_heads=2, attention_head_dim=8,
                      intermediate_size=48, mamba_proj_bias=True, attention_bias=True,
                      mlp_bias=True)


def model(tp: TensorParallel | None = None) -> torch.nn.Module:
    """The test model (its shard with ``tp``): random weights, every bias, norm and SSM
    parameter perturbed so that each of them matters."""
    full = random_model(CONFIG, seed=1, std=0.2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith(("bias", "norm.weight", ".D", "A_log")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    if tp is None:
        return full
    from mamba_ir.models import from_state_dict

    return from_state_dict(CONFIG, full.state_dict(), tp=tp)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 61, (19,), generator=g).tolist()
    return [base, base[:12] + [3, 4, 5], torch.randint(0, 61, (5,), generator=g).tolist()]


def serve(m: torch.nn.Module, **engine: Any) -> dict[str, Any]:
    """A cold run, then the same prompts again (prefix-cache hits); the engine's block
    table (checkpoint digests and slots) and its Mamba state rows."""
    e = Engine(m, block_size=BLOCK, max_requests=3, max_len=32, **engine)
    runs = [e.generate(prompts(), NEW_TOKENS) for _ in range(2)]
    out: dict[str, Any] = {
        "tokens": [[c.tokens for c in run] for run in runs],
        "logits": [[torch.stack(c.logits) for c in run] for run in runs],
        "cached": [[c.cached_tokens for c in run] for run in runs],
        "table": [(digest, entry.slot) for digest, entry in e.prefix.entries.items()],
        "states": {layer: tuple(t.clone() for t in e.cache.states(layer))
                   for layer in e.cache.mamba_layers},
    }
    if engine.get("compile"):
        out["report"] = [s.to_dict() for s in e.lowering_report()]
    return out


def _graph_targets(seen: list[str]):
    """A post-grad pass that records the call targets of each graph (run before the IR
    passes: the graph they lower)."""
    def spy(graph: torch.fx.Graph) -> None:
        seen.extend(str(n.target) for n in graph.nodes if n.op == "call_function")
    return spy


def run(rank: int, size: int, init: str, out: str) -> None:
    """The spawned process: join the gloo group, serve, save to ``out/rank{rank}.pt``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch._inductor import config as inductor

    inductor.compile_threads = 1  # no pool of compile workers in every rank

    # a rank that dies makes the launcher end the others; one that hangs times out
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size,
                            timeout=timedelta(seconds=600))
    try:
        tp = TensorParallel.of_group()
        m = model(tp)
        seen: list[str] = []
        options = {"post_grad_custom_post_pass": _graph_targets(seen)}
        result = {
            "eager": serve(m),
            "compiled": serve(m, compile=True, compile_kwargs={"options": options}),
            "targets": seen,
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
