"""Run a transformers model's Mamba2 mixers on the IR ops: ``patch(model)``.

transformers (5.x) keeps each Mamba layer's conv window and SSM state in its own cache
object (``LinearAttentionLayer.conv_states[0]`` / ``recurrent_states[0]``, one row per
batch entry). The patched mixer hands those tensors to the ops as their state caches:
prefill is ``causal_conv1d_fn`` + ``mamba_chunk_scan`` (or the multi-token
``selective_state_update``), decode ``causal_conv1d_update`` + ``selective_state_update``;
the ops read and write the cache rows in place, through their index arguments (a fresh
cache is read as zero state and written row by row), so no state is copied. The cache's
bookkeeping (``has_previous_state``, the token count of transformers >= 5.25) is kept as
transformers' own forward keeps it.

Why a forward override and not transformers' hub-kernel hooks: those hooks need the
``kernels`` package, and their contracts do not carry a state cache — the prefill conv gets
a window transformers has already concatenated and copied, and the chunk scan returns a
final state that transformers then copies into the cache. Overriding the mixer's forward
(on the instance, nothing else in the model changes) keeps the cache tensors the ops' state.
The arithmetic matches transformers' own torch path (mask, multipliers, gate, norm order).

The override reproduces code that transformers changes between releases, so ``patch``
trusts no version: it accepts those of ``SUPPORTED_TRANSFORMERS`` only, and before patching
runs each mixer class once on a tiny throwaway instance, its own forward against the
patched one (prefill of a padded batch, continued prefill, decode steps; outputs and cache
layers), refusing the model if anything disagrees.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from torch import nn

from .. import ops
from ..priority import set_priority

# The transformers releases whose mixer forwards and cache API the patched forward
# reproduces: the `hf` extra requires exactly this (tests/test_packaging.py), and
# `make test-hf-oldest` runs the transformers tests on its lower bound.
SUPPORTED_TRANSFORMERS = ">=5.23,<5.26"

_BAMBA_LIKE = "mamba2"
_FALCON_H1 = "falcon_h1"


@dataclass(frozen=True)
class _Mixer:
    """A supported mixer class: which forward it has, and how to build a tiny one to check."""

    family: str  # _BAMBA_LIKE or _FALCON_H1
    config: str  # its config class, in the mixer's modeling module
    model: str  # a model class holding it (FalconH1Model gives its mixers their mup_vector)
    tiny: dict[str, Any]  # config arguments: one layer, a mixer of 4 heads of 8, d_state 4
    variants: tuple[dict[str, Any], ...] = field(default=({},))  # each checked


_SMALL = dict(vocab_size=8, hidden_size=16, num_hidden_layers=1, time_step_limit=(0.0, 1.0))
_ATTENTION = dict(num_attention_heads=2, num_key_value_heads=1, intermediate_size=16)
_MAMBA = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4,
              mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)

# Exact (module, class) of every mixer whose forward this file reproduces; a subclass may
# override anything, so it is not accepted.
MIXERS: dict[tuple[str, str], _Mixer] = {
    ("transformers.models.bamba.modeling_bamba", "BambaMixer"): _Mixer(
        _BAMBA_LIKE, "BambaConfig", "BambaModel",
        {**_SMALL, **_ATTENTION, **_MAMBA, "attn_layer_indices": []}),
    ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"): _Mixer(
        _BAMBA_LIKE, "Mamba2Config", "Mamba2Model",
        {**_SMALL, "num_heads": 4, "head_dim": 8, "state_size": 4, "n_groups": 2,
         "expand": 2, "conv_kernel": 4, "chunk_size": 4}),
    ("transformers.models.nemotron_h.modeling_nemotron_h", "NemotronHMamba2Mixer"): _Mixer(
        _BAMBA_LIKE, "NemotronHConfig", "NemotronHModel",
        {**_SMALL, **_ATTENTION, "layers_block_type": ["mamba"], "head_dim": 8,
         "ssm_state_size": 4, "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2,
         "conv_kernel": 4, "expand": 2, "chunk_size": 4}),
    ("transformers.models.granitemoehybrid.modeling_granitemoehybrid",
     "GraniteMoeHybridMambaLayer"): _Mixer(
        _BAMBA_LIKE, "GraniteMoeHybridConfig", "GraniteMoeHybridModel",
        {**_SMALL, **_ATTENTION, **_MAMBA, "layer_types": ["mamba"], "num_local_experts": 2,
         "num_experts_per_tok": 1, "shared_intermediate_size": 16}),
    ("transformers.models.falcon_h1.modeling_falcon_h1", "FalconH1Mixer"): _Mixer(
        _FALCON_H1, "FalconH1Config", "FalconH1Model",
        {**_SMALL, **_ATTENTION, **_MAMBA, "mamba_d_ssm": 32, "ssm_in_multiplier": 0.5,
         "ssm_multipliers": [1.5, 0.5, 1.0, 2.0, 0.75]},
        variants=({"mamba_rms_norm": False}, {"mamba_rms_norm": True})),
}
PREFILL_OPS = ("mamba_chunk_scan", "selective_state_update")
_ACTIVATIONS = (None, "silu", "swish")
_PAD = -1
# float32 on a CPU: the ops' native functions and transformers' torch path differ by
# rounding only (~1e-6 at the check's sizes); a wrong forward differs by the output's size
_CHECK_TOLERANCE = 1e-4


@dataclass(frozen=True)
class _Setup:
    """What the patched forward needs beyond the mixer's own attributes."""

    family: str
    prefill_op: str


