"""``causal_conv1d_update``: decode step of the depthwise causal conv, 1..T tokens per sequence."""

from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import checks
from ..op import Redirect, Rows, RowSpec, register_op
from . import _example
from ._rows import whole_window
from ._tokens import token_layout

INDICES = ("conv_state_indices", "src_conv_state_indices")
NACC, OFFSET = "num_accepted_tokens", "src_token_offset"


def _lead(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], x.shape[2]) if x.dim() == 3 else (x.shape[0],)


def _rows(call: dict) -> Rows:
    x = call["x"]
    seq = token_layout(_lead(x), call["query_start_loc"], x.device)
    dst, src = call["conv_state_indices"], call["src_conv_state_indices"]
    if dst is None:  # row b for sequence b, also when only the sources are given
        dst = torch.arange(seq.count, device=x.device)
    src_rows, dst_rows = seq.rows(dst if src is None else src, dst, None)
    reads = torch.ones_like(src_rows, dtype=torch.bool)
    return Rows(src_rows, reads, dst_rows, (seq.lengths > 0)[:, None])


def _whole_rows(call: dict) -> str | None:
    if call["num_accepted_tokens"] is not None:
        return "speculative decoding (num_accepted_tokens) keeps extra columns"
    why = whole_window(call["conv_state"], call["weight"])
    x = call["x"]
    if why is None and x.dim() == 3 and not statically_known_true(x.shape[2] >= 1):
        return "tokens per sequence may be 0"
    return why


@register_op(
    mutates_args=("conv_state",),
    rows=RowSpec("conv_state", "src_conv_state_indices", "conv_state_indices", _rows),
    redirect=Redirect("query_start_loc", _whole_rows),
)
def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    conv_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    src_conv_state_indices: torch.Tensor | None = None,
    src_token_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolve each sequence's new tokens after its window; roll the window (docs/ops.md)."""
    width = weight.shape[1]
    tokens = x.transpose(1, 2) if x.dim() == 3 else x  # (*tokens, dim)
    out = torch.empty_like(x)
    out_tokens = out.transpose(1, 2) if x.dim() == 3 else out
    seq = token_layout(tokens.shape[:-1], query_start_loc, x.device)
    nslots, state_len = conv_state.shape[0], conv_state.shape[2]
    dst_idx = conv_state_indices
    if dst_idx is None:  # row b for sequence b, also when only the sources are given
        dst_idx = torch.arange(seq.count, device=x.device)
    src_idx = dst_idx if src_conv_state_indices is None else src_conv_state_indices
    src, dst = seq.rows(src_idx, dst_idx, None)
    offset = torch.zeros_like(src)
    if src_token_offset is not None:
        offset = src_token_offset[: seq.count].long()
    elif num_accepted_tokens is not None:
        offset = (num_accepted_tokens[: seq.count].long() - 1).clamp(min=0)

    # history[b] = the width-1 cached columns from `offset`, then this call's tokens
    dim = weight.shape[0]
    history = torch.zeros(seq.count, dim, width - 1 + max(seq.max_len, 1), device=x.device)
    has_src = checks.real_rows(src, nslots, pad_slot_id)
    cols = offset[has_src, None, None] + torch.arange(width - 1, device=x.device)
    cols = cols.clamp(0, state_len - 1)  # unchecked (compiled) offsets never read past the row
    rows = conv_state[src[has_src]]
    history[has_src, :, : width - 1] = rows.gather(2, cols.expand(-1, rows.shape[1], -1)).float()
    for t in range(seq.max_len):
        live, tok = seq.step(t)
        history[live, :, width - 1 + t] = seq.gather(tokens, tok)[live].float()
    y = (history.unfold(2, width, 1) * weight.float()[:, None]).sum(-1)  # (count, dim, max_len)
    if bias is not None:
        y = y + bias.float()[:, None]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    for t in range(seq.max_len):
        live, tok = seq.step(t)
        seq.scatter(out_tokens, tok[live], y[live, :, t])

    # speculative rows keep every new token after the first history column; others keep
    # the last width-1 columns
    spec = num_accepted_tokens is not None
    shift = torch.ones_like(seq.lengths) if spec else seq.lengths
    keep = seq.lengths + (width - 2) if spec else torch.full_like(seq.lengths, width - 1)
    writes = (seq.lengths > 0) & checks.real_rows(dst[:, 0], nslots, pad_slot_id)
    keep = torch.where(writes, keep, 0)
    for c in range(min(int(keep.max()), state_len) if seq.count else 0):
        m = c < keep
        conv_state[dst[m, 0], :, c] = history[m, :, shift[m] + c].to(conv_state.dtype)
    return out


