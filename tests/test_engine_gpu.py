"""The compiled engine on a GPU (Triton scan and conv, FlashAttention) against the same
model with every IR op native, bf16, prompts spanning several 256-token blocks in one
step, cold and served from the checkpoints the steps wrote."""

from __future__ import annotations

import pytest
import torch

from mamba_ir import set_priority
from mamba_ir.models import Engine, demo_config, random_model

BLOCK = 256  # a multiple of the scan's chunk: the Triton scan writes the checkpoints
# bf16 weights and activations: the chunked scan and the recurrence round differently
LOGIT_ATOL = 5e-2


@pytest.mark.gpu
def test_compiled_gpu_engine_matches_native_ops():
    model = random_model(demo_config(), device="cuda", dtype=torch.bfloat16, std=0.05)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 512, (700,), generator=g).tolist()
    prompts = [base, base[:530] + [7, 8, 9], torch.randint(0, 512, (90,), generator=g).tolist()]
    kwargs = dict(block_size=BLOCK, max_requests=3, max_len=1024)
    fast = Engine(model, compile=True, **kwargs)
    cold = fast.generate(prompts, 3)
    assert fast.stats.prefill_steps == 1
    warm = fast.generate(prompts, 3)
    assert [c.cached_tokens for c in warm] == [2 * BLOCK, 2 * BLOCK, 0]
    sites = fast.lowering_report()
    scan = [s for s in sites if s.op == "mamba_chunk_scan"]
    assert scan and all(s.provider == "triton" for s in scan)
    with set_priority([]):
        ref = Engine(model, **kwargs).generate(prompts, 3)
    for run in (cold, warm):
        for got, want in zip(run, ref, strict=True):
            torch.testing.assert_close(got.logits[0], want.logits[0], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.gpu
def test_prefill_cuda_graphs_match_launched_steps():
    model = random_model(demo_config(), device="cuda", dtype=torch.bfloat16, std=0.05)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (700, 300, 90)]
    kwargs = dict(block_size=BLOCK, max_requests=3, max_len=1024, compile=True,
                  prefill_tokens=512)
    launched = Engine(model, **kwargs).generate(prompts, 3)
    engine = Engine(model, prefill_graphs=True, **kwargs)
    for _ in range(2):  # cold (captures), then replays reading the graphs' checkpoints
        graphed = engine.generate(prompts, 3)
        for got, want in zip(graphed, launched, strict=True):
            torch.testing.assert_close(got.logits[0], want.logits[0], atol=LOGIT_ATOL, rtol=0)
    assert engine._graphs and engine.prefix.stats.hits == 2


@pytest.mark.gpu
def test_prefill_bench_writes_json_and_plot(tmp_path):
    import json

    from mamba_ir.cli import main

    out = tmp_path / "prefill.json"
    assert main(["bench", "--prefill", "--layers", "6", "--lengths", "300", "600",
                 "--contexts", "300", "--batches", "2", "--reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["prefill"]] == [300, 600]
    assert all(r["gpu_ms_by_category"]["attention"] > 0 for r in data["prefill"])
    assert all(r["graph_ttft_ms"] > 0 for r in data["prefill"])
    assert [(r["context"], r["batch"]) for r in data["decode"]] == [(300, 2)]
    assert out.with_suffix(".png").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["int16", "int8"])
def test_compiled_gpu_engine_on_a_quantized_state_matches_native_ops(state_dtype):
    """Decode on the Triton SSU's quantized rows, prefill on the Triton scan over float32
    scratch rows (the interim path), checkpoints quantized into their slots."""
    model = random_model(demo_config(), device="cuda", dtype=torch.bfloat16, std=0.05)
    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, 512, (600,), generator=g).tolist()
    prompts = [base, base[:520] + [5, 6], torch.randint(0, 512, (90,), generator=g).tolist()]
    kwargs = dict(block_size=BLOCK, max_requests=3, max_len=1024, state_dtype=state_dtype)
    fast = Engine(model, compile=True, **kwargs)
    cold = fast.generate(prompts, 4)
    warm = fast.generate(prompts, 4)
    assert [c.cached_tokens for c in warm] == [2 * BLOCK, 2 * BLOCK, 0]
    sites = fast.lowering_report()
    for op in ("selective_state_update", "mamba_chunk_scan"):
        assert all(s.provider == "triton" for s in sites if s.op == op), op
    with set_priority([]):
        ref = Engine(model, **kwargs).generate(prompts, 4)
    # a stored value may round one step away from native's: a few steps more than bf16's
    atol = 2 * LOGIT_ATOL if state_dtype == "int16" else 4 * LOGIT_ATOL
    for run in (cold, warm):
        for got, want in zip(run, ref, strict=True):
            assert bool(torch.stack(got.logits).isfinite().all())
            n = next((i for i, (a, b) in enumerate(zip(got.tokens, want.tokens, strict=True))
                      if a != b), len(got.tokens) - 1) + 1  # logits while the inputs agree
            torch.testing.assert_close(torch.stack(got.logits[:n]),
                                       torch.stack(want.logits[:n]), atol=atol, rtol=0)
