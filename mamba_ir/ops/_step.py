"""The step size of the SSM recurrence and the decay it gives, as every op defines them."""

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


def decay(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``exp(A * dt)``, with ``A * dt`` taken as 0 where ``dt`` is 0: a step of length 0 keeps
    the state whatever the rate, ``A = -inf`` included (IEEE makes ``-inf * 0`` NaN; any
    finite ``A`` already gives 1). ``A = -inf`` with a positive step clears the state."""
    return torch.exp(torch.where(dt == 0, 0.0, A * dt))
