"""Model configuration: one description for Bamba-style hybrids and pure Mamba2 models.

A Bamba decoder layer is ``norm -> (Mamba2 mixer | attention) -> residual -> norm -> MLP ->
residual``; a Mamba2 block is ``norm -> mixer -> residual`` with the residual kept in
float32. :func:`HybridConfig.from_hf` reads either family from a transformers config object
or from a checkpoint's ``config.json`` dictionary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Family = Literal["bamba", "mamba2", "granitemoehybrid"]
MAMBA = "mamba"
ATTENTION = "attention"


@dataclass(frozen=True)
class HybridConfig:
    family: Family = "bamba"
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    attn_layer_indices: tuple[int, ...] = (2,)
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Mamba2 mixer
    mamba_n_heads: int = 8
    mamba_d_head: int = 32
    mamba_n_groups: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # dt after softplus is clamped to [lo, hi] (transformers' time_step_limit); None: no clamp
    time_step_limit: tuple[float, float] | None = None
    # attention (Bamba only)
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    attention_head_dim: int = 32
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    # MLP (Bamba only; 0 means none, as in Mamba2)
    intermediate_size: int = 256
    mlp_bias: bool = False
    residual_in_fp32: bool = False
    # Granite-4-H scalings (1.0 / None elsewhere): embeddings, each branch added to the
    # residual, the attention scores (None: 1/sqrt(head_dim)), and the logits (divided)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mamba_n_heads * self.mamba_d_head != self.intermediate_mamba:
            raise ValueError(
                f"mamba_n_heads * mamba_d_head ({self.mamba_n_heads} * {self.mamba_d_head}) must "
                f"equal mamba_expand * hidden_size ({self.intermediate_mamba})"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError("mamba_n_groups must divide mamba_n_heads")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        bad = [i for i in self.attn_layer_indices if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"attn_layer_indices {bad} outside [0, {self.num_layers})")
        limit = self.time_step_limit
        if limit is not None and not (len(limit) == 2 and 0 <= limit[0] <= limit[1]):
            raise ValueError(f"time_step_limit: expected None or (lo, hi) with 0 <= lo <= hi, "
                             f"got {limit!r}")

    @property
    def intermediate_mamba(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C."""
        return self.intermediate_mamba + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def layer_types(self) -> tuple[str, ...]:
        attn = set(self.attn_layer_indices)
        return tuple(ATTENTION if i in attn else MAMBA for i in range(self.num_layers))

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == MAMBA)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == ATTENTION)

    @property
    def rotary_dim(self) -> int:
        return int(self.attention_head_dim * self.partial_rotary_factor)

    def with_(self, **changes: Any) -> HybridConfig:
        return replace(self, **changes)

    # -- transformers configs -----------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Any) -> HybridConfig:
        """From a transformers ``BambaConfig`` / ``Mamba2Config`` or a ``config.json`` dict."""
        d = dict(config) if isinstance(config, dict) else config.to_dict()
        model_type = d.get("model_type")
        if model_type == "bamba":
            return _from_bamba(d)
        if model_type == "mamba2":
            return _from_mamba2(d)
        if model_type == "granitemoehybrid":
            return _from_granite(d)
        missing = _NOT_YET.get(model_type)
        if missing:
            raise ValueError(f"model_type {model_type!r} is not supported yet: the decoder "
                             f"lacks {missing} (supported: {', '.join(map(repr, FAMILIES))})")
        raise ValueError(f"model_type {model_type!r}: expected one of "
                         f"{', '.join(map(repr, FAMILIES))}")

    def describe(self) -> str:
        n_attn = len(self.attention_layers)
        return (
            f"{self.family}: {self.num_layers} layers ({self.num_layers - n_attn} Mamba2, "
            f"{n_attn} attention), hidden {self.hidden_size}, {self.mamba_n_heads} SSM heads x "
            f"{self.mamba_d_head}, d_state {self.mamba_d_state}, groups {self.mamba_n_groups}, "
            f"vocab {self.vocab_size}"
        )


# Hybrid families whose Mamba2 layers the IR serves but whose decoder differs from Bamba's.
_NOT_YET = {
    "nemotron_h": "MLP-only layers with squared-ReLU, attention without rotary embeddings, "
                  "and a Mamba width independent of mamba_expand",
    "falcon_h1": "parallel attention and Mamba branches with per-branch multipliers",
    "zamba2": "shared attention blocks with LoRA adapters",
}


def _time_step_limit(d: dict[str, Any]) -> tuple[float, float] | None:
    """transformers' ``time_step_limit``; the default ``(0, inf)`` clamps nothing: None."""
    limit = d.get("time_step_limit")
    if not limit:
        return None
    lo, hi = (_as_float(v) for v in limit)
    return None if (lo, hi) == (0.0, math.inf) else (lo, hi)


