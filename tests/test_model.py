"""The compiled hybrid model against transformers' own Bamba and Mamba2 (CPU, float32).

Each tiny random-init transformers model is loaded into a compiled :class:`Engine` and
both generate greedily: prefill + 16 decode steps. The transformers reference recomputes
the whole sequence without a cache at every step (its chunked-scan path), so it shares
no state handling with the IR.

Tolerances (float32): logits within 1e-4 absolute of transformers (the chunked scan and
the per-token recurrence round differently; observed ~1e-6 at logit scale ~3); tokens
identical. A run served from prefix-cache checkpoints matches the cold run within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mamba_ir.models import Engine, HybridConfig, from_pretrained, from_transformers  # noqa: E402

NEW_TOKENS = 17  # the prefill's token + 16 decode steps
BLOCK = 8
HF_ATOL = 1e-4
HIT_ATOL = 1e-5


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-default SSM parameters, so every one of them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", ".D", "A_log")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("conv1d.bias"):
                p.normal_(0, 0.1, generator=g)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _bamba() -> torch.nn.Module:
    cfg = transformers.BambaConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=3, attn_layer_indices=[1],
        mamba_n_heads=4, mamba_d_state=16, mamba_n_groups=2, mamba_d_conv=4,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.15,
    )
    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(cfg).eval()
    _perturb(model, 1)
    return model


def _mamba2() -> torch.nn.Module:
    cfg = transformers.Mamba2Config(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
        state_size=16, n_groups=2, expand=2, conv_kernel=4, initializer_range=0.15,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    _perturb(model, 2)
    return model


FAMILIES = {"bamba": _bamba, "mamba2": _mamba2}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randint(1, 100, (21,), generator=g).tolist()
    other = torch.randint(1, 100, (9,), generator=g).tolist()
    # two prompts sharing two blocks, one unrelated and shorter than a block; the last one
    # (served only in the second run) shares two blocks with the first two
    return [base, base[: 2 * BLOCK] + other, other[:5], base[: 2 * BLOCK] + other[::-1][:4]]


@torch.no_grad()
def _reference(hf: torch.nn.Module, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    seq, logits = list(prompt), []
    for _ in range(NEW_TOKENS):
        out = hf(torch.tensor([seq])).logits[0, -1].float()
        logits.append(out)
        seq.append(int(out.argmax()))
    return seq[len(prompt):], torch.stack(logits)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request: pytest.FixtureRequest) -> dict:
    """One compiled engine per family: a cold run, then the same prompts again (hits)."""
    hf = FAMILIES[request.param]()
    model = from_transformers(hf)
    engine = Engine(model, block_size=BLOCK, max_requests=4, max_len=64, compile=True)
    prompts = _prompts()
    cold = engine.generate(prompts[:3], NEW_TOKENS)
    cold_stats = engine.prefix.stats.hits
    # the three prompts (21, 25, 5 tokens, several blocks) prefill in one step
    assert engine.stats.prefill_steps == 1
    warm = engine.generate(prompts, NEW_TOKENS)
    return {
        "hf": hf, "model": model, "engine": engine, "prompts": prompts, "cold": cold,
        "warm": warm, "cold_hits": cold_stats,
        "reference": [_reference(hf, p) for p in prompts],
    }


def test_config_roundtrip(served: dict) -> None:
    cfg = HybridConfig.from_hf(served["hf"].config)
    assert cfg == served["model"].config
    assert cfg.family in FAMILIES


def test_compiled_matches_transformers_cold(served: dict) -> None:
    assert served["cold_hits"] == 0
    for done, (tokens, logits) in zip(served["cold"], served["reference"][:3], strict=True):
        assert done.cached_tokens == 0
        assert done.tokens == tokens
        torch.testing.assert_close(torch.stack(done.logits), logits, atol=HF_ATOL, rtol=0)


def test_compiled_matches_transformers_with_prefix_hits(served: dict) -> None:
    warm = served["warm"]
    # own checkpoints (incl. those taken while decoding), none, another request's
    assert [c.cached_tokens for c in warm] == [2 * BLOCK, 3 * BLOCK, 0, 2 * BLOCK]
    for done, (tokens, logits) in zip(warm, served["reference"], strict=True):
        assert done.tokens == tokens
        torch.testing.assert_close(torch.stack(done.logits), logits, atol=HF_ATOL, rtol=0)


def test_prefix_hits_equal_cold_run(served: dict) -> None:
    for cold, warm in zip(served["cold"], served["warm"][:3], strict=True):
        assert cold.tokens == warm.tokens
        torch.testing.assert_close(torch.stack(warm.logits), torch.stack(cold.logits),
                                   atol=HIT_ATOL, rtol=0)


def test_compiled_graphs_lower_every_site(served: dict) -> None:
    sites = served["engine"].lowering_report()
    ops = {s.op for s in sites}
    assert {"causal_conv1d_fn", "causal_conv1d_update", "selective_state_update",
            "mamba_chunk_scan", "copy_state_blocks"} <= ops
    # one graph per step kind for every batch, chunk and checkpoint count
    n_mamba = len(served["model"].config.mamba_layers)
    assert len([s for s in sites if s.op == "causal_conv1d_update"]) == n_mamba
    assert len([s for s in sites if s.op == "mamba_chunk_scan"]) == n_mamba
    assert all(s.provider == "native" for s in sites if s.provider is not None)
    # sites are named by the mixer that made the call; its two copies stay apart
    mixers = [f"model.layers.{i}.mixer" for i in served["model"].config.mamba_layers]
    prefill = [s.site for s in sites if s.graph_name == "prefill"]
    assert prefill == [f"{m}: {call}" for m in mixers for call in (
        "copy_state_blocks#1", "causal_conv1d_fn", "copy_state_blocks#2", "mamba_chunk_scan")]
    decode = [s.site for s in sites if s.graph_name == "decode"]
    assert decode == [f"{m}: {op}" for m in mixers
                      for op in ("causal_conv1d_update", "selective_state_update")]
    folded = [s for s in sites if s.op == "copy_state_blocks"]
    assert [s.fused_with for s in folded] == [f"{m}: {op}" for m in mixers
                                              for op in ("causal_conv1d_fn", "mamba_chunk_scan")]


def test_eager_engine_matches_compiled(served: dict) -> None:
    # 5-token prefill steps: chunks end mid-block, checkpoints fall inside later steps
    eager = Engine(served["model"], block_size=BLOCK, max_requests=4, max_len=64,
                   prefill_tokens=5)
    for done, ref in zip(eager.generate(served["prompts"][:3], NEW_TOKENS), served["cold"],
                         strict=True):
        assert done.tokens == ref.tokens
        torch.testing.assert_close(torch.stack(done.logits), torch.stack(ref.logits),
                                   atol=HIT_ATOL, rtol=0)


def test_prefix_cache_disabled_never_hits(served: dict) -> None:
    engine = Engine(served["model"], block_size=BLOCK, max_requests=2, max_len=64,
                    prefix_cache=False)
    prompts = served["prompts"][:2]
    engine.generate(prompts, 2)
    again = engine.generate(prompts, 2)
    assert engine.prefix.stats.hits == 0 and all(c.cached_tokens == 0 for c in again)


def test_local_folder_loads_like_the_object(served: dict, tmp_path) -> None:
    served["hf"].save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == served["model"].config
    ours = served["model"].state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, ours[name], atol=0, rtol=0)
