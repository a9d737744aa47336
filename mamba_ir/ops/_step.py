"""The step size of the SSM recurrence, as every op defines it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def step_size(
    dt: torch.Tensor,
    bias: torch.Tensor | None,
    softplus: bool,
    limit: Sequence[float] | None = None,
) -> torch.Tensor:
    """``clamp(softplus(dt + bias), *limit)`` in float32, each part only where given."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    if softplus:
        dt = F.softplus(dt)
    if limit is not None:
        dt = dt.clamp(limit[0], limit[1])
    return dt
