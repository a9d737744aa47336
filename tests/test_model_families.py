"""Configs of the model families: what loads (and matches transformers), and what is refused
with a reason (CPU, float32, eager dispatch; the compiled path is tests/test_model.py)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mamba_ir.models import Engine, HybridConfig, from_transformers  # noqa: E402

LIMIT = (0.0, 0.3)  # far below softplus(dt + dt_bias) of most heads: the clamp matters


def _bamba(**extra) -> torch.nn.Module:
    cfg = transformers.BambaConfig(
        vocab_size=67, hidden_size=32, num_hidden_layers=2, attn_layer_indices=[1],
        mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=4,
        intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.2, **extra,
    )
    torch.manual_seed(0)
    return transformers.BambaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, None), ([0.0, math.inf], None), ([0.0, {"__float__": "Infinity"}], None),
     ([0.001, 0.1], (0.001, 0.1))],
)
def test_time_step_limit_is_read(given, expected) -> None:
    d = _bamba().config.to_dict()
    d["time_step_limit"] = given
    assert HybridConfig.from_hf(d).time_step_limit == expected


def test_time_step_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="time_step_limit"):
        HybridConfig(time_step_limit=(0.5, 0.1))


@torch.no_grad()
def test_clamped_time_step_matches_transformers() -> None:
    hf = _bamba(time_step_limit=LIMIT)
    model = from_transformers(hf)
    assert model.config.time_step_limit == LIMIT
    prompt = torch.randint(1, 67, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    done = Engine(model, block_size=8, max_requests=1, max_len=32).generate([prompt], 4)[0]
    seq = prompt + done.tokens
    ref = hf(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:].float()
    torch.testing.assert_close(torch.stack(done.logits), ref, atol=1e-4, rtol=0)
    # and the clamp is what makes them agree
    unclamped = _bamba()
    unclamped.load_state_dict(hf.state_dict())
    far = unclamped(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:].float()
    assert (far - ref).abs().max() > 1e-3


def _granite(rope: str | None = None, **extra) -> torch.nn.Module:
    """A dense Granite-4-H: Mamba2 and attention layers, each followed by the shared MLP,
    with every Granite scaling away from 1."""
    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=67, hidden_size=32, num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=4,
        mamba_expand=2, shared_intermediate_size=48, num_local_experts=0,
        num_attention_heads=4, num_key_value_heads=2, position_embedding_type=rope,
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3,
        logits_scaling=2.5, initializer_range=0.2, **extra,
    )
    torch.manual_seed(0)
    model = transformers.GraniteMoeHybridForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-default SSM and norm parameters, so each one matters
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", ".D", "A_log", "norm.weight", "layernorm.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@torch.no_grad()
@pytest.mark.parametrize("rope", [None, "rope"])
def test_granite_4_h_matches_transformers(rope: str | None) -> None:
    hf = _granite(rope)
    model = from_transformers(hf)
    config = model.config
    assert (config.family, config.attention_layers, config.rotary_dim) == (
        "granitemoehybrid", (1,), 8 if rope else 0)
    prompts = [torch.randint(1, 67, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (11, 6)]
    engine = Engine(model, block_size=4, max_requests=2, max_len=32)
    for prompt, done in zip(prompts, engine.generate(prompts, 5), strict=True):
        seq = prompt + done.tokens
        ref = hf(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:].float()
        torch.testing.assert_close(torch.stack(done.logits), ref, atol=1e-4, rtol=0)
        assert done.tokens == ref.argmax(-1).tolist()


def test_granite_with_experts_is_refused() -> None:
    d = _granite().config.to_dict()
    d["num_local_experts"] = 4
    with pytest.raises(ValueError, match="num_local_experts 4: mixture-of-experts"):
        HybridConfig.from_hf(d)


@pytest.mark.parametrize("model_type", ["nemotron_h", "falcon_h1", "zamba2"])
def test_other_families_are_refused_by_name(model_type: str) -> None:
    with pytest.raises(ValueError, match=f"model_type '{model_type}'"):
        HybridConfig.from_hf({"model_type": model_type})
