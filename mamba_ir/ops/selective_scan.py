"""``selective_scan``: the Mamba1 SSM over whole prompts (prefill), vLLM's ``selective_scan_fn``.

Mamba1 has a decay rate per channel and state element (``A`` is ``(dim, dstate)``), so it
has no chunked matrix form: the native function is the recurrence, one token at a time,
over sequences of a flat, channel-first token axis, with src redirect and align-mode
checkpoints as in ``mamba_chunk_scan``.
"""

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .. import checks
from ..op import Redirect, Rows, RowSpec, register_op
from . import _example
from ._rows import (
    CHECKPOINTS,
    Checkpoints,
    check_checkpoint_args,
    check_prefill_values,
    computed,
    initial,
    per_sequence_rows,
    store,
    with_checkpoints,
)
from ._step import decay, step_size
from ._tokens import token_layout


def _new_out(call: dict) -> torch.Tensor:
    # contiguous whatever u's layout: Dynamo refuses a non-contiguous `out=` tensor
    u = call["u"]
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)


def _rows(call: dict) -> Rows:
    qsl = call["query_start_loc"]
    lengths = qsl[1:] - qsl[:-1]
    rows = per_sequence_rows(call, "cache_indices", "src_cache_indices", lengths)
    ckpt = checks.sequences(call[CHECKPOINTS], lengths.shape[0])
    return with_checkpoints(rows, ckpt, lengths, call["num_computed_tokens"], call["block_size"])