def patch(
    model: nn.Module,
    *,
    prefill_op: str = "mamba_chunk_scan",
    state_dtype: torch.dtype | str = torch.float32,
) -> nn.Module:
    """Make every Mamba2 mixer of a loaded transformers ``model`` run on the IR ops.

    Supported mixers: Bamba, Mamba2, NemotronH, GraniteMoeHybrid and FalconH1 (``MIXERS``),
    under the transformers versions of ``SUPPORTED_TRANSFORMERS``. Before any module is
    changed, raises ``ValueError`` for another transformers version, for anything else with
    an SSM mixer (naming the layer and why), and for a mixer class whose own forward the
    patched one does not reproduce: each class is run once per process (per class and
    transformers version) on a tiny float32 CPU instance, never on ``model`` or its cache.
    ``prefill_op`` picks the prefill SSM op: ``"mamba_chunk_scan"`` or the multi-token
    ``"selective_state_update"`` (same result; the check runs both).
    ``state_dtype`` is the SSM state's dtype in the cache: float32 only, as transformers'
    own prefill leaves it (quantized states are refused: see :func:`_check_state_dtype`).
    Modules in training mode, and caches recording past states (rollback), keep
    transformers' own forward. Patching twice is a no-op. Returns ``model``.
    """
    if prefill_op not in PREFILL_OPS:
        raise ValueError(f"prefill_op: expected one of {PREFILL_OPS}, got {prefill_op!r}")
    _check_state_dtype(state_dtype)
    version = _supported_version(_installed_transformers())
    mixers = []
    for name, module in model.named_modules():
        spec = MIXERS.get((type(module).__module__, type(module).__qualname__))
        if spec is not None:
            _check_mixer(name, module)
            mixers.append((module, _Setup(spec.family, prefill_op)))
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
    for cls in dict.fromkeys(type(module) for module, _ in mixers):
        disagreement = _verdict(cls, cls.forward, version)
        if disagreement is not None:
            raise ValueError(
                f"model: the patched {cls.__qualname__} disagrees with {cls.__qualname__}'s "
                f"own forward under transformers {version} (a tiny float32 instance on the "
                f"CPU): {disagreement}; nothing was patched"
            )
    for module, setup in mixers:
        module._mamba_ir = setup
        module.forward = types.MethodType(_forward, module)
    return model


def _check_state_dtype(value: torch.dtype | str) -> None:
    """float32 passes. A quantized state is not supported yet: its scales would need a
    place in transformers' cache layers that transformers' own forward (training,
    rollback) and beam search's reorders keep in step with the state; other floats would
    leave the state in a dtype transformers' own forward does not."""
    from ..models.cache import resolve_state_dtype
    from ..ops._quant import QUANTIZED

    dtype = resolve_state_dtype(value, torch.float32)  # an unknown name: ValueError
    if dtype in QUANTIZED:
        raise ValueError(
            f"state_dtype: quantized SSM states ({value!r}) are not supported yet by the "
            "transformers integration (transformers' cache has no place for their scales); "
            "the bundled engine serves them: mamba_ir.models.Engine(state_dtype=...)"
        )
    if dtype != torch.float32:
        raise ValueError(f"state_dtype: expected float32 (the SSM state dtype transformers' "
                         f"own prefill leaves in its cache), got {value!r}")


def _installed_transformers() -> str:
    import transformers  # the caller's model comes from it: installed

    return transformers.__version__


def _supported_version(version: str) -> str:
    """``version`` if ``patch`` supports that transformers release, else ``ValueError``."""
    try:
        supported = Version(version) in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise ValueError(
            f"model: transformers {version} is installed; patch() supports transformers "
            f"{SUPPORTED_TRANSFORMERS}, whose mixer forwards and cache bookkeeping it "
            f"reproduces (pip install 'transformers{SUPPORTED_TRANSFORMERS}')"
        )
    return version


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


