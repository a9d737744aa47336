"""Run a transformers model's Mamba2 mixers on the IR ops: ``patch(model)``.

transformers (5.x) keeps each Mamba layer's conv window and SSM state in its own cache
object (``LinearAttentionLayer.conv_states[0]`` / ``recurrent_states[0]``, one row per
batch entry). The patched mixer hands those tensors to the ops as their state caches:
prefill is ``causal_conv1d_fn`` + ``mamba_chunk_scan`` (or the multi-token
``selective_state_update``), decode ``causal_conv1d_update`` + ``selective_state_update``;
the ops read and write the cache rows in place, through their index arguments (a fresh
cache is read as zero state and written row by row), so no state is copied.

Why a forward override and not transformers' hub-kernel hooks: those hooks need the
``kernels`` package, and their contracts do not carry a state cache — the prefill conv gets
a window transformers has already concatenated and copied, and the chunk scan returns a
final state that transformers then copies into the cache. Overriding the mixer's forward
(on the instance, nothing else in the model changes) keeps the cache tensors the ops' state.
The arithmetic matches transformers' own torch path (mask, multipliers, gate, norm order).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import ops

# Exact (module, class) of every mixer whose forward this file reproduces, tested with
# transformers 5.23; a subclass may override anything, so it is not accepted.
_BAMBA_LIKE = "mamba2"
_FALCON_H1 = "falcon_h1"
MIXERS: dict[tuple[str, str], str] = {
    ("transformers.models.bamba.modeling_bamba", "BambaMixer"): _BAMBA_LIKE,
    ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"): _BAMBA_LIKE,
    ("transformers.models.nemotron_h.modeling_nemotron_h", "NemotronHMamba2Mixer"): _BAMBA_LIKE,
    ("transformers.models.granitemoehybrid.modeling_granitemoehybrid",
     "GraniteMoeHybridMambaLayer"): _BAMBA_LIKE,
    ("transformers.models.falcon_h1.modeling_falcon_h1", "FalconH1Mixer"): _FALCON_H1,
}
PREFILL_OPS = ("mamba_chunk_scan", "selective_state_update")
_ACTIVATIONS = (None, "silu", "swish")
_PAD = -1


@dataclass(frozen=True)
class _Setup:
    """What the patched forward needs beyond the mixer's own attributes."""

    family: str
    prefill_op: str


def patch(model: nn.Module, *, prefill_op: str = "mamba_chunk_scan") -> nn.Module:
    """Make every Mamba2 mixer of a loaded transformers ``model`` run on the IR ops.

    Supported mixers: Bamba, Mamba2, NemotronH, GraniteMoeHybrid and FalconH1 (``MIXERS``).
    Anything else with an SSM mixer raises ``ValueError`` naming the layer and why, before
    any module is changed. ``prefill_op`` picks the prefill SSM op: ``"mamba_chunk_scan"``
    or the multi-token ``"selective_state_update"`` (same result).
    Modules in training mode, and caches recording past states (rollback), keep
    transformers' own forward. Patching twice is a no-op. Returns ``model``.
    """
    if prefill_op not in PREFILL_OPS:
        raise ValueError(f"prefill_op: expected one of {PREFILL_OPS}, got {prefill_op!r}")
    mixers = []
    for name, module in model.named_modules():
        family = MIXERS.get((type(module).__module__, type(module).__qualname__))
        if family is not None:
            _check_mixer(name, module)
            mixers.append((module, _Setup(family, prefill_op)))
        elif _looks_like_ssm_mixer(module):
            raise ValueError(
                f"model: {name} is a {type(module).__qualname__} ({type(module).__module__}), "
                f"not one of the supported Mamba2 mixers ({_supported()})"
            )
    if not mixers:
        raise ValueError(
            f"model: expected a transformers model with Mamba2 mixers ({_supported()}), "
            f"found none in {type(model).__qualname__}"
        )
    for module, setup in mixers:
        module._mamba_ir = setup
        module.forward = types.MethodType(_forward, module)
    return model


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a mixer) runs on the IR ops."""
    return isinstance(getattr(module, "_mamba_ir", None), _Setup)


def _supported() -> str:
    return ", ".join(cls for _, cls in MIXERS)


def _looks_like_ssm_mixer(module: nn.Module) -> bool:
    # every selective-SSM mixer in transformers holds A_log beside a causal conv
    return isinstance(getattr(module, "A_log", None), torch.Tensor) and hasattr(module, "conv1d")


def _check_mixer(name: str, m: nn.Module) -> None:
    if m.activation not in _ACTIVATIONS:
        raise ValueError(
            f"model: {name} uses activation {m.activation!r}; the conv ops take "
            f"{_ACTIVATIONS}"
        )
    if m.num_heads * m.head_dim != m.intermediate_size or m.num_heads % m.n_groups:
        raise ValueError(
            f"model: {name} has {m.num_heads} heads of {m.head_dim} for an inner size of "
            f"{m.intermediate_size} and {m.n_groups} groups; expected heads * head_dim == "
            "inner size and groups dividing heads"
        )
    if tuple(m.conv1d.weight.shape) != (m.conv_dim, 1, m.conv_kernel_size):
        raise ValueError(
            f"model: {name}.conv1d weight: expected a depthwise ({m.conv_dim}, 1, "
            f"{m.conv_kernel_size}) conv, got {tuple(m.conv1d.weight.shape)}"
        )


@dataclass
class _States:
    """A layer's state caches as the ops see them, and which rows a call reads/writes."""

    conv: torch.Tensor  # (rows, conv_dim, width - 1): the window columns of the conv state
    ssm: torch.Tensor  # (rows, heads, head_dim, d_state)
    src: torch.Tensor | None  # rows read by the SSM ops (None: row b; pad: zero state)
    dst: torch.Tensor | None  # rows written (None: the rows read; pad: none)
    conv_rows: torch.Tensor | None  # rows the prefill conv writes (None: row b; pad: none)
    previous: bool  # whether the rows hold a state to continue from


