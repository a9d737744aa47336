"""Op declaration, implementation registry and dispatch.

An op *is* its native function: :func:`register_op` turns it into a ``torch.library``
custom op in the ``mamba_ir`` namespace whose kernel dispatches, per call, to the first
registered provider whose predicate accepts the call's arguments.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .priority import NATIVE, PrioritySpec, priority_for

logger = logging.getLogger("mamba_ir")

NAMESPACE = "mamba_ir"

Predicate = Callable[..., "bool | str"]


def safe_name(provider: str) -> str:
    """``provider`` as it appears in op names: characters other than [0-9A-Za-z_] become ``_``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", provider)


@dataclass(frozen=True)
class Impl:
    """One provider's implementation of an op."""

    provider: str
    fn: Callable[..., Any]
    supports: Predicate | None = None
    platforms: tuple[str, ...] = ("cuda",)

    def refusal(self, call: dict[str, Any]) -> str | None:
        """``None`` when this implementation accepts ``call``, else the reason it refuses."""
        if self.supports is None:
            return None
        try:
            verdict = self.supports(**call)
        except Exception as exc:  # a predicate that cannot decide refuses, with its reason
            return f"predicate raised {type(exc).__name__}: {exc}"
        if verdict is True:
            return None
        return verdict if isinstance(verdict, str) and verdict else "not supported"


@dataclass(frozen=True)
class Decision:
    """Which provider serves a call, and why each better-ranked one was skipped."""

    op: str
    provider: str
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        skipped = "; ".join(f"{p}: {why}" for p, why in self.skipped)
        return f"{self.op} -> {self.provider}" + (f" (skipped {skipped})" if skipped else "")


