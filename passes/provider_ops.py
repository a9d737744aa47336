"""One ``torch.library`` custom op per (IR op, provider): what a lowered graph calls.

A provider op has the IR op's schema, mutates the same arguments and shares its fake
implementation, so Inductor treats it exactly like the IR op it replaces (functionalized
while the passes run, re-inplaced afterwards). Its kernel calls one provider's function
directly: the choice was made at compile time, nothing is dispatched at run time.

The checked mode (``validate=True``) lowers to a second op per (IR op, provider), in
:data:`CHECKED_NAMESPACE`, whose kernel first runs the IR op's device-side checks
(:meth:`IrOp.device_check`: ``torch._assert_async``, no host sync) and then the provider.
It takes one argument more, :data:`CHECKED_AS`: a string constant of the call site saying
how the checks' messages name its arguments and the site (:func:`checked_as`), so that
a failure speaks of what the user passed even where a pass rewrote the call.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from mamba_ir import checks
from mamba_ir.op import REGISTRY, IrOp, safe_name

NAMESPACE = "mamba_ir_impl"
CHECKED_NAMESPACE = "mamba_ir_checked"
CHECKED_AS = "checked_as"


def checked_as(names: dict[str, str], where: str) -> str:
    """The :data:`CHECKED_AS` argument of a checked call: argument -> how messages name it,
    and the call site (as :func:`mamba_ir.checks.naming` takes them)."""
    return json.dumps({"names": names, "where": where}, sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _naming(text: str) -> tuple[dict[str, str], str]:
    if not text:
        return {}, ""
    data = json.loads(text)
    return data["names"], data["where"]


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
        site = ""
        if checked:
            site = kwargs.pop(CHECKED_AS, args[-1] if len(args) > len(names) else "")
            args = args[: len(names)]
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
            with checks.naming(*_naming(site)):
                op.device_check(call)
        return impl.fn(**call)

    schema = torch.library.infer_schema(op.native, mutates_args=op.mutates_args)
    fake = op.fake
    if checked:
        params, arrow, returns = schema.rpartition(") ->")
        schema = f'{params}, str {CHECKED_AS}=""{arrow}{returns}'

        def fake(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop(CHECKED_AS, None)
            return op.fake(*args[: len(names)], **kwargs)

    custom = torch.library.custom_op(
        f"{CHECKED_NAMESPACE if checked else NAMESPACE}::{name}",
        kernel,
        mutates_args=op.mutates_args,
        schema=schema,
    )
    custom.register_fake(fake)
