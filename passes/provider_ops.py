"""One ``torch.library`` custom op per (IR op, provider): what a lowered graph calls.

A provider op has the IR op's schema, mutates the same arguments and shares its fake
implementation, so Inductor treats it exactly like the IR op it replaces (functionalized
while the passes run, re-inplaced afterwards). Its kernel calls one provider's function
directly: the choice was made at compile time, nothing is dispatched at run time.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mamba_ir.op import REGISTRY, IrOp

NAMESPACE = "mamba_ir_impl"


def op_name(op: IrOp, provider: str) -> str:
    """The provider op's name in :data:`NAMESPACE` (provider names may hold any character)."""
    return f"{op.name}__{re.sub(r'[^0-9A-Za-z_]', '_', provider)}"


def provider_op(op: IrOp, provider: str) -> torch._ops.OpOverload:
    """The overload that calls ``provider``'s implementation of ``op``; defined on first use."""
    name = op_name(op, provider)
    namespace = getattr(torch.ops, NAMESPACE)
    if not hasattr(namespace, name):
        _define(op, provider, name)
    return getattr(namespace, name).default


def define_all() -> None:
    """Define the provider op of every registered implementation.

    A graph loaded from Inductor's cache names provider ops without running the passes,
    so they must exist before the cached code is loaded.
    """
    for op in REGISTRY.values():
        for provider in list(op.impls):
            provider_op(op, provider)


def _define(op: IrOp, provider: str, name: str) -> None:
    names = tuple(op.signature.parameters)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        # The dispatcher hands every schema argument over positionally, defaults filled.
        if kwargs or len(args) != len(names):
            call = op.bind(*args, **kwargs)
        else:
            call = dict(zip(names, args, strict=True))
        impl = op.impls.get(provider)
        if impl is None:
            raise RuntimeError(
                f"{op.name}: provider {provider!r} was removed after this graph was compiled"
            )
        return impl.fn(**call)

    custom = torch.library.custom_op(
        f"{NAMESPACE}::{name}",
        kernel,
        mutates_args=op.mutates_args,
        schema=torch.library.infer_schema(op.native, mutates_args=op.mutates_args),
    )
    custom.register_fake(op.fake)