@causal_conv1d_update.register_fake
def _fake(x: torch.Tensor, **_: object) -> torch.Tensor:
    return torch.empty_like(x)


@causal_conv1d_update.register_check
def _check(call: dict) -> None:
    state = checks.tensor(call, "conv_state", ndim=3)
    checks.writable(call, "conv_state")
    checks.same_device(call, "conv_state")
    dim, state_len = state.shape[1:]
    varlen = call["query_start_loc"] is not None
    x = checks.tensor(call, "x", ndim=(2,) if varlen else (2, 3))
    if x.shape[1] != dim:
        checks.fail(
            "x", f"channels {dim} in dim 1 ((batch, dim[, T]) or (tokens, dim))", tuple(x.shape)
        )
    weight = checks.tensor(call, "weight", ndim=2)
    if weight.shape[0] != dim or weight.shape[1] < 2:
        checks.fail("weight", f"shape ({dim}, width >= 2)", tuple(weight.shape))
    width = weight.shape[1]
    if width - 1 > state_len:  # the window of a weight this wide does not fit the state
        checks.fail(
            "conv_state",
            f"at least {width - 1} columns (the width-1 window of weight's width {width})",
            tuple(state.shape),
        )
    checks.tensor(call, "bias", shape=(dim,), optional=True)
    checks.activation(call)
    qsl = checks.index(call, "query_start_loc")
    if qsl is not None and qsl.shape[0] < 1:
        checks.fail("query_start_loc", "at least one entry", tuple(qsl.shape))
    nseq = qsl.shape[0] - 1 if varlen else x.shape[0]
    for name in (
        "conv_state_indices",
        "src_conv_state_indices",
        "num_accepted_tokens",
        "src_token_offset",
    ):
        checks.index(call, name, rows=nseq, padded=True)
    checks.enough_rows(call, "conv_state", "conv_state_indices", nseq)
    per_seq = x.shape[2] if x.dim() == 3 else 1
    if call["num_accepted_tokens"] is not None and not varlen and width - 2 + per_seq > state_len:
        checks.fail(
            "conv_state",
            f"at least {width - 2 + per_seq} columns (width-2 + tokens)",
            tuple(state.shape),
        )


@causal_conv1d_update.register_value_check
def _check_values(call: dict) -> None:
    x, qsl = call["x"], call["query_start_loc"]
    nslots, state_len = call["conv_state"].shape[0], call["conv_state"].shape[2]
    width = call["weight"].shape[1]
    if qsl is not None:
        checks.cumulative("query_start_loc", qsl, x.shape[0])
    seq = token_layout(_lead(x), qsl, x.device)
    nacc, offset = (checks.sequences(call[k], seq.count) for k in (NACC, OFFSET))
    checks.indices_in_range(call, INDICES, seq.count, nslots)
    for name, start in (("src_token_offset", offset), ("num_accepted_tokens", nacc)):
        if start is not None:
            first = start if name == "src_token_offset" else (start - 1).clamp(min=0)
            if bool(((first < 0) | (first + width - 1 > state_len)).any()):
                checks.fail(name, f"a window start in [0, {state_len - width + 1}]", start.tolist())
    if nacc is not None and bool((seq.lengths + width - 2 > state_len).any()):
        checks.fail(
            "conv_state", "room for width-2 + tokens columns per sequence", seq.lengths.tolist()
        )


@causal_conv1d_update.register_device_check
def _device_check(call: dict) -> None:
    x, state, qsl = call["x"], call["conv_state"], call["query_start_loc"]
    nslots, state_len = state.shape[0], state.shape[2]
    width = call["weight"].shape[1]
    if qsl is not None:
        checks.assert_cumulative("query_start_loc", qsl, x.shape[0])
    seq = token_layout(_lead(x), qsl, x.device)
    nacc, offset = (checks.sequences(call[k], seq.count) for k in (NACC, OFFSET))
    checks.indices_in_range(call, INDICES, seq.count, nslots, on_device=True)
    window = f"a window start in [0, {state_len - width + 1}]"
    if offset is not None:
        checks.assert_within("src_token_offset", offset, 0, state_len - width + 1, window)
    if nacc is not None:
        checks.assert_within("num_accepted_tokens", nacc, -(2**62), state_len - width + 2, window)
        checks.assert_within(
            "conv_state", seq.lengths, 0, state_len - width + 2,
            "room for width-2 + tokens columns per sequence",
        )


@causal_conv1d_update.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    dim = s.conv_dim
    return {"x": randn(s.batch, dim), "conv_state": randn(s.slots, dim, s.width - 1),
            "weight": randn(dim, s.width), "bias": randn(dim),
            "conv_state_indices": _example.rows(device)}


causal_conv1d_update.register_strategy(_example.testing_strategy("causal_conv1d_update_calls"))
