"""``copy_state_blocks``: align-mode pre-copy of cached state rows into running slots."""

import torch

from .. import checks
from ..op import register_op


@register_op(mutates_args=("state",))
def copy_state_blocks(
    state: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, pad_slot_id: int = -1
) -> None:
    """``state[dst[i]] = state[src[i]]`` for every i where neither index is the pad id."""
    # unchecked (compiled) indices never wrap around or reach past the state
    keep = checks.real_rows(src, state.shape[0], pad_slot_id)
    keep &= checks.real_rows(dst, state.shape[0], pad_slot_id)
    state[dst[keep]] = state[src[keep]]


@copy_state_blocks.register_check
def _check(call: dict) -> None:
    state = checks.tensor(call, "state", ndim=range(2, 6), dtypes=None)
    checks.writable(call, "state")
    checks.same_device(call, "state")
    src = checks.index(call, "src", optional=False)
    checks.index(call, "dst", rows=src.shape[0], optional=False)
    if not checks.values_readable(call["src"], call["dst"]):
        return
    pad = call["pad_slot_id"]
    for name in ("src", "dst"):
        checks.rows_in_range(name, call[name], state.shape[0], pad)
    pairs = [
        (s, d) if s != pad else (pad, pad)
        for s, d in zip(call["src"].tolist(), call["dst"].tolist(), strict=True)
    ]
    checks.disjoint_rows("src", [s for s, _ in pairs], "dst", [[d] for _, d in pairs], pad)


@copy_state_blocks.register_device_check
def _device_check(call: dict) -> None:
    state, src, dst, pad = call["state"], call["src"], call["dst"], call["pad_slot_id"]
    for name, idx in (("src", src), ("dst", dst)):
        checks.assert_rows_in_range(name, idx, state.shape[0], pad)
    checks.assert_row_rules("src", src, "dst", dst[:, None], (src != pad)[:, None],
                            state.shape[0], pad)
