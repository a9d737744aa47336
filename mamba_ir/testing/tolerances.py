"""The one table of tolerances: how close a provider must come to the native op, by dtype."""

from __future__ import annotations

import torch

from ..op import IrOp, get_op

# (atol, rtol). Providers accumulate in fp32 like the native op; the slack covers rounding
# of the stored state / output to the narrower dtype and a different summation order.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


def tolerance(
    *dtypes: torch.dtype,
    op: IrOp | str | None = None,
    table: dict[torch.dtype, tuple[float, float]] | None = None,
) -> tuple[float, float]:
    """The loosest (atol, rtol) among ``dtypes``: a result is as precise as its narrowest part.

    ``op`` (an op or its name) applies what that op declares for its providers
    (``register_op(tolerances=...)``) over this table; ``table`` overrides the entries it
    names, last."""
    own = {} if op is None else (get_op(op) if isinstance(op, str) else op).tolerances
    merged = {**TOLERANCES, **own, **(table or {})}
    pairs = [merged[d] for d in dtypes if d in merged] or [merged[torch.float32]]
    return max(a for a, _ in pairs), max(r for _, r in pairs)
