"""The one table of tolerances: how close a provider must come to the native op, by dtype.

Every op promises float32 arithmetic whatever the storage dtype (docs/ops.md), and a
provider reads the same input values as native, 16-bit ones included. So a result is held
to the tolerance of the dtype it is stored in: a float32 state computed from bfloat16
inputs must agree to float32 precision, which 16-bit arithmetic cannot meet. An op whose
providers legitimately multiply 16-bit inputs at their own precision (tensor-core products)
declares how far that loosens its results: ``register_op(input_tolerances=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..op import IrOp, get_op

Pair = tuple[float, float]

# (atol, rtol). The slack covers a different summation order in float32 and the rounding of
# the stored result. float32: the providers' largest error in float32 is below 2e-6 of
# (1 + |native|) (docs/design.md, "Testing"), while rounding to float16 alone errs by up to
# 2.4e-4 of a value and to bfloat16 by up to 2e-3, so 16-bit arithmetic cannot meet it.
TOLERANCES: dict[torch.dtype, Pair] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


def _op(op: IrOp | str | None) -> IrOp | None:
    return get_op(op) if isinstance(op, str) else op


def _loosest(pairs: Iterable[Pair]) -> Pair:
    pairs = list(pairs)
    return max(a for a, _ in pairs), max(r for _, r in pairs)


def tolerance(
    *dtypes: torch.dtype,
    op: IrOp | str | None = None,
    table: dict[torch.dtype, Pair] | None = None,
) -> Pair:
    """The loosest (atol, rtol) among ``dtypes``.

    ``op`` (an op or its name) applies what that op declares for its providers
    (``register_op(tolerances=..., input_tolerances=...)``) over this table; ``table``
    overrides the entries it names, last. :func:`result_tolerance` is the finer rule
    ``check_impl`` applies: one result's dtype, loosened only where the op says so."""
    own: dict[torch.dtype, Pair] = {}
    if (found := _op(op)) is not None:
        for d in {*found.tolerances, *found.input_tolerances}:
            own[d] = _loosest(t[d] for t in (found.tolerances, found.input_tolerances) if d in t)
    merged = {**TOLERANCES, **own, **(table or {})}
    return _loosest([merged[d] for d in dtypes if d in merged] or [merged[torch.float32]])


def result_tolerance(
    result: torch.dtype, inputs: Iterable[torch.dtype], op: IrOp | str | None = None
) -> Pair:
    """The (atol, rtol) for a result stored as ``result`` by a call whose inputs (the
    floating tensors it does not write) have the dtypes ``inputs``: the result dtype's
    entry (``op``'s ``tolerances`` over :data:`TOLERANCES`), loosened by ``op``'s
    ``input_tolerances`` for those input dtypes."""
    found = _op(op)
    table = {**TOLERANCES, **(found.tolerances if found is not None else {})}
    pairs = [table.get(result, table[torch.float32])]
    if found is not None:
        pairs += [found.input_tolerances[d] for d in set(inputs) if d in found.input_tolerances]
    return _loosest(pairs)