# Memoised on the class, its forward (a class whose forward was replaced is checked again)
# and the transformers version: a model of 40 mixers, or a second model, checks once.
@functools.cache
def _verdict(cls: type, forward: Any, version: str) -> str | None:
    """``None`` if the patched forward reproduces ``cls``'s own, else what disagreed."""
    spec = MIXERS[(cls.__module__, cls.__qualname__)]
    for variant in spec.variants:
        disagreement = _check_class(cls, forward, spec, variant)
        if disagreement is not None:
            return disagreement
    return None


def _check_class(cls: type, forward: Any, spec: _Mixer, variant: dict[str, Any]) -> str | None:
    """Run a tiny ``cls`` through prefill, continued prefill and decode by ``forward`` (its
    own), then patched with each prefill op, each run on throwaway caches of its own; the
    first disagreement in an output or a cache layer's attributes, or ``None``."""
    from transformers.cache_utils import DynamicCache

    modeling = sys.modules[cls.__module__]
    # the tiny model draws its weights from the global generator: leave the caller's alone
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _check_settings(), \
            set_priority(["native"]):
        torch.manual_seed(0)
        try:
            config = getattr(modeling, spec.config)(**spec.tiny, **variant)
            with torch.device("cpu"):  # whatever default device the caller set
                model = getattr(modeling, spec.model)(config).float().eval()
            mixer = next(m for m in model.modules() if type(m) is cls)
        except Exception as error:  # noqa: BLE001 - a version that builds it otherwise
            return (f"a tiny {spec.model} with a {cls.__qualname__} could not be built to "
                    f"check it ({type(error).__name__}: {error})")
        draw = functools.partial(torch.randn, generator=torch.Generator().manual_seed(0))
        batch, hidden = 3, config.hidden_size
        prompt = draw(batch, 10, hidden)  # chunks of 4: three, the last one short
        mask = torch.ones(batch, 10, dtype=torch.long)
        mask[0, :4], mask[2, :1] = 0, 0  # left padding
        steps = [  # (phase, input, 2-D mask, which cache)
            ("prefill without a cache", prompt, mask, None),
            ("prefill of a left-padded batch", prompt, mask, 0),
            ("continued prefill (3 tokens)", draw(batch, 3, hidden), None, 0),
            *((f"decode step {i}", draw(batch, 1, hidden), None, 0) for i in (1, 2, 3)),
            ("one-token prefill", draw(batch, 1, hidden), None, 1),
            ("decode after a one-token prefill", draw(batch, 1, hidden), None, 1),
        ]

        def run(call: Any) -> list[tuple[torch.Tensor, list[dict[str, Any]]]]:
            """Each step's output and, after it, the attributes of its cache's layers."""
            caches = [DynamicCache(config=config) for _ in range(2)]
            out = []
            for _, x, attention_mask, which in steps:
                cache = None if which is None else caches[which]
                y = call(x.clone(), cache, attention_mask)
                layers = [] if cache is None else [copy.deepcopy(vars(lay)) for lay in cache.layers]
                out.append((y, layers))
            return out

        try:
            wanted = run(lambda x, cache, mask: forward(mixer, x, cache, mask))
        except Exception as error:  # noqa: BLE001 - a failure is the verdict
            return f"its own forward raised {type(error).__name__}: {error}"
        # the decoder layers pass the cache by this version's name (cache_params, cache)
        name = "cache_params" if "cache_params" in inspect.signature(forward).parameters \
            else "cache"
        width = mixer.conv_kernel_size
        for prefill_op in PREFILL_OPS:
            mixer._mamba_ir = _Setup(spec.family, prefill_op)
            setting = ", ".join([f"prefill_op={prefill_op!r}",
                                 *(f"{k}={v!r}" for k, v in variant.items())])
            try:
                got = run(lambda x, cache, mask: _forward(
                    mixer, x, attention_mask=mask, **({} if cache is None else {name: cache})))
            except Exception as error:  # noqa: BLE001
                return f"the patched forward raised {type(error).__name__} ({setting}): {error}"
            for (phase, *_), (y, layers), (want_y, want_layers) in zip(
                    steps, got, wanted, strict=True):
                where = f", in the {phase} ({setting})"
                found = _disagreement(y, want_y)
                if found is not None:
                    return f"the output {found}{where}"
                for index, (mine, theirs) in enumerate(zip(layers, want_layers, strict=True)):
                    for key in sorted(mine.keys() | theirs.keys()):
                        # the conv reads (and the patched forward writes) only the last
                        # width - 1 columns of transformers' width-wide window
                        window = width - 1 if key == "conv_states" else None
                        found = _disagreement(mine.get(key, "missing"),
                                              theirs.get(key, "missing"), window)
                        if found is not None:
                            space = "" if found.startswith("[") else " "
                            return f"cache layer {index}'s {key}{space}{found}{where}"
    return None


