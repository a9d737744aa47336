"""``mamba_chunk_scan``: the Mamba2 SSM over whole prompts (prefill), with align-mode checkpoints.

The native function is the recurrence itself, one token at a time: the chunked algorithm
(intra-chunk matrix products, inter-chunk state passing) is a provider's business, and
``chunk_size`` only tells the provider what to use.
"""

from collections.abc import Sequence
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
    store,
    with_checkpoints,
)
from ._step import decay, step_size
from ._tokens import token_layout

# A chunked provider multiplies 16-bit inputs on tensor cores (the state entering a chunk,
# the decay-weighted C B^T), as every chunked scan does: its error is the input dtype's
# rounding summed over a chunk's dot products, not one rounding per stored value, and it
# reaches a float32 state too. Observed: fp16 0.004 absolute on outputs of ~0.7
# (interpreter, dstate 4, chunk 16). With float32 inputs the products are IEEE float32.
CHUNKED_TOLERANCES = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 3e-2)}


def _rows(call: dict) -> Rows:
    seq = token_layout(call["x"].shape[:1], call["cu_seqlens"], call["x"].device)
    src, dst = seq.rows(call["state_batch_indices"], call["dst_state_batch_indices"], None)
    rows = Rows(src, torch.ones_like(src, dtype=torch.bool), dst, (seq.lengths > 0)[:, None])
    ckpt = checks.sequences(call[CHECKPOINTS], seq.count)
    return with_checkpoints(rows, ckpt, seq.lengths, call["num_computed_tokens"],
                            call["block_size"])


@register_op(
    mutates_args=("state", "out"),
    allocate={"out": lambda call: torch.empty_like(call["x"])},
    input_tolerances=CHUNKED_TOLERANCES,
    rows=RowSpec("state", "state_batch_indices", "dst_state_batch_indices", _rows,
                 checkpoints=CHECKPOINTS),
    # every sequence with a token rewrites its destination row; checkpoints are extra rows
    redirect=Redirect("cu_seqlens"),
)
def mamba_chunk_scan(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    cu_seqlens: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] | None = None,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    block_size: int = 0,
    num_computed_tokens: torch.Tensor | None = None,
    checkpoint_state_indices: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """Run each sequence's tokens from its source row; store the state at every block
    boundary and after the last token (docs/ops.md)."""
    heads_per_group = x.shape[1] // B.shape[1]
    seq = token_layout(x.shape[:1], cu_seqlens, x.device)
    # per-sequence tensors may be longer than the call's sequences: the tail is ignored
    sbi, dsbi, done, ckpt = (
        checks.sequences(t, seq.count)
        for t in (state_batch_indices, dst_state_batch_indices, num_computed_tokens,
                  checkpoint_state_indices)
    )
    src, dst = seq.rows(sbi, dsbi, None)
    ckpts = Checkpoints(ckpt, computed(done, seq.count, x.device), block_size, pad_slot_id)
    A = A.float()[:, None, None]
    D = None if D is None else (D.float() if D.dim() == 2 else D.float()[:, None])

    h = initial(state, src, pad_slot_id)
    for t in range(seq.max_len):
        live, tok = seq.step(t)
        xt = seq.gather(x, tok).float()
        dtt = step_size(seq.gather(dt, tok), dt_bias, dt_softplus, dt_limit)
        dtt = dtt[:, :, None, None]
        Bt = seq.gather(B, tok).float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        Ct = seq.gather(C, tok).float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        h_next = h * decay(A, dtt) + dtt * Bt * xt[..., None]
        h = torch.where(live[:, None, None, None], h_next, h)
        y = (h * Ct).sum(-1)
        if D is not None:
            y = y + D * xt
        if z is not None:
            y = y * F.silu(seq.gather(z, tok).float())
        seq.scatter(out, tok[live], y[live])
        ckpts.after(t, live, state, h)
    store(state, dst[:, 0], h, seq.lengths > 0, pad_slot_id)


@mamba_chunk_scan.register_check
def _check(call: dict) -> None:
    state = checks.tensor(call, "state", ndim=4)
    checks.writable(call, "state")
    checks.same_device(call, "state")
    _, nheads, dim, dstate = state.shape
    x = checks.tensor(call, "x", ndim=3)
    if tuple(x.shape[1:]) != (nheads, dim):
        checks.fail("x", f"shape (tokens, {nheads}, {dim})", tuple(x.shape))
    ntok = x.shape[0]
    checks.tensor(call, "dt", shape=(ntok, nheads))
    checks.tensor(call, "A", shape=(nheads,))
    b = checks.tensor(call, "B", ndim=3)
    if b.shape[0] != ntok or b.shape[2] != dstate or b.shape[1] < 1 or nheads % b.shape[1]:
        checks.fail("B", f"shape ({ntok}, ngroups dividing {nheads}, {dstate})", tuple(b.shape))
    checks.tensor(call, "C", shape=b.shape)
    for name in ("z", "out"):
        checks.tensor(call, name, shape=x.shape, optional=True)
    if call["out"] is not None:
        checks.same_dtype(call, "out", "x")
        checks.writable(call, "out")
    d = checks.tensor(call, "D", ndim=(1, 2), optional=True)
    if d is not None and tuple(d.shape) not in ((nheads,), (nheads, dim)):
        checks.fail("D", f"shape ({nheads},) or ({nheads}, {dim})", tuple(d.shape))
    checks.tensor(call, "dt_bias", shape=(nheads,), optional=True)
    checks.dt_limit(call)
    chunk = call["chunk_size"]
    if not isinstance(chunk, (int, torch.SymInt)) or chunk < 1:
        checks.fail("chunk_size", "a positive int", repr(chunk))

    cu = checks.index(call, "cu_seqlens", optional=False)
    if cu.shape[0] < 1:
        checks.fail("cu_seqlens", "at least one entry", tuple(cu.shape))
    nseq = cu.shape[0] - 1
    checks.enough_rows(call, "state", "state_batch_indices", nseq)
    for name in ("state_batch_indices", "dst_state_batch_indices", "num_computed_tokens"):
        checks.index(call, name, rows=nseq, padded=True)
    check_checkpoint_args(call, nseq)


@mamba_chunk_scan.register_value_check
def _check_values(call: dict, on_device: bool = False) -> None:
    # a chunked scan factors decays through a chunk's tokens, bounded only if none grows
    (checks.assert_decay_rates if on_device else checks.decay_rates)("A", call["A"])
    check_prefill_values(call, "cu_seqlens", call["x"].shape[0], "state",
                         ("state_batch_indices", "dst_state_batch_indices"), checkpoints=True,
                         on_device=on_device)


mamba_chunk_scan.register_device_check(partial(_check_values, on_device=True))


@mamba_chunk_scan.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    tokens, heads, dim = s.batch * s.tokens_per_seq, s.heads, s.head_dim
    return {
        "state": randn(s.slots, heads, dim, s.d_state), "x": randn(tokens, heads, dim),
        "dt": randn(tokens, heads), "A": -randn(heads, dt=torch.float32).exp(),
        "B": randn(tokens, s.groups, s.d_state), "C": randn(tokens, s.groups, s.d_state),
        "chunk_size": s.chunk, "cu_seqlens": _example.offsets(device),
        "D": randn(heads), "dt_bias": randn(heads), "dt_softplus": True,
        "state_batch_indices": _example.rows(device),
    }


mamba_chunk_scan.register_strategy(_example.testing_strategy("mamba_chunk_scan_calls"))
