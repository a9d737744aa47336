"""Provider priority: platform defaults, the ``set_priority`` context, ``MAMBA_IR_PRIORITY``.

The order for one call is the first of these that names the op:
1. a priority passed explicitly (``IrOp.decide(call, priority=...)``: the compile passes
   hand over the priority they were set up with this way);
2. the innermost :func:`set_priority` context (the eager, user-facing way);
3. the environment variable ``MAMBA_IR_PRIORITY``
   (``"selective_state_update=flashinfer,triton;causal_conv1d_update=triton"``, or a bare
   ``"triton,flashinfer"`` for every op);
4. the platform default: the providers registered for the call's device type, in
   registration order.

``native`` is always appended last and never needs naming. A spec is checked where it
enters (``set_priority``, the environment variable when read, ``mamba_ir.compile``, the
CLI's ``--priority``): an op or provider name that is not registered raises ``ValueError``
naming the entry and what is registered, instead of silently falling back to native.
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
    """Normalise a priority given as a string, a mapping or a list into ``{op: providers}``.

    Only the form is checked here; :func:`checked_priority` also checks the names."""
    return {op: names for op, (names, _) in _entries(spec).items()}


def _entries(spec: PrioritySpec) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{op: (providers, the entry as written)}``."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        out: dict[str, tuple[tuple[str, ...], str]] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            op, sep, names = part.rpartition("=")
            key = op.strip() if sep else ALL_OPS
            out[key] = (_names(names.split(",")), part)
        return out
    if isinstance(spec, Mapping):
        for op in spec:
            if not isinstance(op, str):
                raise ValueError(f"priority: expected op names as keys, got {op!r}")
        return {op: (_names(names), f"{op!r}: {names!r}") for op, names in spec.items()}
    if not isinstance(spec, (list, tuple)):
        raise ValueError(
            f"priority: expected a string, a mapping of op to providers or a list of providers, "
            f"got {type(spec).__name__}"
        )
    return {ALL_OPS: (_names(spec), repr(list(spec)))}


def checked_priority(spec: PrioritySpec, source: str = "priority") -> dict[str, tuple[str, ...]]:
    """:func:`parse_priority`, then every op and provider name checked against the registry
    (providers are loaded when ``mamba_ir`` is imported). ``source`` names where the spec
    came from in the error."""
    from .op import REGISTRY  # late: op.py imports this module

    entries = _entries(spec)
    everywhere = sorted({p for op in REGISTRY.values() for p in op.impls} - {NATIVE})
    for op, (names, entry) in entries.items():
        if op != ALL_OPS and op not in REGISTRY:
            raise ValueError(
                f"{source}: entry {entry!r} names op {op!r}, which is not declared "
                f"(declared: {', '.join(sorted(REGISTRY))})"
            )
        known = everywhere if op == ALL_OPS else sorted(set(REGISTRY[op].impls) - {NATIVE})
        for name in names:
            if name not in known:
                hint = "; name an op with op=provider" if ":" in name or "=" in name else ""
                where = "any op" if op == ALL_OPS else op
                raise ValueError(
                    f"{source}: entry {entry!r} names provider {name!r}, which is not "
                    f"registered for {where} (registered: {', '.join(known) or 'none'}, "
                    f"and native){hint}"
                )
    return {op: names for op, (names, _) in entries.items()}


def _names(names: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"priority: expected provider names, got {n!r}")
        if n.strip() and n.strip() != NATIVE:
            out.append(n.strip())
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _env_priority(value: str) -> dict[str, tuple[str, ...]]:
    return parse_priority(value)


def _lookup(table: PriorityMap, op: str) -> tuple[str, ...] | None:
    if op in table:
        return table[op]
    return table.get(ALL_OPS)


def priority_for(
    op: str, default: Sequence[str], given: PrioritySpec = None
) -> tuple[str, ...]:
    """Providers to try for ``op``, best first, ending with ``native``.

    ``given`` (a spec as :func:`set_priority` takes it) comes before every context: a
    caller that holds its priority (the compile passes) hands it over instead of entering
    a context. Ops it does not name fall through to the contexts, the environment and
    the default."""
    explicit = () if given is None else (parse_priority(given),)
    for table in (*explicit, *reversed(_override.get())):
        found = _lookup(table, op)
        if found is not None:
            return (*found, NATIVE)
    env = os.environ.get(ENV_VAR)
    if env:
        checked_priority(env, ENV_VAR)  # set lists of names: cheap, and the registry may grow
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
    table = checked_priority(spec, "set_priority")
    token = _override.set((*_override.get(), table))
    try:
        yield table
    finally:
        _override.reset(token)