def _as_float(value: Any) -> float:
    # transformers writes non-finite floats to config.json as {"__float__": "Infinity"}
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _check_act(d: dict[str, Any]) -> None:
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported (only silu)")


def _from_bamba(d: dict[str, Any]) -> HybridConfig:
    _check_act(d)
    hidden, heads = d["hidden_size"], d["mamba_n_heads"]
    d_head = d.get("mamba_d_head", "auto")
    if d_head == "auto":
        d_head = d["mamba_expand"] * hidden // heads
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported (only default)")
    n_attn = d["num_attention_heads"]
    return HybridConfig(
        family="bamba",
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d["num_hidden_layers"],
        attn_layer_indices=tuple(d.get("attn_layer_indices") or ()),
        norm_eps=d["rms_norm_eps"],
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        mamba_n_heads=heads,
        mamba_d_head=d_head,
        mamba_n_groups=d["mamba_n_groups"],
        mamba_d_state=d["mamba_d_state"],
        mamba_d_conv=d["mamba_d_conv"],
        mamba_expand=d["mamba_expand"],
        mamba_conv_bias=bool(d.get("mamba_conv_bias", True)),
        mamba_proj_bias=bool(d.get("mamba_proj_bias", False)),
        time_step_limit=_time_step_limit(d),
        num_attention_heads=n_attn,
        num_key_value_heads=d.get("num_key_value_heads") or n_attn,
        attention_head_dim=d.get("head_dim") or hidden // n_attn,
        attention_bias=bool(d.get("attention_bias", False)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        # transformers hardcodes half-rotary attention for Bamba
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.5)),
        intermediate_size=d["intermediate_size"],
        mlp_bias=bool(d.get("mlp_bias", False)),
        residual_in_fp32=False,
        extra={"eos_token_id": d.get("eos_token_id")},
    )


def _from_mamba2(d: dict[str, Any]) -> HybridConfig:
    _check_act(d)
    return HybridConfig(
        family="mamba2",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        attn_layer_indices=(),
        norm_eps=d["layer_norm_epsilon"],
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        mamba_n_heads=d["num_heads"],
        mamba_d_head=d["head_dim"],
        mamba_n_groups=d["n_groups"],
        mamba_d_state=d["state_size"],
        mamba_d_conv=d["conv_kernel"],
        mamba_expand=d["expand"],
        mamba_conv_bias=bool(d.get("use_conv_bias", True)),
        mamba_proj_bias=bool(d.get("use_bias", False)),
        time_step_limit=_time_step_limit(d),
        intermediate_size=0,
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        extra={"eos_token_id": d.get("eos_token_id")},
    )


def _from_granite(d: dict[str, Any]) -> HybridConfig:
    """Granite-4-H (``GraniteMoeHybridForCausalLM``): Bamba's layers with the shared MLP
    after every layer and Granite's scalings; mixture-of-experts layers are refused."""
    if d.get("num_local_experts", 0) > 0:
        raise ValueError(f"num_local_experts {d['num_local_experts']}: mixture-of-experts "
                         "layers are not supported (only dense Granite-4-H, 0 experts)")
    kinds = {"mamba": MAMBA, "linear_attention": MAMBA, "attention": ATTENTION,
             "full_attention": ATTENTION}
    types = d.get("layer_types") or d.get("layers_block_type") or []
    unknown = sorted(set(types) - set(kinds))
    if unknown or len(types) != d["num_hidden_layers"]:
        raise ValueError(f"layer_types {types!r}: expected one of {sorted(kinds)} per layer")
    rope = d.get("position_embedding_type")
    if rope not in (None, "nope", "rope"):
        raise ValueError(f"position_embedding_type {rope!r} is not supported (rope or none)")
    bamba = {**d, "attn_layer_indices": [i for i, t in enumerate(types) if kinds[t] == ATTENTION],
             "intermediate_size": d["shared_intermediate_size"]}
    return _from_bamba(bamba).with_(
        family="granitemoehybrid",
        partial_rotary_factor=1.0 if rope == "rope" else 0.0,
        embedding_multiplier=float(d.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(d.get("residual_multiplier", 1.0)),
        attention_multiplier=float(d.get("attention_multiplier", 1.0)),
        logits_scaling=float(d.get("logits_scaling", 1.0)),
    )


FAMILIES = ("bamba", "mamba2", "granitemoehybrid")


def demo_config() -> HybridConfig:
    """A small hybrid that compiles and serves in seconds on a CPU."""
    return HybridConfig()


def bench_config() -> HybridConfig:
    """A ~1.2B-parameter Bamba-style hybrid: 21 Mamba2 layers, 3 attention layers."""
    return HybridConfig(
        family="bamba",
        vocab_size=32768,
        hidden_size=2048,
        num_layers=24,
        attn_layer_indices=(5, 11, 17),
        mamba_n_heads=64,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        num_attention_heads=16,
        num_key_value_heads=4,
        attention_head_dim=128,
        intermediate_size=3072,
    )

