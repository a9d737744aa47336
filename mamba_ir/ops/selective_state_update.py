"""``selective_state_update``: the SSM recurrence for decode, one or more tokens per sequence."""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import checks
from ..op import Redirect, Rows, RowSpec, register_op
from . import _example
from ._quant import STATE_DTYPES, check_scale, check_seed, row_value
from ._rows import initial, store
from ._step import decay, step_size
from ._tokens import token_layout

INDICES = ("state_batch_indices", "dst_state_batch_indices")
NACC = "num_accepted_tokens"


def _layout(call: dict):
    x, state = call["x"], call["state"]
    lead = tuple(x.shape[: x.dim() - (state.dim() - 2)])  # (batch,), (batch, T) or (tokens,)
    return lead, token_layout(lead, call["cu_seqlens"], x.device)


def _rows(call: dict) -> Rows:
    _, seq = _layout(call)
    nacc = call["num_accepted_tokens"]
    src, dst = seq.rows(call["state_batch_indices"], call["dst_state_batch_indices"], nacc)
    cols = torch.arange(dst.shape[1], device=dst.device)[None, :]
    if nacc is None:  # the final state, into the first column
        written = (cols == 0) & (seq.lengths > 0)[:, None]
    else:  # speculative: the state after each token, into its own column
        written = cols < seq.lengths[:, None]
    return Rows(src, torch.ones_like(src, dtype=torch.bool), dst, written)


def _whole_rows(call: dict) -> str | None:
    if call["num_accepted_tokens"] is not None:
        return "speculative decoding (num_accepted_tokens) writes one row per token"
    lead = call["x"].dim() - (call["state"].dim() - 1)
    if lead == 2 and not statically_known_true(call["x"].shape[1] >= 1):
        return "tokens per sequence may be 0"
    return None


@register_op(
    mutates_args=("state", "out", "state_scale"),
    allocate={"out": lambda call: torch.empty_like(call["x"])},
    # the full-size GPU tests (dstate 128, 16 tokens per sequence) passed at these on an H100
    # on 2026-11-23 (GPU exp and FMA; the table's float32 1e-5 holds in the interpreter only)
    tolerances={torch.float32: (2e-4, 2e-4), torch.float16: (3e-3, 3e-3)},
    rows=RowSpec(("state", "state_scale"), "state_batch_indices", "dst_state_batch_indices",
                 _rows, value=row_value),
    redirect=Redirect("cu_seqlens", _whole_rows),
)
def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] | None = None,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    cu_seqlens: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    state_scale: torch.Tensor | None = None,
    rand_seed: torch.Tensor | None = None,
) -> None:
    """Run each sequence's tokens through the recurrence from its source row (docs/ops.md)."""
    if state.dim() == 3:
        state, x, dt, A, B, C, D, z, dt_bias, out = one_head(
            state, x, dt, A, B, C, D, z, dt_bias, out
        )
        state_scale = None if state_scale is None else state_scale.unsqueeze(1)
    heads_per_group = state.shape[1] // B.shape[-2]
    seq = token_layout(x.shape[:-2], cu_seqlens, x.device)
    src, dst = seq.rows(state_batch_indices, dst_state_batch_indices, num_accepted_tokens)

    h = initial(state, src, pad_slot_id, scale=state_scale)
    for t in range(seq.max_len):
        live, tok = seq.step(t)
        xt = seq.gather(x, tok).float()
        dtt = step_size(seq.gather(dt, tok), dt_bias, dt_softplus, dt_limit)
        Bt = seq.gather(B, tok).float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        Ct = seq.gather(C, tok).float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        dtt = dtt[..., None]
        h_next = h * decay(A.float(), dtt) + dtt * Bt * xt[..., None]
        h = torch.where(live[:, None, None, None], h_next, h)
        y = (h * Ct).sum(-1)
        if D is not None:
            y = y + D.float() * xt
        if z is not None:
            y = y * F.silu(seq.gather(z, tok).float())
        seq.scatter(out, tok[live], y[live])
        if num_accepted_tokens is not None and t < dst.shape[1]:  # speculative: a slot per token
            store(state, dst[:, t], h, live, pad_slot_id, state_scale, rand_seed, t)
    if num_accepted_tokens is None:
        store(state, dst[:, 0], h, seq.lengths > 0, pad_slot_id, state_scale, rand_seed)


