"""One ``torch.library`` custom op per (IR op, provider): what a lowered graph calls.

A provider op has the IR op's schema, mutates the same arguments and shares its fake
implementation, so Inductor treats it exactly like the IR op it replaces (functionalized
while the passes run, re-inplaced afterwards). Its kernel calls one provider's function
directly: the choice was made at compile time, nothing is dispatched at run time.

The checked mode (``validate=True``) lowers to a second op per (IR op, provider), in
:data:`CHECKED_NAMESPACE`, whose kernel first runs the IR op's device-side checks
(:meth:`IrOp.device_check`: ``torch._assert_async``, no host sync) and then the provider.
"""

from __future__ import annotations

from typing import Any

import torch

from mamba_ir.op import REGISTRY, IrOp, safe_name

NAMESPACE = "mamba_ir_impl"
CHECKED_NAMESPACE = "mamba_ir_checked"


def op_name(op: IrOp, provider: str) -> str:
    """The provider op's name (provider names may hold any character; ``register_impl``
    refuses two providers of one op whose names map to the same string here)."""
    return f"{op.name}__{safe_name(provider)}"


def provider_op(op: IrOp, provider: str, *, checked: bool = False) -> torch._ops.OpOverload:
    """The overload that calls ``provider``'s implementation of ``op`` (after the op's
    device-side checks when ``checked``); defined on first use."""
    name = op_name(op, provider)
    namespace = getattr(torch.ops, CHECKED_NAMESPACE if checked else NAMESPACE)
    if not hasattr(namespace, name):
        _define(op, provider, name, checked)
    return getattr(namespace, name).default


def define_all() -> None:
    """Define the provider ops (plain and checked) of every registered implementation.

    A graph loaded from Inductor's cache names provider ops without running the passes,
    so they must exist before the cached code is loaded.
    """
    for op in REGISTRY.values():
        for provider in list(op.impls):
            provider_op(op, provider)
            provider_op(op, provider, checked=True)


def _define(op: IrOp, provider: str, name: str, checked: bool) -> None:
    names = tuple(op.signature.parameters)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        # The dispatcher hands every schema argument over positionally, defaults filled.
        if kwargs or len(args) != len(names):
            call = op.bind(*args, **kwargs)
        else:
            call = dict(zip(names, args, strict=True))
        # by the name in the graph: the one provider registered under it now (register_impl
        # keeps sanitised names unique), not one removed since and renamed alike
        impl = next((i for p, i in op.impls.items() if safe_name(p) == safe_name(provider)), None)
        if impl is None:
            raise RuntimeError(
                f"{op.name}: provider {provider!r} was removed after this graph was compiled"
            )
        if checked:
            op.device_check(call)
        return impl.fn(**call)

    custom = torch.library.custom_op(
        f"{CHECKED_NAMESPACE if checked else NAMESPACE}::{name}",
        kernel,
        mutates_args=op.mutates_args,
        schema=torch.library.infer_schema(op.native, mutates_args=op.mutates_args),
    )
    custom.register_fake(op.fake)
