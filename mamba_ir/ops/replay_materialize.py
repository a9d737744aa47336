"""``replay_materialize``: the state a replay row stands for, written as a checkpoint.

A row of ``replay_state_update`` is a checkpoint and a ring of the inputs since it; the
state it stands for is the checkpoint advanced through the ring's filled entries. This op
writes that state into a destination row with an empty ring: what an align-mode prefix
cache stores at a block boundary, so a cache hit resumes from the exact state with nothing
to replay (and what a chunked scan, which reads a plain state, can start from).
"""

from typing import Any

import torch
import torch.nn.functional as F

from .. import checks
from ..op import Rows, RowSpec, register_op
from . import _example
from ._quant import QUANTIZED
from ._step import decay
from .replay_state_update import (
    EXAMPLE_RING,
    ROW,
    check_lengths,
    row_value,
    source_lengths,
)

INDICES = ("src", "dst")


def _rows(call: dict) -> Rows:
    src, dst = call["src"], call["dst"]
    every = torch.ones_like(src, dtype=torch.bool)
    return Rows(src, every, dst[:, None], every[:, None])


def _gather(rows: torch.Tensor, index: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """``rows[index[i]]`` where ``has[i]``, zeros elsewhere, in the rows' dtype."""
    got = torch.zeros((index.shape[0], *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    got[has] = rows[index[has]]
    return got


@register_op(
    mutates_args=ROW,
    rows=RowSpec(ROW, "src", "dst", _rows, value=row_value),
)
def replay_materialize(
    state: torch.Tensor,
    ring_x: torch.Tensor,
    ring_dt: torch.Tensor,
    ring_B: torch.Tensor,
    ring_len: torch.Tensor,
    A: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    pad_slot_id: int = -1,
) -> None:
    """For every i: row ``dst[i]``'s checkpoint becomes row ``src[i]``'s checkpoint advanced
    through its ring's filled entries (rounded once to ``state``'s dtype) and its ring is
    emptied (``ring_len`` 0). A pad source is a zero checkpoint and an empty ring; a pad
    destination is not written (docs/ops.md)."""
    nslots, ring = state.shape[0], ring_x.shape[1]
    heads_per_group = state.shape[1] // ring_B.shape[2]
    src, dst = src.long(), dst.long()
    # everything the call reads, before it writes (a row may be its own destination)
    has_src = checks.real_rows(src, nslots, pad_slot_id)
    h = _gather(state, src, has_src).float()
    rx, rdt, rB = (_gather(t, src, has_src) for t in (ring_x, ring_dt, ring_B))
    filled = _gather(ring_len, src, has_src).long().clamp(0, ring)  # clamped: unchecked calls
    A = A.float()
    for i in range(ring):  # as replay_state_update advances: entries past the length never count
        d = rdt[:, i].float()[:, :, None, None]
        Bh = rB[:, i].float().repeat_interleave(heads_per_group, dim=1)[:, :, None]
        advanced = h * decay(A, d) + d * Bh * rx[:, i].float()[..., None]
        h = torch.where((i < filled)[:, None, None, None], advanced, h)
    has_dst = checks.real_rows(dst, nslots, pad_slot_id)
    state[dst[has_dst]] = h[has_dst].to(state.dtype)
    ring_len[dst[has_dst]] = 0  # the stale entries are not part of the row: left as they are


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@replay_materialize.register_check
def _check(call: dict) -> None:
    state = call["state"]
    if isinstance(state, torch.Tensor) and state.dtype in QUANTIZED:
        checks.fail("state", "a float32, float16 or bfloat16 checkpoint: quantized "
                    "checkpoints are not supported by replay_materialize yet", _dtype(state))
    state = checks.tensor(call, "state")
    if state.dim() != 4:
        checks.fail("state", "4 dimensions (slots, nheads, headdim, dstate): the Mamba2 "
                    "layout", tuple(state.shape))
    slots, nheads, dim, dstate = state.shape
    checks.same_device(call, "state")
    rx = checks.tensor(call, "ring_x", ndim=4)
    ring = rx.shape[1]
    if tuple(rx.shape) != (slots, ring, nheads, dim) or ring < 1:
        checks.fail("ring_x", f"shape ({slots}, L, {nheads}, {dim}) with L >= 1 ring entries "
                    "per row of state", tuple(rx.shape))
    checks.tensor(call, "ring_dt", shape=(slots, ring, nheads), dtypes=(torch.float32,))
    rb = checks.tensor(call, "ring_B", ndim=4)
    ngroups = rb.shape[2]
    if (rb.shape[0], rb.shape[1], rb.shape[3]) != (slots, ring, dstate) or ngroups == 0 \
            or nheads % ngroups:
        checks.fail("ring_B", f"shape ({slots}, {ring}, ngroups dividing {nheads}, {dstate}): "
                    f"{ring} entries per row of state, as ring_x", tuple(rb.shape))
    checks.tensor(call, "ring_len", shape=(slots,), dtypes=(torch.int32,))
    for name in ROW:
        checks.writable(call, name)
    checks.tensor(call, "A", shape=(nheads, dim, dstate))
    src = checks.index(call, "src", optional=False)
    checks.index(call, "dst", rows=src.shape[0], optional=False)


@replay_materialize.register_value_check
def _check_values(call: dict) -> None:
    checks.indices_in_range(call, INDICES, call["src"].shape[0], call["state"].shape[0])
    src = call["src"].long()
    check_lengths(call, src, *source_lengths(call, src))


@replay_materialize.register_device_check
def _device_check(call: dict) -> None:
    checks.indices_in_range(call, INDICES, call["src"].shape[0], call["state"].shape[0],
                            on_device=True)
    src = call["src"].long()
    check_lengths(call, src, *source_lengths(call, src), on_device=True)


@replay_materialize.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s, randn = _example.SIZES, _example.randn(device, dtype)
    heads, ring = s.heads, EXAMPLE_RING
    A = -randn(heads, dt=torch.float32).exp()
    ring_len = torch.zeros(s.slots, dtype=torch.int32, device=device)
    rows = _example.rows(device)
    ring_len[rows] = torch.tensor([0, 1, ring - 1, ring], dtype=torch.int32, device=device)
    return {  # the running rows' states into fresh rows, as a block's checkpoint is saved
        "state": randn(s.slots, heads, s.head_dim, s.d_state),
        "ring_x": randn(s.slots, ring, heads, s.head_dim),
        "ring_dt": F.softplus(randn(s.slots, ring, heads, dt=torch.float32)),
        "ring_B": randn(s.slots, ring, s.groups, s.d_state), "ring_len": ring_len,
        "A": A[:, None, None].expand(heads, s.head_dim, s.d_state),
        "src": rows, "dst": rows + s.batch,
    }


@replay_materialize.register_strategy
def _calls(device: str, sizes: Any) -> Any:
    from ..testing.replay_strategies import replay_materialize_calls

    return replay_materialize_calls(device=device, sizes=sizes)