@contextlib.contextmanager
def _check_settings() -> Iterator[None]:
    """The process settings the check runs under; the caller's are restored after.

    - float32 as the default dtype: the check is float32 whatever the caller set;
    - one intra-op thread: the check's ops are tiny, and on a busy machine (a CI runner,
      pytest workers) every thread team costs more than the op;
    - transformers' warnings held back: its own forward warns that it runs its torch
      reference path, true of the check's reference run, not of the patched model.
    """
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    logger = logging.getLogger("transformers")
    level = logger.level
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def _disagreement(got: Any, want: Any, window: int | None = None) -> str | None:
    """How ``got`` differs from ``want`` (tensors beyond rounding, over their last
    ``window`` columns if given; containers element by element), or ``None``."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            shown = (f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor)
                     else repr(got))
            return f"is {shown} where its own forward's is {want.dtype} {tuple(want.shape)}"
        if window is not None:
            got, want = got[..., -window:], want[..., -window:]
        if want.numel() == 0:
            return None
        a, b = got.double(), want.double()
        same = (a == b) | (a.isnan() & b.isnan())  # equal infinities, NaN where both are
        diff = torch.where(same, 0.0, (a - b).abs()).max().item()
        scale = torch.where(b.isfinite(), b.abs(), 0.0).max().item()
        # relative to the largest value: rounding of float32 arithmetic in another order
        if math.isnan(diff) or diff > _CHECK_TOLERANCE * max(scale, 1e-3):
            return f"differs by up to {diff:.2g} (its largest value {scale:.2g})"
        return None
    if isinstance(want, dict) and isinstance(got, dict) and got.keys() == want.keys():
        for key in want:
            found = _disagreement(got[key], want[key], window)
            if found is not None:
                return f"[{key!r}] {found}"
        return None
    if isinstance(want, (list, tuple)) and type(got) is type(want) and len(got) == len(want):
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            found = _disagreement(g, w, window)
            if found is not None:
                return f"[{index}] {found}"
        return None
    if type(got) is type(want) and got == want:
        return None
    return f"is {got!r} where its own forward's is {want!r}"


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
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    # transformers 5.23's decoder layers pass the cache as cache_params=, later ones as cache=
    if "cache_params" in kwargs:
        legacy = kwargs.pop("cache_params")
        if cache is not None and legacy is not None and legacy is not cache:
            raise ValueError("cache_params: expected the cache once, as cache or cache_params")
        cache = legacy if cache is None else cache
    packed = kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None
    if self.training or packed or (cache is not None and cache.is_recording_past(self.layer_idx)):
        return type(self).forward(self, hidden_states, cache, attention_mask, **kwargs)
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
    states = _states(self, cache, batch, seqlen, xbc)
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


def _states(
    self: nn.Module, cache: Any, batch: int, seqlen: int, xbc: torch.Tensor
) -> _States:
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
        _start(layer, xbc.new_empty(()).expand(batch, self.conv_dim, 0), width, ssm_shape)
    _count(layer, seqlen)
    # read from the layer on every call, never kept: beam search's reorder_cache replaces
    # these tensors by reordered copies between steps. The conv reads the last width - 1
    # columns of transformers' width-wide window: a slice that keeps every dimension, as
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


def _start(layer: Any, conv_like: torch.Tensor, width: int, ssm_shape: tuple[int, ...]) -> None:
    """Allocate a cache layer's states if needed, as transformers' own prefill does, and mark
    them as holding a state (the call about to run writes every row)."""
    if not layer.is_conv_states_initialized[0]:
        # width columns, as transformers allocates them (the conv reads the last width - 1)
        layer.lazy_initialization(conv_states=conv_like, conv_kernel_size=width)
    if not layer.is_recurrent_states_initialized[0]:
        # float32, as transformers' own prefill leaves it
        template = torch.empty((), dtype=torch.float32, device=conv_like.device).expand(
            conv_like.shape[0], *ssm_shape
        )
        layer.lazy_initialization(recurrent_states=template)
    layer.has_previous_state[0] = True


def _count(layer: Any, tokens: int) -> None:
    """Count the call's tokens where the cache layer counts them: transformers >= 5.25 keeps
    ``cumulative_length_linear`` (a cache without attention layers reports it as its
    ``get_seq_length``, which ``generate()`` reads), adding each call's length (prefill,
    ``update_conv_state``) or one (decode, ``increase_count``); earlier versions count
    nothing."""
    counter = getattr(layer, "cumulative_length_linear", None)
    if counter is not None:
        counter.add_(tokens)