def _forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cache_params: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    packed = kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None
    if self.training or packed or (
        cache_params is not None and cache_params.is_recording_past(self.layer_idx)
    ):
        return type(self).forward(self, hidden_states, cache_params, attention_mask, **kwargs)
    setup: _Setup = self._mamba_ir
    falcon = setup.family == _FALCON_H1
    batch, seqlen, _ = hidden_states.shape
    dtype = hidden_states.dtype

    hidden_states = _mask(hidden_states, attention_mask)
    if falcon:
        hidden_states = hidden_states * self.ssm_in_multiplier
    projected = self.in_proj(hidden_states)
    if falcon:
        projected = projected * self.mup_vector
    gate, xbc, dt = projected.split(
        [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
    )
    states = _states(self, cache_params, batch, xbc)
    weight = self.conv1d.weight.squeeze(1)
    heads, head_dim = self.num_heads, self.head_dim
    groups, dstate = self.n_groups, self.ssm_state_size
    tokens = batch * seqlen
    # FalconH1 without its norm gates inside the scan (z); everything else gates in the norm
    gated_norm = not falcon or self.mamba_rms_norm

    if states.previous and seqlen == 1:
        xbc = ops.causal_conv1d_update(
            x=xbc[:, 0], conv_state=states.conv, weight=weight,
            bias=self.conv1d.bias, activation=self.activation,
        )[:, None]
    else:
        cu_seqlens = torch.arange(0, tokens + 1, seqlen, dtype=torch.int32, device=xbc.device)
        # token-major input, so the conv's output is token-major too (what the SSM ops read)
        flat = xbc.reshape(tokens, self.conv_dim).contiguous()
        has_initial = (
            torch.ones(batch, dtype=torch.bool, device=xbc.device) if states.previous else None
        )
        xbc = ops.causal_conv1d_fn(
            x=flat.t(), weight=weight, bias=self.conv1d.bias,
            conv_states=states.conv, query_start_loc=cu_seqlens, cache_indices=states.conv_rows,
            has_initial_state=has_initial, activation=self.activation,
        ).t().view(batch, seqlen, self.conv_dim)
    xbc = _mask(xbc, attention_mask)
    x, B, C = xbc.split([self.intermediate_size, groups * dstate, groups * dstate], dim=-1)
    x = x.reshape(tokens, heads, head_dim)
    B = B.reshape(tokens, groups, dstate)
    C = C.reshape(tokens, groups, dstate)
    dt = dt.reshape(tokens, heads)
    z = None if gated_norm else gate.reshape(tokens, heads, head_dim)
    A = -torch.exp(self.A_log.float())

    if states.previous and seqlen == 1:
        # transformers' decode step does not clamp dt (only its prefill does): neither do we
        y = ops.selective_state_update(
            state=states.ssm, x=x,
            dt=dt[..., None].expand(tokens, heads, head_dim),
            A=A[:, None, None].expand(heads, head_dim, dstate), B=B, C=C,
            D=self.D[:, None].expand(heads, head_dim), z=z,
            dt_bias=self.dt_bias[:, None].expand(heads, head_dim), dt_softplus=True,
        )
    elif setup.prefill_op == "mamba_chunk_scan":
        y = ops.mamba_chunk_scan(
            state=states.ssm, x=x, dt=dt, A=A, B=B, C=C,
            chunk_size=self.chunk_size, cu_seqlens=cu_seqlens, D=self.D, z=z,
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=tuple(self.time_step_limit),
            state_batch_indices=states.src, dst_state_batch_indices=states.dst,
        )
    else:
        y = ops.selective_state_update(
            state=states.ssm, x=x,
            dt=dt[..., None].expand(tokens, heads, head_dim),
            A=A[:, None, None].expand(heads, head_dim, dstate), B=B, C=C,
            D=self.D[:, None].expand(heads, head_dim), z=z,
            dt_bias=self.dt_bias[:, None].expand(heads, head_dim), dt_softplus=True,
            dt_limit=tuple(self.time_step_limit), state_batch_indices=states.src,
            dst_state_batch_indices=states.dst, cu_seqlens=cu_seqlens,
        )
    y = y.reshape(batch, seqlen, heads * head_dim)
    if gated_norm:
        y = self.norm(y, gate)
    return self.out_proj(y.to(dtype))


def _mask(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # transformers zeroes padded positions (2-D mask) before in_proj and after the conv
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def _states(self: nn.Module, cache: Any, batch: int, xbc: torch.Tensor) -> _States:
    width = self.conv_kernel_size
    device = xbc.device
    ssm_shape = (self.num_heads, self.head_dim, self.ssm_state_size)
    if cache is None:
        # one scratch row nobody reads (pad sources) or writes (pad destinations)
        pads = torch.full((batch,), _PAD, dtype=torch.int32, device=device)
        conv = xbc.new_zeros(1, self.conv_dim, width - 1)
        ssm = torch.zeros(1, *ssm_shape, dtype=torch.float32, device=device)
        return _States(conv, ssm, pads, pads, pads, previous=False)
    cache.get_conv_state(self.layer_idx)  # raises transformers' error for a non-Mamba layer
    layer = cache.layers[self.layer_idx]
    previous = layer.has_previous_state[0]
    if not previous:
        _start(layer, xbc.new_empty(()).expand(batch, self.conv_dim, 0), width - 1, ssm_shape)
    # read from the layer on every call, never kept: beam search's reorder_cache replaces
    # these tensors by reordered copies between steps. A slice that keeps every dimension:
    # torch 2.13's Inductor misplaces writes to views of fewer dimensions (cache[1]) under
    # dynamic=True (integrations.md)
    conv = layer.conv_states[0][..., -(width - 1):]
    ssm = layer.recurrent_states[0]
    if previous:
        return _States(conv, ssm, None, None, None, previous=True)
    # nothing to continue from: read zero state (pad), write each row b
    rows = torch.arange(batch, dtype=torch.int32, device=device)
    pads = torch.full((batch,), _PAD, dtype=torch.int32, device=device)
    return _States(conv, ssm, pads, rows, None, previous=False)


def _start(layer: Any, conv_like: torch.Tensor, window: int, ssm_shape: tuple[int, ...]) -> None:
    """Allocate a cache layer's states if needed and mark them as holding a state (the call
    about to run writes every row)."""
    if not layer.is_conv_states_initialized[0]:
        # width - 1 columns: all the conv reads, and what transformers' own path also accepts
        layer.lazy_initialization(conv_states=conv_like, conv_kernel_size=window)
    if not layer.is_recurrent_states_initialized[0]:
        # float32, as transformers' own prefill leaves it
        template = torch.empty((), dtype=torch.float32, device=conv_like.device).expand(
            conv_like.shape[0], *ssm_shape
        )
        layer.lazy_initialization(recurrent_states=template)
    layer.has_previous_state[0] = True
