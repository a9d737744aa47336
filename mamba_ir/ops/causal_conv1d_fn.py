"""``causal_conv1d_fn``: varlen prefill of the depthwise causal conv, continuing cached windows."""

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .. import checks
from ..op import Redirect, Rows, RowSpec, register_op
from . import _example
from ._rows import check_prefill_values, per_sequence_rows, whole_window


def _rows(call: dict) -> Rows:
    qsl = call["query_start_loc"]
    return per_sequence_rows(call, "cache_indices", "src_cache_indices", qsl[1:] - qsl[:-1])


@register_op(
    mutates_args=("conv_states",),
    rows=RowSpec("conv_states", "src_cache_indices", "cache_indices", _rows),
    redirect=Redirect(
        "query_start_loc", lambda call: whole_window(call["conv_states"], call["weight"])
    ),
)
def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    pad_slot_id: int = -1,
    src_cache_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolve each sequence of ``x`` (dim, tokens) after its window; save the new window."""
    width = weight.shape[1]
    out = torch.empty_like(x)
    if x.shape[0] == 0:  # no channels: nothing to convolve or keep (conv1d refuses 0 groups)
        return out
    # offsets outside the tokens (an unchecked call) shorten the sequence, as in every provider
    bounds = query_start_loc.clamp(0, x.shape[1]).tolist()
    dst = range(len(bounds) - 1) if cache_indices is None else cache_indices.tolist()
    src = dst if src_cache_indices is None else src_cache_indices.tolist()
    initial = [False] * len(dst) if has_initial_state is None else has_initial_state.tolist()
    nslots = conv_states.shape[0]

    def real(row: int) -> bool:  # unchecked (compiled) indices never wrap or reach past
        return row != pad_slot_id and 0 <= row < nslots

    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
        if end <= start:
            continue
        window = torch.zeros(x.shape[0], width - 1, device=x.device)
        if initial[b] and real(src[b]):
            window = conv_states[src[b], :, : width - 1].float()
        seq = torch.cat([window, x[:, start:end].float()], dim=1)
        y = F.conv1d(seq[None], weight.float()[:, None], _float(bias), groups=x.shape[0])[0]
        out[:, start:end] = F.silu(y) if activation in ("silu", "swish") else y
        if real(dst[b]):
            conv_states[dst[b], :, : width - 1] = seq[:, -(width - 1) :].to(conv_states.dtype)
    return out


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@causal_conv1d_fn.register_fake
def _fake(x: torch.Tensor, **_: object) -> torch.Tensor:
    return torch.empty_like(x)


@causal_conv1d_fn.register_check
def _check(call: dict) -> None:
    x = checks.tensor(call, "x", ndim=2)
    checks.same_device(call, "x")
    dim = x.shape[0]
    weight = checks.tensor(call, "weight", ndim=2)
    if weight.shape[0] != dim or weight.shape[1] < 2:
        checks.fail("weight", f"shape ({dim}, width >= 2)", tuple(weight.shape))
    width = weight.shape[1]
    checks.tensor(call, "bias", shape=(dim,), optional=True)
    states = checks.tensor(call, "conv_states", ndim=3)
    checks.writable(call, "conv_states")
    if states.shape[1] != dim or states.shape[2] < width - 1:
        checks.fail("conv_states", f"shape (slots, {dim}, >= {width - 1})", tuple(states.shape))
    qsl = checks.index(call, "query_start_loc", optional=False)
    nseq = qsl.shape[0] - 1
    if nseq < 0:
        checks.fail("query_start_loc", "at least one entry", tuple(qsl.shape))
    for name in ("cache_indices", "src_cache_indices"):
        checks.index(call, name, rows=nseq, padded=True)
    checks.index(call, "has_initial_state", rows=nseq, padded=True, dtypes=(torch.bool,))
    checks.enough_rows(call, "conv_states", "cache_indices", nseq)
    checks.activation(call)


@causal_conv1d_fn.register_value_check
def _check_values(call: dict, on_device: bool = False) -> None:
    check_prefill_values(call, "query_start_loc", call["x"].shape[1], "conv_states",
                         ("cache_indices", "src_cache_indices"), on_device=on_device)


causal_conv1d_fn.register_device_check(partial(_check_values, on_device=True))


@causal_conv1d_fn.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    dim, tokens = s.conv_dim, s.batch * s.tokens_per_seq
    return {
        "x": randn(tokens, dim).t(), "weight": randn(dim, s.width), "bias": randn(dim),
        "conv_states": randn(s.slots, dim, s.width - 1),
        "query_start_loc": _example.offsets(device), "cache_indices": _example.rows(device),
        "has_initial_state": torch.ones(s.batch, dtype=torch.bool, device=device),
    }


causal_conv1d_fn.register_strategy(_example.testing_strategy("causal_conv1d_fn_calls"))