@register_op(
    mutates_args=("ssm_states", "out"),
    allocate={"out": _new_out},
    rows=RowSpec("ssm_states", "src_cache_indices", "cache_indices", _rows,
                 checkpoints=CHECKPOINTS),
    # like mamba_chunk_scan, every sequence with a token rewrites its destination row (from
    # zeros without has_initial_state, as the copied row would give)
    redirect=Redirect("query_start_loc"),
)
def selective_scan(
    u: torch.Tensor,
    ssm_states: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    query_start_loc: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    block_size: int = 0,
    src_cache_indices: torch.Tensor | None = None,
    num_computed_tokens: torch.Tensor | None = None,
    checkpoint_state_indices: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """Run each sequence of ``u`` (dim, tokens) from its source row; store the state at every
    block boundary and after the last token (docs/ops.md)."""
    B, C = (t if t.dim() == 3 else t[None] for t in (B, C))  # (ngroups, dstate, tokens)
    per_group = u.shape[0] // B.shape[0]
    # offsets outside the tokens (an unchecked call) shorten the sequence
    seq = token_layout(u.shape[1:], query_start_loc, u.device)
    # per-sequence tensors may be longer than the call's sequences: the tail is ignored
    dst, src, init, done, ckpt = (
        None if t is None else t[: seq.count]
        for t in (cache_indices, src_cache_indices, has_initial_state, num_computed_tokens,
                  checkpoint_state_indices)
    )
    dst = torch.arange(seq.count, device=u.device) if dst is None else dst.long()
    src = dst if src is None else src.long()
    # without has_initial_state no sequence has an initial state
    read = torch.zeros_like(src, dtype=torch.bool) if init is None else init.bool()
    ckpts = Checkpoints(ckpt, computed(done, seq.count, u.device), block_size, pad_slot_id)

    h = initial(ssm_states, src, pad_slot_id, read)
    A = A.float()
    u_t, delta_t, z_t, out_t = (None if t is None else t.t() for t in (u, delta, z, out))
    B_t, C_t = (t.permute(2, 0, 1) for t in (B, C))  # (tokens, ngroups, dstate)
    for t in range(seq.max_len):
        live, tok = seq.step(t)
        x = seq.gather(u_t, tok).float()
        dt = step_size(seq.gather(delta_t, tok), delta_bias, delta_softplus)
        Bt = seq.gather(B_t, tok).float().repeat_interleave(per_group, dim=1)
        Ct = seq.gather(C_t, tok).float().repeat_interleave(per_group, dim=1)
        h_next = h * decay(A, dt[..., None]) + (dt * x)[..., None] * Bt
        h = torch.where(live[:, None, None], h_next, h)
        y = (h * Ct).sum(-1)
        if D is not None:
            y = y + D.float() * x
        if z is not None:
            y = y * F.silu(seq.gather(z_t, tok).float())
        seq.scatter(out_t, tok[live], y[live])
        ckpts.after(t, live, ssm_states, h)
    store(ssm_states, dst, h, seq.lengths > 0, pad_slot_id)



@selective_scan.register_check
def _check(call: dict) -> None:
    u = checks.tensor(call, "u", ndim=2)
    checks.same_device(call, "u")
    dim, ntok = u.shape
    states = checks.tensor(call, "ssm_states", ndim=3)
    checks.writable(call, "ssm_states")
    if states.shape[1] != dim:
        checks.fail("ssm_states", f"shape (slots, {dim}, dstate)", tuple(states.shape))
    dstate = states.shape[2]
    checks.tensor(call, "delta", shape=u.shape)
    checks.tensor(call, "A", shape=(dim, dstate))
    b = checks.tensor(call, "B", ndim=(2, 3))
    groups = b.shape[0] if b.dim() == 3 else 1
    if tuple(b.shape[-2:]) != (dstate, ntok) or groups < 1 or dim % groups:
        want = f"shape ({dstate}, {ntok}) or (ngroups dividing {dim}, {dstate}, {ntok})"
        checks.fail("B", want, tuple(b.shape))
    checks.tensor(call, "C", shape=b.shape)
    for name in ("D", "delta_bias"):
        checks.tensor(call, name, shape=(dim,), optional=True)
    for name in ("z", "out"):
        checks.tensor(call, name, shape=u.shape, optional=True)
    if call["out"] is not None:
        checks.same_dtype(call, "out", "u")
        checks.writable(call, "out")

    if call["query_start_loc"] is None:
        checks.fail("query_start_loc", "(nseq + 1,) token offsets (varlen layout only)", None)
    qsl = checks.index(call, "query_start_loc")
    if qsl.shape[0] < 1:
        checks.fail("query_start_loc", "at least one entry", tuple(qsl.shape))
    nseq = qsl.shape[0] - 1
    for name in ("cache_indices", "src_cache_indices", "num_computed_tokens"):
        checks.index(call, name, rows=nseq, padded=True)
    checks.index(call, "has_initial_state", rows=nseq, padded=True, dtypes=(torch.bool,))
    checks.enough_rows(call, "ssm_states", "cache_indices", nseq)
    check_checkpoint_args(call, nseq)


@selective_scan.register_value_check
def _check_values(call: dict, on_device: bool = False) -> None:
    check_prefill_values(call, "query_start_loc", call["u"].shape[1], "ssm_states",
                         ("cache_indices", "src_cache_indices"), checkpoints=True,
                         on_device=on_device)


selective_scan.register_device_check(partial(_check_values, on_device=True))


@selective_scan.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    dim, tokens, d_state = s.heads * s.head_dim, s.batch * s.tokens_per_seq, s.mamba1_d_state
    return {
        "u": randn(tokens, dim).t(), "ssm_states": randn(s.slots, dim, d_state),
        "delta": randn(tokens, dim).t(), "A": -randn(dim, d_state, dt=torch.float32).exp(),
        "B": randn(tokens, d_state).t(), "C": randn(tokens, d_state).t(),
        "D": randn(dim, dt=torch.float32), "z": randn(tokens, dim).t(),
        "delta_bias": randn(dim, dt=torch.float32), "delta_softplus": True,
        "query_start_loc": _example.offsets(device), "cache_indices": _example.rows(device),
        "has_initial_state": torch.ones(s.batch, dtype=torch.bool, device=device),
    }


selective_scan.register_strategy(_example.testing_strategy("selective_scan_calls"))
