"""``selective_state_update``: the SSM recurrence for decode, one or more tokens per sequence."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..op import register_op
from ._rows import initial, store
from ._step import step_size
from ._tokens import token_layout


@register_op(
    mutates_args=("state", "out"),
    allocate={"out": lambda call: torch.empty_like(call["x"])},
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
) -> None:
    """Run each sequence's tokens through the recurrence from its source row (docs/ops.md)."""
    if state.dim() == 3:
        state, x, dt, A, B, C, D, z, dt_bias, out = one_head(
            state, x, dt, A, B, C, D, z, dt_bias, out
        )
    heads_per_group = state.shape[1] // B.shape[-2]
    seq = token_layout(x.shape[:-2], cu_seqlens, x.device)
    src, dst = seq.rows(state_batch_indices, dst_state_batch_indices, num_accepted_tokens)

    h = initial(state, src, pad_slot_id)
    for t in range(seq.max_len):
        live, tok = seq.step(t)
        xt = seq.gather(x, tok).float()
        dtt = step_size(seq.gather(dt, tok), dt_bias, dt_softplus, dt_limit)
        Bt = seq.gather(B, tok).float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        Ct = seq.gather(C, tok).float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        dtt = dtt[..., None]
        h_next = h * torch.exp(A.float() * dtt) + dtt * Bt * xt[..., None]
        h = torch.where(live[:, None, None, None], h_next, h)
        y = (h * Ct).sum(-1)
        if D is not None:
            y = y + D.float() * xt
        if z is not None:
            y = y * F.silu(seq.gather(z, tok).float())
        seq.scatter(out, tok[live], y[live])
        if num_accepted_tokens is not None and t < dst.shape[1]:  # speculative: a slot per token
            store(state, dst[:, t], h, live, pad_slot_id)
    if num_accepted_tokens is None:
        store(state, dst[:, 0], h, seq.lengths > 0, pad_slot_id)


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
    state = checks.tensor(call, "state", ndim=(3, 4))
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
    if call["state_batch_indices"] is None and nseq > state.shape[0]:
        checks.fail(
            "state",
            f"at least {nseq} rows (one per sequence, no indices given)",
            tuple(state.shape),
        )
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
    _check_values(call, state.shape[0], lead)


def _check_values(call: dict, nslots: int, lead: tuple[int, ...]) -> None:
    cu, nacc, pad = call["cu_seqlens"], call["num_accepted_tokens"], call["pad_slot_id"]
    sbi, dsbi = call["state_batch_indices"], call["dst_state_batch_indices"]
    if not checks.values_readable(call["x"], cu, nacc, sbi, dsbi):
        return
    if cu is not None:
        checks.cumulative("cu_seqlens", cu, lead[0])
    seq = token_layout(lead, cu, call["x"].device)
    sbi, dsbi, nacc = (checks.sequences(t, seq.count) for t in (sbi, dsbi, nacc))
    for name, idx in (("state_batch_indices", sbi), ("dst_state_batch_indices", dsbi)):
        if idx is None:
            continue
        checks.rows_in_range(name, idx, nslots, pad)
        if nacc is not None and idx.shape[1] < seq.max_len:
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
    src, dst = seq.rows(sbi, dsbi, nacc)
    lengths = seq.lengths.tolist()
    if nacc is None:
        written = [row[:1] if n > 0 else [] for row, n in zip(dst.tolist(), lengths, strict=True)]
    else:
        written = [row[:n] for row, n in zip(dst.tolist(), lengths, strict=True)]
    dst_name = "dst_state_batch_indices" if dsbi is not None else "state_batch_indices"
    checks.disjoint_rows("state_batch_indices", src.tolist(), dst_name, written, pad)


@selective_state_update.register_device_check
def _device_check(call: dict) -> None:
    x, state, cu, pad = call["x"], call["state"], call["cu_seqlens"], call["pad_slot_id"]
    lead = tuple(x.shape[: x.dim() - (state.dim() - 2)])
    nslots = state.shape[0]
    if cu is not None:
        checks.assert_cumulative("cu_seqlens", cu, lead[0])
    seq = token_layout(lead, cu, x.device)
    sbi, dsbi, nacc = (
        checks.sequences(call[k], seq.count)
        for k in ("state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens")
    )
    for name, idx in (("state_batch_indices", sbi), ("dst_state_batch_indices", dsbi)):
        if idx is not None:
            checks.assert_rows_in_range(name, idx, nslots, pad)
    src, dst = seq.rows(sbi, dsbi, nacc)
    cols = torch.arange(dst.shape[1], device=x.device)[None, :]
    if nacc is None:
        written = (cols == 0) & (seq.lengths > 0)[:, None]
    else:
        checks.assert_within(
            "num_accepted_tokens", nacc, 0, sbi.shape[1],
            f"values in [0, {sbi.shape[1]}] (the columns of state_batch_indices)",
        )
        checks.assert_within(
            "cu_seqlens" if cu is not None else "x", seq.lengths, 0, dst.shape[1],
            f"at most {dst.shape[1]} tokens per sequence (one index column per token)",
        )
        written = cols < seq.lengths[:, None]
    dst_name = "dst_state_batch_indices" if dsbi is not None else "state_batch_indices"
    checks.assert_row_rules("state_batch_indices", src, dst_name, dst, written, nslots, pad)
