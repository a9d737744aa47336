"""``copy_state_blocks``: align-mode pre-copy of cached state rows into running slots."""

from functools import partial
from typing import Any

import torch

from .. import checks
from ..op import Rows, RowSpec, register_op
from . import _example


def _rows(call: dict) -> Rows:
    src, dst, pad = call["src"], call["dst"], call["pad_slot_id"]
    # a pad source copies nothing; a pad destination reads nothing
    return Rows(src, dst != pad, dst[:, None], (src != pad)[:, None])


@register_op(
    mutates_args=("state", "state_scale"),
    rows=RowSpec(("state", "state_scale"), "src", "dst", _rows),
)
def copy_state_blocks(
    state: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    pad_slot_id: int = -1,
    state_scale: torch.Tensor | None = None,
) -> None:
    """``state[dst[i]] = state[src[i]]`` (and the same rows of ``state_scale``, a quantized
    state's scales) for every i where neither index is the pad id."""
    # unchecked (compiled) indices never wrap around or reach past the state
    keep = checks.real_rows(src, state.shape[0], pad_slot_id)
    keep &= checks.real_rows(dst, state.shape[0], pad_slot_id)
    for rows in (state, state_scale):
        if rows is not None:
            rows[dst[keep]] = rows[src[keep]]


@copy_state_blocks.register_check
def _check(call: dict) -> None:
    checks.tensor(call, "state", ndim=range(2, 6), dtypes=None)
    checks.tensor(call, "state_scale", ndim=range(1, 6), dtypes=None, optional=True)
    checks.writable(call, "state")
    checks.same_device(call, "state")
    src = checks.index(call, "src", optional=False)
    checks.index(call, "dst", rows=src.shape[0], optional=False)


@copy_state_blocks.register_value_check
def _check_values(call: dict, on_device: bool = False) -> None:
    count, nslots = call["src"].shape[0], call["state"].shape[0]
    checks.indices_in_range(call, ("src", "dst"), count, nslots, on_device=on_device)


copy_state_blocks.register_device_check(partial(_check_values, on_device=True))


@copy_state_blocks.register_example
def _example_call(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    s = _example.SIZES
    randn = _example.randn(device, dtype)
    src = torch.tensor([0, 5, 6, 0], dtype=torch.int32, device=device)
    return {"state": randn(s.slots, s.heads, s.head_dim, s.d_state), "src": src,
            "dst": _example.rows(device)}


copy_state_blocks.register_strategy(_example.testing_strategy("copy_state_blocks_calls"))