def one_head(*args: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Mamba1 ``(state, x, dt, A, B, C, D, z, dt_bias, out)`` as views in the Mamba2 layout
    with one head and one group."""
    state, x, dt, A, B, C, D, z, dt_bias, out = args
    per_token = (t if t is None else t.unsqueeze(-2) for t in (x, dt, B, C, z, out))
    x, dt, B, C, z, out = per_token
    A, D, dt_bias = (t if t is None else t.unsqueeze(0) for t in (A, D, dt_bias))
    return state.unsqueeze(1), x, dt, A, B, C, D, z, dt_bias, out



@selective_state_update.register_check
def _check(call: dict) -> None:
    state = checks.tensor(call, "state", ndim=(3, 4), dtypes=STATE_DTYPES)
    check_scale(call)
    check_seed(call)
    checks.writable(call, "state")
    checks.same_device(call, "state")
    heads = tuple(state.shape[1:-2])  # () for Mamba1, (nheads,) for Mamba2
    dim, dstate = state.shape[-2:]
    varlen = call["cu_seqlens"] is not None
    x_ndims = (state.dim() - 1,) if varlen else (state.dim() - 1, state.dim())
    x = checks.tensor(call, "x", ndim=x_ndims)
    lead = tuple(x.shape[: x.dim() - len(heads) - 1])
    if tuple(x.shape[len(lead) :]) != (*heads, dim):
        checks.fail("x", f"shape (*tokens, {', '.join(map(str, (*heads, dim)))})", tuple(x.shape))
    checks.tensor(call, "dt", shape=x.shape)
    for name in ("z", "out"):
        checks.tensor(call, name, shape=x.shape, optional=True)
    if call["out"] is not None:
        checks.same_dtype(call, "out", "x")
        checks.writable(call, "out")
    checks.tensor(call, "A", shape=(*heads, dim, dstate))
    for name in ("D", "dt_bias"):
        checks.tensor(call, name, shape=(*heads, dim), optional=True)
    b = checks.tensor(call, "B", ndim=len(lead) + 1 + len(heads))
    groups = tuple(b.shape[len(lead) : -1])
    bad_groups = heads and (groups[0] == 0 or heads[0] % groups[0])
    if tuple(b.shape) != (*lead, *groups, dstate) or bad_groups:
        want = (
            f"({', '.join(map(str, lead))}, {'ngroups dividing nheads, ' if heads else ''}{dstate})"
        )
        checks.fail("B", f"shape {want}", tuple(b.shape))
    checks.tensor(call, "C", shape=b.shape)
    checks.dt_limit(call)

    cu = checks.index(call, "cu_seqlens")
    if cu is not None and cu.shape[0] < 1:
        checks.fail("cu_seqlens", "at least one entry", tuple(cu.shape))
    nseq = cu.shape[0] - 1 if varlen else lead[0]
    checks.enough_rows(call, "state", "state_batch_indices", nseq)
    spec = call["num_accepted_tokens"] is not None
    checks.index(call, "num_accepted_tokens", rows=nseq, padded=True)
    for name in ("state_batch_indices", "dst_state_batch_indices"):
        idx = checks.index(
            call, name, ndim=(2,) if spec else (1, 2), rows=nseq, padded=True, min_cols=1
        )
        if spec and idx is None and name == "state_batch_indices":
            checks.fail(name, "2-D slot indices (one per token) with num_accepted_tokens", None)
        if spec and len(lead) == 2 and idx is not None and idx.shape[1] < lead[1]:
            checks.fail(name, f"at least {lead[1]} columns (one per token)", tuple(idx.shape))


@selective_state_update.register_value_check
def _check_values(call: dict) -> None:
    cu = call["cu_seqlens"]
    lead, seq = _layout(call)
    if cu is not None:
        checks.cumulative("cu_seqlens", cu, lead[0])
    checks.indices_in_range(call, INDICES, seq.count, call["state"].shape[0])
    sbi, dsbi, nacc = (checks.sequences(call[k], seq.count) for k in (*INDICES, NACC))
    for name, idx in zip(INDICES, (sbi, dsbi), strict=True):
        if idx is not None and nacc is not None and idx.shape[1] < seq.max_len:
            checks.fail(
                name, f"at least {seq.max_len} columns (longest sequence)", tuple(idx.shape)
            )
    # vLLM's count of what the previous step accepted: it may exceed this step's tokens,
    # but its source column max(n - 1, 0) must exist
    if nacc is not None and bool(((nacc < 0) | (nacc > sbi.shape[1])).any()):
        checks.fail(
            "num_accepted_tokens",
            f"values in [0, {sbi.shape[1]}] (the columns of state_batch_indices)",
            nacc.tolist(),
        )


@selective_state_update.register_device_check
def _device_check(call: dict) -> None:
    cu = call["cu_seqlens"]
    lead, seq = _layout(call)
    if cu is not None:
        checks.assert_cumulative("cu_seqlens", cu, lead[0])
    checks.indices_in_range(call, INDICES, seq.count, call["state"].shape[0], on_device=True)
    sbi, dsbi, nacc = (checks.sequences(call[k], seq.count) for k in (*INDICES, NACC))
    if nacc is not None:
        checks.assert_within(
            "num_accepted_tokens", nacc, 0, sbi.shape[1],
            f"values in [0, {sbi.shape[1]}] (the columns of state_batch_indices)",
        )
        ncols = sbi.shape[1] if dsbi is None else dsbi.shape[1]
        checks.assert_within(
            "cu_seqlens" if cu is not None else "x", seq.lengths, 0, ncols,
            f"at most {ncols} tokens per sequence (one index column per token)",
        )


@selective_state_update.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    heads, dim, n = s.heads, s.head_dim, s.batch
    A = -randn(heads, dt=torch.float32).exp()
    return {
        "state": randn(s.slots, heads, dim, s.d_state), "x": randn(n, heads, dim),
        "dt": randn(n, heads)[..., None].expand(n, heads, dim),  # tied over headdim
        "A": A[:, None, None].expand(heads, dim, s.d_state),
        "B": randn(n, s.groups, s.d_state), "C": randn(n, s.groups, s.d_state),
        "D": randn(heads)[:, None].expand(heads, dim),
        "dt_bias": randn(heads)[:, None].expand(heads, dim), "dt_softplus": True,
        "state_batch_indices": _example.rows(device), "out": randn(n, heads, dim),
    }


selective_state_update.register_strategy(_example.testing_strategy("selective_state_update_calls"))