class IrOp:
    """A declared op: its native semantics, its custom op, and its providers."""

    def __init__(
        self,
        native: Callable[..., Any],
        mutates_args: Iterable[str],
        allocate: dict[str, Callable[[dict[str, Any]], torch.Tensor]] | None = None,
    ) -> None:
        self.name = native.__name__
        self.native = native
        self.__doc__ = native.__doc__
        self.signature = inspect.signature(native)
        self.mutates_args = tuple(mutates_args)
        self.allocate = dict(allocate or {})
        self.tolerances: dict[torch.dtype, tuple[float, float]] = {}
        self.impls: dict[str, Impl] = {NATIVE: Impl(NATIVE, native, None, ("cpu", "cuda"))}
        self._check: Callable[[dict[str, Any]], None] | None = None
        self._device_check: Callable[[dict[str, Any]], None] | None = None
        self.custom_op = torch.library.custom_op(
            f"{NAMESPACE}::{self.name}",
            self._kernel,
            mutates_args=self.mutates_args,
            schema=torch.library.infer_schema(native, mutates_args=self.mutates_args),
        )
        self._fake_fn: Callable[..., Any] | None = None
        self.custom_op.register_fake(self.fake)

    # -- registration -----------------------------------------------------------------

    def register_impl(
        self,
        provider: str,
        fn: Callable[..., Any] | None = None,
        *,
        supports: Predicate | None = None,
        platforms: Iterable[str] = ("cuda",),
        replace: bool = False,
    ) -> Any:
        """Add ``provider``'s implementation; usable as a decorator.

        ``fn`` takes the op's arguments by name (extra parameters need defaults).
        ``supports(**call)`` returns ``True``, or a string saying why it refuses; it sees
        fake tensors at compile time, so it may read shapes, strides, dtypes and devices but
        never values. A provider already registered is replaced only with ``replace=True``.
        """
        if not isinstance(provider, str) or not provider:
            raise ValueError(f"provider: expected a non-empty name, got {provider!r}")
        if provider == NATIVE:
            raise ValueError(f"provider name {NATIVE!r} is reserved for the reference")
        if provider in self.impls and not replace:
            raise ValueError(
                f"provider {provider!r}: expected a name not yet registered for {self.name} "
                f"(registered: {sorted(self.impls)}); pass replace=True to replace it"
            )
        for other in self.impls:
            # compiled graphs call providers through ops named after them (passes/provider_ops)
            if other != provider and safe_name(other) == safe_name(provider):
                raise ValueError(
                    f"provider {provider!r}: expected a name distinct from {other!r} after "
                    f"mapping characters other than [0-9A-Za-z_] to '_' (both become "
                    f"{safe_name(provider)!r} in compiled graphs); rename one of them"
                )

        def add(impl_fn: Callable[..., Any]) -> Callable[..., Any]:
            why = self._signature_mismatch(impl_fn)
            if why is not None:
                raise ValueError(f"fn of provider {provider!r}: expected {why}")
            self.impls[provider] = Impl(provider, impl_fn, supports, tuple(platforms))
            return impl_fn

        return add if fn is None else add(fn)

    def unregister_impl(self, provider: str) -> Impl:
        """Remove ``provider``'s implementation and return it (``native`` stays)."""
        if provider == NATIVE:
            raise ValueError(f"provider name {NATIVE!r} is the reference and cannot be removed")
        if provider not in self.impls:
            raise ValueError(
                f"provider {provider!r}: expected one registered for {self.name}, "
                f"got none (registered: {sorted(self.impls)})"
            )
        return self.impls.pop(provider)

    def _signature_mismatch(self, fn: Callable[..., Any]) -> str | None:
        """Why ``fn`` cannot be called with the op's arguments by name, or None."""
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature: cannot tell
            return None
        kinds = inspect.Parameter
        by_name = (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        takes_any = any(p.kind is kinds.VAR_KEYWORD for p in params.values())
        missing = [
            n for n in self.signature.parameters
            if not takes_any and (n not in params or params[n].kind not in by_name)
        ]
        extra = [
            n for n, p in params.items()
            if n not in self.signature.parameters and p.kind in by_name and p.default is p.empty
        ]
        if not missing and not extra:
            return None
        parts = [f"missing {missing}"] if missing else []
        parts += [f"extra parameters without defaults {extra}"] if extra else []
        return (
            f"a function taking {self.name}'s arguments by name "
            f"({', '.join(self.signature.parameters)}); {'; '.join(parts)}"
        )

    def register_check(self, fn: Callable[[dict[str, Any]], None]) -> Callable:
        """Set the argument validation run before every eager or traced call."""
        self._check = fn
        return fn

    def register_device_check(self, fn: Callable[[dict[str, Any]], None]) -> Callable:
        """Set the checks of index values that run on the device, without a host sync: the
        checked mode of compiled graphs (``mamba_ir.compile(..., validate=True)``) runs them
        before the provider. ``fn`` asserts with ``torch._assert_async`` (see checks.py)."""
        self._device_check = fn
        return fn

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Set the meta function for ops that return new tensors."""
        self._fake_fn = fn
        return fn

    # -- dispatch ---------------------------------------------------------------------

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """All arguments of a call by name, defaults filled in."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def priority(self, device_type: str, *, priority: PrioritySpec = None) -> tuple[str, ...]:
        """Providers tried for a call on ``device_type``, best first; ``priority`` (as
        :func:`set_priority` takes it) comes before the ``set_priority`` context."""
        default = [p for p, impl in self.impls.items() if device_type in impl.platforms]
        return priority_for(self.name, default, priority)

    def decide(self, call: dict[str, Any], *, priority: PrioritySpec = None) -> Decision:
        """Choose the first provider, in priority order, that accepts ``call``."""
        skipped: list[tuple[str, str]] = []
        for provider in self.priority(_device_type(call), priority=priority):
            impl = self.impls.get(provider)
            if impl is None:
                skipped.append((provider, "not registered"))
                continue
            reason = impl.refusal(call)
            if reason is None:
                return Decision(self.name, provider, tuple(skipped))
            skipped.append((provider, reason))
        raise AssertionError("native accepts every call")  # pragma: no cover

    def _kernel(self, *args: Any, **kwargs: Any) -> Any:
        call = self.bind(*args, **kwargs)
        decision = self.decide(call)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("eager %s", decision)
        return self.impls[decision.provider].fn(**call)

    def fake(self, *args: Any, **kwargs: Any) -> Any:
        """What the op returns on fake tensors: nothing, or the tensors its fake makes."""
        if self._fake_fn is None:
            return None
        return self._fake_fn(**self.bind(*args, **kwargs))

    def check(self, call: dict[str, Any]) -> None:
        """Validate a bound call; raises ``ValueError`` naming the bad argument."""
        no_autograd(call)
        if self._check is not None:
            self._check(call)

    def device_check(self, call: dict[str, Any]) -> None:
        """Assert, on the call's device and without a host sync, what :meth:`check` can
        only read in eager calls (index ranges, row rules, offsets)."""
        if self._device_check is not None:
            self._device_check(call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.bind(*args, **kwargs)
        self.check(call)  # before allocating: a bad argument must not fail inside `allocate`
        for name, make in self.allocate.items():
            if call[name] is None:
                call[name] = make(call)
        result = self.custom_op(**call)
        if self.allocate:
            outs = tuple(call[name] for name in self.allocate)
            return outs[0] if len(outs) == 1 else outs
        return result

    def __repr__(self) -> str:
        return f"<mamba_ir op {self.name}: {', '.join(self.impls)}>"


def no_autograd(call: dict[str, Any]) -> None:
    """The ops are inference ops without a backward: a tensor that requires grad while
    autograd records would get a result silently cut from the graph."""
    if not torch.is_grad_enabled():
        return
    for name, value in call.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(
                f"{name}: expected a tensor that does not require grad, got requires_grad=True "
                "(mamba_ir ops are inference ops without a backward: call them under "
                f"torch.inference_mode() or torch.no_grad(), or pass {name}.detach())"
            )


def _device_type(call: dict[str, Any]) -> str:
    for value in call.values():
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


REGISTRY: dict[str, IrOp] = {}


def register_op(
    *,
    mutates_args: Iterable[str] = (),
    allocate: dict[str, Callable[[dict[str, Any]], torch.Tensor]] | None = None,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
) -> Callable[[Callable[..., Any]], IrOp]:
    """Declare an op from its native function.

    ``mutates_args`` names the tensors it writes in place; ``allocate`` maps an optional
    output argument to a function that creates it when the caller passes ``None`` (the
    call then returns it); ``tolerances`` overrides, per dtype, the ``(atol, rtol)`` a
    provider must meet against native (``mamba_ir.testing.TOLERANCES`` elsewhere).
    """

    def declare(native: Callable[..., Any]) -> IrOp:
        op = IrOp(native, mutates_args, allocate)
        op.tolerances = dict(tolerances or {})
        REGISTRY[op.name] = op
        return op

    return declare


def get_op(name: str) -> IrOp:
    """The declared op called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no mamba_ir op {name!r}; declared: {sorted(REGISTRY)}") from None
