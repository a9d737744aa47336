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

from . import checks
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


@dataclass(frozen=True)
class Rows:
    """The state rows one call addresses, per entry (a sequence, or one copy).

    Tensors, computed without a host sync, so the eager check (after reading them), the
    device check of the checked mode and ``check_impl`` share one computation."""

    sources: torch.Tensor  # (n,) the row each entry names as its source
    reads: torch.Tensor  # (n,) bool: whether the entry reads that row (no initial state: not)
    destinations: torch.Tensor  # (n, k) the rows an entry may write
    written: torch.Tensor  # (n, k) bool: which of them it writes

    def read_rows(self, pad: int) -> set[int]:
        """The rows read (host sync)."""
        return set(self.sources[self.reads].tolist()) - {pad}

    def written_rows(self, pad: int) -> set[int]:
        """The rows written (host sync)."""
        return set(self.destinations[self.written].tolist()) - {pad}

    def written_lists(self) -> list[list[int]]:
        """Per entry, the rows it writes, as :func:`checks.disjoint_rows` takes them."""
        return [
            [r for r, w in zip(rows, mask, strict=True) if w]
            for rows, mask in zip(self.destinations.tolist(), self.written.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class RowSpec:
    """Which rows of which state argument(s) an op reads and writes: the row rules (checked
    eagerly and in the checked mode), ``check_impl`` and align fusion all read it.

    A row of state may be several tensors: ``state=("state", "state_scale")`` says row ``i``
    is row ``i`` of each, read and written together (a quantized state and its scales; a
    checkpoint and its input ring). The first member counts the rows and is never optional;
    a later one a call leaves ``None`` is absent from that call's rows. ``value`` turns a
    row's members into its float32 values and the step a correct provider may differ by
    (one quantization step of a quantized row): ``check_impl`` compares written rows by it.
    """

    state: str | tuple[str, ...]  # the mutated argument(s) whose rows the indices name
    read: str  # the index argument naming source rows (src redirect)
    write: str  # the index argument naming destination rows (``None``: ``read``'s rows)
    rows: Callable[[dict[str, Any]], Rows]  # the rows of one bound call
    checkpoints: str | None = None  # an index argument of extra rows written (align mode)
    pad: str = "pad_slot_id"
    # members by name (absent ones None) -> (float32 values, step); None: compare members
    value: Callable[[dict[str, Any]], tuple[torch.Tensor, Any]] | None = None

    @property
    def states(self) -> tuple[str, ...]:
        """Every member of a row, the row-counting one first."""
        return (self.state,) if isinstance(self.state, str) else tuple(self.state)

    @property
    def primary(self) -> str:
        """The member whose leading dimension counts the rows."""
        return self.states[0]

    def members(self, call: dict[str, Any]) -> tuple[str, ...]:
        """The members a bound call passes (a later member left ``None`` is absent)."""
        return tuple(n for n in self.states if call[n] is not None)

    def destination_name(self, call: dict[str, Any]) -> str:
        """The argument(s) a row-rule failure of destination rows names."""
        name = self.write if call[self.write] is not None else self.read
        if self.checkpoints is not None and call[self.checkpoints] is not None:
            name += f" / {self.checkpoints}"
        return name


@dataclass(frozen=True)
class Redirect:
    """An op align fusion may fold a preceding ``copy_state_blocks`` into: the fused call
    reads the copy's source rows through ``RowSpec.read`` and writes ``RowSpec.write``."""

    bounds: str | None  # cumulative sequence starts of a variable-length call
    # None when every destination row is rewritten entirely (else the copy must stay), or why
    whole_rows: Callable[[dict[str, Any]], str | None] = lambda call: None


class IrOp:
    """A declared op: its native semantics, its custom op, and its providers."""

    def __init__(
        self,
        native: Callable[..., Any],
        mutates_args: Iterable[str],
        allocate: dict[str, Callable[[dict[str, Any]], torch.Tensor]] | None = None,
        *,
        tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
        input_tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
        rows: RowSpec | None = None,
        redirect: Redirect | None = None,
    ) -> None:
        self.name = native.__name__
        self.native = native
        self.__doc__ = native.__doc__
        self.signature = inspect.signature(native, eval_str=True)
        # read once: binding with inspect at call time would make TorchDynamo stop tracing
        # in any frame that has mutated a dict (transformers' forwards do, kwargs.pop)
        self._names = tuple(self.signature.parameters)
        self._defaults = {n: p.default for n, p in self.signature.parameters.items()
                          if p.default is not p.empty}
        self._scalars = checks.scalar_kinds(self.signature)  # checked before the op's check
        self.mutates_args = tuple(mutates_args)
        self.allocate = dict(allocate or {})
        self.tolerances = dict(tolerances or {})
        self.input_tolerances = dict(input_tolerances or {})
        self.rows = rows
        self.redirect = redirect
        self._check_facts()
        self.impls: dict[str, Impl] = {NATIVE: Impl(NATIVE, native, None, ("cpu", "cuda"))}
        self._check: Callable[[dict[str, Any]], None] | None = None
        self._value_check: Callable[[dict[str, Any]], None] | None = None
        self._device_check: Callable[[dict[str, Any]], None] | None = None
        # a small call for `mamba-ir ops`: example(device, dtype) -> arguments by name
        self.example: Callable[[torch.device, torch.dtype], dict[str, Any]] | None = None
        # hypothesis argument sets for check_impl: strategy(device, sizes) -> SearchStrategy
        self.strategy: Callable[[str, Any], Any] | None = None
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

    def _check_facts(self) -> None:
        """The arguments the row spec and redirect name are the op's: a typo fails here,
        at declaration, not inside a check or a compile."""
        if self.redirect is not None and self.rows is None:
            raise ValueError(f"{self.name}: redirect: expected rows= (a RowSpec) beside it")
        names = [] if self.rows is None else [
            *self.rows.states, self.rows.read, self.rows.write, self.rows.pad,
            *([self.rows.checkpoints] if self.rows.checkpoints else []),
        ]
        if self.redirect is not None and self.redirect.bounds is not None:
            names.append(self.redirect.bounds)
        unknown = [n for n in names if n not in self.signature.parameters]
        if unknown:
            raise ValueError(
                f"{self.name}: rows/redirect: expected argument names of the op "
                f"({', '.join(self.signature.parameters)}), got {unknown}"
            )
        unwritten = [] if self.rows is None else [
            n for n in self.rows.states if n not in self.mutates_args
        ]
        if unwritten:
            raise ValueError(
                f"{self.name}: rows: expected every member of a state row in mutates_args "
                f"({', '.join(self.mutates_args)}): a row is written whole, got {unwritten}"
            )

    def register_check(self, fn: Callable[[dict[str, Any]], None]) -> Callable:
        """Set the metadata validation (shapes, dtypes, devices, layouts: no tensor values)
        run on every call, traced ones included."""
        self._check = fn
        return fn

    def register_value_check(self, fn: Callable[[dict[str, Any]], None]) -> Callable:
        """Set the validation of index values (ranges, offsets), run after the metadata
        check where values can be read: eager calls outside CUDA-graph capture. The row
        rules of :class:`RowSpec` follow it; ``fn`` need not check them."""
        self._value_check = fn
        return fn

    def register_device_check(self, fn: Callable[[dict[str, Any]], None]) -> Callable:
        """Set the checks of index values that run on the device, without a host sync: the
        checked mode of compiled graphs (``mamba_ir.compile(..., validate=True)``) runs them,
        then the row rules of :class:`RowSpec`, before the provider. ``fn`` asserts with
        ``torch._assert_async`` (see checks.py)."""
        self._device_check = fn
        return fn

    def register_example(
        self, fn: Callable[[torch.device, torch.dtype], dict[str, Any]]
    ) -> Callable[[torch.device, torch.dtype], dict[str, Any]]:
        """Set the small call ``mamba-ir ops`` decides on: ``fn(device, dtype)`` returns
        arguments by name, laid out as a model calls the op."""
        self.example = fn
        return fn

    def register_strategy(self, fn: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
        """Set the hypothesis argument sets of ``mamba_ir.testing.calls`` and ``check_impl``:
        ``fn(device, sizes)`` returns a strategy of valid calls by name. Import hypothesis
        inside ``fn``: it comes with the ``testing`` extra only."""
        self.strategy = fn
        return fn

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Set the meta function for ops that return new tensors."""
        self._fake_fn = fn
        return fn

    # -- dispatch ---------------------------------------------------------------------

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """All arguments of a call by name, defaults filled in."""
        if len(args) > len(self._names):
            raise TypeError(f"{self.name}() takes {len(self._names)} arguments, "
                            f"got {len(args)} positional")
        call = dict(zip(self._names, args, strict=False))  # the rest by name or default
        for name, value in kwargs.items():
            if name not in self._names:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {name!r}")
            if name in call:
                raise TypeError(f"{self.name}() got multiple values for argument {name!r}")
            call[name] = value
        missing = [n for n in self._names if n not in call and n not in self._defaults]
        if missing:
            raise TypeError(f"{self.name}() missing required arguments: {missing}")
        return {n: call[n] if n in call else self._defaults[n] for n in self._names}

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
        # what eager torch.ops.mamba_ir.<op> calls, and graphs compiled without the passes
        # at run time: checked like mamba_ir.ops.<op>; an optional output left None gets
        # scratch memory so the state still advances (the custom op returns nothing)
        call = self.bind(*args, **kwargs)
        self.check(call)
        self._allocate(call)
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
        """Validate a bound call: its metadata, then, where they can be read, its index
        values and row rules; raises ``ValueError`` naming the bad argument."""
        self.check_metadata(call)
        if checks.values_readable(*(v for v in call.values() if isinstance(v, torch.Tensor))):
            if self._value_check is not None:
                self._value_check(call)
            if self.rows is not None:
                spec, rows = self.rows, self.rows.rows(call)
                checks.disjoint_rows(spec.read, rows.sources.tolist(),
                                     spec.destination_name(call), rows.written_lists(),
                                     call[spec.pad])

    def check_metadata(self, call: dict[str, Any]) -> None:
        """The part of :meth:`check` that reads no tensor values (no host sync)."""
        no_autograd(call)
        checks.scalars(call, self._scalars)
        if self._check is not None:
            self._check(call)
        if self.rows is not None:
            checks.row_members(call, self.rows.members(call))

    def device_check(self, call: dict[str, Any]) -> None:
        """Assert, on the call's device and without a host sync, what :meth:`check` can
        only read in eager calls (index ranges, row rules, offsets)."""
        if self._device_check is not None:
            self._device_check(call)
        if self.rows is not None:
            spec, rows = self.rows, self.rows.rows(call)
            checks.assert_row_rules(spec.read, rows.sources, spec.destination_name(call),
                                    rows.destinations, rows.written,
                                    call[spec.primary].shape[0], call[spec.pad])

    def rows_of(self, call: dict[str, Any]) -> Rows:
        """The state rows a bound call reads and writes (see :class:`RowSpec`)."""
        if self.rows is None:
            raise ValueError(f"{self.name}: declares no rows (register_op(rows=RowSpec(...)))")
        return self.rows.rows(call)

    def _allocate(self, call: dict[str, Any]) -> None:
        for name, make in self.allocate.items():
            if call[name] is None:
                call[name] = make(call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.bind(*args, **kwargs)
        # Metadata here, before allocating (a bad argument must not fail inside `allocate`)
        # and on the fake tensors of a traced call; values in the custom op's kernel, so an
        # eager call reads them once.
        self.check_metadata(call)
        self._allocate(call)
        # positionally: torch 2.11 with autograd enabled bumps the version of each mutated
        # argument by its position and fails (IndexError) on one passed by name
        result = self.custom_op(*call.values())
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
    input_tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    rows: RowSpec | None = None,
    redirect: Redirect | None = None,
) -> Callable[[Callable[..., Any]], IrOp]:
    """Declare an op from its native function.

    ``mutates_args`` names the tensors it writes in place; ``allocate`` maps an optional
    output argument to a function that creates it when the caller passes ``None`` (the
    call then returns it; a ``torch.ops`` call gets scratch memory instead); ``tolerances``
    overrides, per dtype of a result, the ``(atol, rtol)`` a provider must meet against
    native (``mamba_ir.testing.TOLERANCES`` elsewhere); ``input_tolerances`` loosens, per
    dtype of the call's inputs, every result of a call with such inputs (providers that
    multiply 16-bit inputs at their own precision); ``rows`` says which state rows a call
    reads and writes (the row rules, ``check_impl``); ``redirect`` makes the op a target
    of align fusion. Hooks of the op add the rest: ``register_check``,
    ``register_value_check``, ``register_device_check``, ``register_fake``,
    ``register_example``, ``register_strategy``.
    """

    def declare(native: Callable[..., Any]) -> IrOp:
        op = IrOp(native, mutates_args, allocate, tolerances=tolerances,
                  input_tolerances=input_tolerances, rows=rows, redirect=redirect)
        REGISTRY[op.name] = op
        return op

    return declare


def get_op(name: str) -> IrOp:
    """The declared op called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no mamba_ir op {name!r}; declared: {sorted(REGISTRY)}") from None
