"""Provider priority: platform defaults, the ``set_priority`` context, ``MAMBA_IR_PRIORITY``.

The order for one call is the first of these that names the op:
1. the innermost :func:`set_priority` context;
2. the environment variable ``MAMBA_IR_PRIORITY``
   (``"selective_state_update=flashinfer,triton;causal_conv1d_update=triton"``, or a bare
   ``"triton,flashinfer"`` for every op);
3. the platform default: the providers registered for the call's device type, in
   registration order.

``native`` is always appended last and never needs naming.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator, Mapping, Sequence

ENV_VAR = "MAMBA_IR_PRIORITY"
NATIVE = "native"
ALL_OPS = "*"

PriorityMap = Mapping[str, tuple[str, ...]]
PrioritySpec = str | Mapping[str, Sequence[str]] | Sequence[str] | None

_override: contextvars.ContextVar[tuple[PriorityMap, ...]] = contextvars.ContextVar(
    "mamba_ir_priority", default=()
)


def parse_priority(spec: PrioritySpec) -> dict[str, tuple[str, ...]]:
    """Normalise a priority given as a string, a mapping or a list into ``{op: providers}``."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        out: dict[str, tuple[str, ...]] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            op, sep, names = part.rpartition("=")
            key = op.strip() if sep else ALL_OPS
            out[key] = _names(names.split(","))
        return out
    if isinstance(spec, Mapping):
        return {op: _names(names) for op, names in spec.items()}
    return {ALL_OPS: _names(spec)}


def _names(names: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = names.split(",")
    return tuple(n.strip() for n in names if n.strip() and n.strip() != NATIVE)


@functools.lru_cache(maxsize=8)
def _env_priority(value: str) -> dict[str, tuple[str, ...]]:
    return parse_priority(value)


def _lookup(table: PriorityMap, op: str) -> tuple[str, ...] | None:
    if op in table:
        return table[op]
    return table.get(ALL_OPS)


def priority_for(op: str, default: Sequence[str]) -> tuple[str, ...]:
    """Providers to try for ``op``, best first, ending with ``native``."""
    for table in reversed(_override.get()):
        found = _lookup(table, op)
        if found is not None:
            return (*found, NATIVE)
    env = os.environ.get(ENV_VAR)
    if env:
        found = _lookup(_env_priority(env), op)
        if found is not None:
            return (*found, NATIVE)
    return (*(p for p in default if p != NATIVE), NATIVE)


@contextlib.contextmanager
def set_priority(spec: PrioritySpec) -> Iterator[dict[str, tuple[str, ...]]]:
    """Within the block, try providers in the given order (per op, or for every op).

    >>> with set_priority({"selective_state_update": ["triton"]}):
    ...     pass
    """
    table = parse_priority(spec)
    token = _override.set((*_override.get(), table))
    try:
        yield table
    finally:
        _override.reset(token)
