"""Building a :class:`HybridModel` from transformers objects, state dicts or a local folder.

transformers names (``BambaForCausalLM``: ``model.layers.{i}.mamba.*``, ``self_attn``,
``feed_forward``, ``input_layernorm``, ``pre_ff_layernorm``, ``model.final_layernorm``;
``GraniteMoeHybridForCausalLM``: the same but ``post_attention_layernorm``,
``shared_mlp.{input,output}_linear``, ``model.norm``; ``Mamba2ForCausalLM``:
``backbone.layers.{i}.mixer.*``, ``norm``, ``backbone.norm_f``) map onto this package's
names; the conv weight ``(dim, 1, width)`` becomes ``(dim, width)``, Granite's fused
``input_linear`` the MLP's ``gate_proj`` and ``up_proj``.
Nothing is downloaded: a folder must hold ``config.json`` and ``*.safetensors``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import HybridConfig
from .decoder import HybridModel
from .tp import TensorParallel

_RULES: list[tuple[str, str]] = [
    # Bamba
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.final_layernorm\.", "final_norm."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.norm."),
    (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.feed_forward\.", r"layers.\1.mlp."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"^model\.layers\.(\d+)\.mamba\.", r"layers.\1.mixer."),
    # Granite-4-H (GraniteMoeHybrid): Bamba's names but these; input_linear is split below
    (r"^model\.norm\.", "final_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.shared_mlp\.output_linear\.", r"layers.\1.mlp.down_proj."),
    (r"^model\.layers\.(\d+)\.shared_mlp\.input_linear\.", r"layers.\1.mlp.input_linear."),
    # Mamba2
    (r"^backbone\.embeddings?\.", "embed."),
    (r"^backbone\.norm_f\.", "final_norm."),
    (r"^backbone\.layers\.(\d+)\.norm\.", r"layers.\1.norm."),
    (r"^backbone\.layers\.(\d+)\.mixer\.", r"layers.\1.mixer."),
    # both
    (r"\.mixer\.conv1d\.weight$", ".mixer.conv_weight"),
    (r"\.mixer\.conv1d\.bias$", ".mixer.conv_bias"),
    (r"\.mixer\.norm\.weight$", ".mixer.norm.weight"),
]


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Bamba / Granite-4-H / Mamba2 weight names and layouts -> this package's."""
    out = {}
    for name, tensor in state.items():
        new = name
        for pattern, repl in _RULES:
            new = re.sub(pattern, repl, new)
        if new.endswith(".mixer.conv_weight") and tensor.dim() == 3:
            tensor = tensor.squeeze(1)
        if ".mlp.input_linear." in new:  # Granite: [gate; up] in one matrix
            gate, up = tensor.chunk(2, dim=0)
            out[new.replace("input_linear", "gate_proj")] = gate
            out[new.replace("input_linear", "up_proj")] = up
            continue
        out[new] = tensor
    return out


def from_state_dict(
    config: HybridConfig,
    state: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    tp: TensorParallel | None = None,
) -> HybridModel:
    """A model with ``state`` (transformers or native names, unsharded) loaded strictly;
    with ``tp``, that rank's shard of it (each parameter sliced to the rows it holds)."""
    with torch.device("meta"):
        model = HybridModel(config, tp)
    weights = convert_state_dict(state)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    elif "lm_head.weight" not in weights:
        raise KeyError("lm_head.weight missing and tie_word_embeddings is False")
    weights = model.plan.shard_state_dict(weights)
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device, dtype=dtype)


def from_transformers(
    hf_model: Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tp: TensorParallel | None = None,
) -> HybridModel:
    """Copy a ``BambaForCausalLM`` / ``Mamba2ForCausalLM`` object's weights (with ``tp``,
    that rank's shard of them)."""
    config = HybridConfig.from_hf(hf_model.config)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if device is None:
        device = next(hf_model.parameters()).device
    return from_state_dict(config, state, device=device, dtype=dtype, tp=tp)


def from_pretrained(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    tp: TensorParallel | None = None,
) -> HybridModel:
    """Load a local checkpoint folder (``config.json`` + safetensors shards); with ``tp``,
    that rank's shard of it."""
    from safetensors.torch import load_file

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found (a local checkpoint folder is needed)")
    config = HybridConfig.from_hf(json.loads(config_file.read_text()))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    return from_state_dict(config, state, device=device, dtype=dtype, tp=tp)


def random_model(
    config: HybridConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
    tp: TensorParallel | None = None,
) -> HybridModel:
    """Random weights of a trained model's scale: normal(std) matrices, unit norms,
    A = -[1..heads], D = 1, dt_bias = 1 (transformers' Bamba initialisation). With ``tp``,
    that rank's shard of the unsharded model drawn from ``seed``."""
    if tp is not None and tp.size > 1:
        full = random_model(config, seed=seed, device=device, dtype=dtype, std=std)
        return from_state_dict(config, full.state_dict(), device=device, dtype=dtype, tp=tp)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = HybridModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("proj.weight", "embed.weight", "lm_head.weight")):
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("conv_weight"):
                p.normal_(0.0, (1 / p.shape[-1]) ** 0.5, generator=generator)
            elif name.endswith(("proj.bias", "conv_bias")):
                p.zero_()
    return model.to(dtype=dtype)
