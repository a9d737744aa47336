"""IR call sites in a post-grad graph, whatever form the call takes there.

After AOTAutograd a mutating custom op appears as ``auto_functionalized`` (v1: every
argument by name, mutated ones included, new values as outputs) or
``auto_functionalized_v2`` (mutated arguments are views of ``_all_bases``, described by
``_<arg>_*`` keywords, new bases as outputs). Graphs that were never functionalized call
the op directly. :class:`CallSite` hides the difference from the passes.
"""

from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from mamba_ir.op import REGISTRY, IrOp

AUTO_FUNCTIONALIZED = torch.ops.higher_order.auto_functionalized
AUTO_FUNCTIONALIZED_V2 = getattr(torch.ops.higher_order, "auto_functionalized_v2", None)

DIRECT, V1, V2 = "direct", "auto_functionalized", "auto_functionalized_v2"


def ir_ops() -> dict[Any, IrOp]:
    """The IR ops by their custom op overload."""
    return {op.custom_op._opoverload: op for op in REGISTRY.values()}


@dataclass
class CallSite:
    """One call of IR op ``op`` at ``node``, in any of the three forms."""

    node: fx.Node
    op: IrOp
    form: str

    @classmethod
    def find(cls, graph: fx.Graph, targets: dict[Any, IrOp]) -> list[CallSite]:
        """Every call of an op in ``targets`` (overload -> op), in graph order."""
        sites = []
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in targets:
                sites.append(cls(node, targets[node.target], DIRECT))
            elif node.target is AUTO_FUNCTIONALIZED and node.args[0] in targets:
                sites.append(cls(node, targets[node.args[0]], V1))
            elif (
                AUTO_FUNCTIONALIZED_V2 is not None
                and node.target is AUTO_FUNCTIONALIZED_V2
                and node.args[0] in targets
            ):
                sites.append(cls(node, targets[node.args[0]], V2))
        return sites

    @property
    def functional(self) -> bool:
        return self.form != DIRECT

    # -- arguments --------------------------------------------------------------------

    def _direct_args(self) -> dict[str, Any]:
        return self.op.bind(*self.node.args, **self.node.kwargs)

    def arg(self, name: str) -> Any:
        """A non-mutated argument as the graph holds it (a node or a constant)."""
        if self.form == DIRECT:
            return self._direct_args()[name]
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        return self.op.signature.parameters[name].default

    def set_arg(self, name: str, value: Any) -> None:
        """Replace a non-mutated argument."""
        if self.form == DIRECT:
            call = self._direct_args()
            call[name] = value
            self.node.args, self.node.kwargs = (), call
        else:
            self.node.kwargs = {**self.node.kwargs, name: value}
            self._eager_update(name, value)

    def fake_call(self) -> dict[str, Any]:
        """Every argument by name as the predicates see them: fake tensors and constants."""
        if self.form == DIRECT:
            return {k: fake_value(v) for k, v in self._direct_args().items()}
        call = {}
        for name, param in self.op.signature.parameters.items():
            if name in self.op.mutates_args and self.form == V2:
                call[name] = self._v2_view(name)
            else:
                call[name] = fake_value(self.node.kwargs.get(name, param.default))
        return call

    # -- mutated arguments ------------------------------------------------------------

    def state_in(self, name: str) -> tuple[fx.Node | None, tuple]:
        """The node holding the value mutated argument ``name`` starts from, and how the
        argument views it (two calls on the same node and view touch the same tensor)."""
        if self.form == DIRECT:
            return self._direct_args()[name], ()
        if self.form == V1:
            return self.node.kwargs.get(name), ()
        index = self.node.kwargs.get(f"_{name}_base_index")
        if index is None:
            return None, ()
        prefix = f"_{name}_"
        # another mutated argument's keys may share the prefix (state, state_scale)
        longer = tuple(f"_{n}_" for n in self.op.mutates_args if n != name and n.startswith(name))
        view = tuple(
            sorted(
                (k.removeprefix(prefix), v)
                for k, v in self.node.kwargs.items()
                if k.startswith(prefix) and k != f"{prefix}base_index"
                and not k.startswith(longer)
            )
        )
        return self.node.kwargs["_all_bases"][index], view

    def set_state_in(self, name: str, value: fx.Node) -> None:
        """Make mutated argument ``name`` start from ``value`` (same view of it)."""
        if self.form == V2:
            index = self.node.kwargs[f"_{name}_base_index"]
            bases = list(self.node.kwargs["_all_bases"])
            bases[index] = value
            self.node.kwargs = {**self.node.kwargs, "_all_bases": bases}
            self._eager_update("_all_bases", bases)
        elif self.form == V1:
            self.node.kwargs = {**self.node.kwargs, name: value}
            self._eager_update(name, value)
        else:
            raise ValueError("a direct call mutates its argument in place")

    def state_out(self, name: str) -> fx.Node | None:
        """The node holding the new value of mutated argument ``name`` (its base in v2)."""
        if self.form == DIRECT:
            return None
        offset = _output_count(self.op)
        if self.form == V1:
            index = offset + list(self.op.mutates_args).index(name)
        else:
            base = self.node.kwargs[f"_{name}_base_index"]
            if base is None:
                return None
            index = offset + base
        for user in self.node.users:
            if user.target is operator.getitem and user.args[1] == index:
                return user
        return None

    # -- target -----------------------------------------------------------------------

    @property
    def target(self) -> Any:
        return self.node.target if self.form == DIRECT else self.node.args[0]

    def retarget(self, overload: Any, **extra: Any) -> None:
        """Call ``overload`` (the op's schema, plus the arguments ``extra`` gives constant
        values of) instead of the current op."""
        if self.form == DIRECT:
            self.node.args, self.node.kwargs = (), {**self._direct_args(), **extra}
            self.node.target = overload
            return
        self.node.args = (overload, *self.node.args[1:])
        self.node.kwargs = {**self.node.kwargs, **extra}
        recorded = self.node.meta.get("eager_input_vals")
        if recorded is not None:
            args, kwargs = recorded
            self.node.meta["eager_input_vals"] = ((overload, *args[1:]), {**kwargs, **extra})

    def _eager_update(self, name: str, value: Any) -> None:
        # Inductor re-traces auto_functionalized nodes from the argument values recorded
        # at capture ("eager_input_vals"): keep them in step with the node's arguments.
        recorded = self.node.meta.get("eager_input_vals")
        if recorded is not None:
            args, kwargs = recorded
            self.node.meta["eager_input_vals"] = (args, {**kwargs, name: fake_value(value)})

    def _v2_view(self, name: str) -> Any:
        base, view = self.state_in(name)
        if base is None:
            return None
        base_val = fake_value(base)
        kw = {k: fake_value(v) for k, v in view}
        with fake_mode_of(base_val):
            if "storage_offset" in kw:
                return torch.as_strided(base_val, kw["size"], kw["stride"], kw["storage_offset"])
            if "slice_dim" in kw:
                return torch.ops.aten.slice.Tensor(
                    base_val, kw["slice_dim"], kw["slice_start"], kw["slice_end"]
                )
        return base_val  # the base itself, or an alias of it


def module_path(node: fx.Node) -> str:
    """The path of the innermost module whose call made ``node`` (``model.layers.3.mixer``),
    or ``""`` when no module call encloses it (a plain function, the compiled module's own
    forward, a method called directly rather than through ``__call__``).

    TorchDynamo records each module called through ``__call__`` or ``forward`` in
    ``node.meta["nn_module_stack"]`` (outermost first), as the source it reached it by,
    e.g. ``L['self'].model.layers[3].mixer``; AOTAutograd and Inductor keep that entry on
    the post-grad node. The compiled object itself, ``L['self']``, is left out of the path;
    another root keeps its name (``G['model'].layers.0`` -> ``model.layers.0``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    source = str(list(stack.values())[-1][0])
    root = re.match(r"""^[LG]\[(['"])(.*?)\1\]""", source)
    if root is not None:
        source = ("" if root[2] == "self" else root[2]) + source[root.end():]
    source = re.sub(r"""\[(['"]?)([^\]'"]*)\1\]""", r".\2", source)  # [3], ['mixer'] -> .3
    return source.strip(".")


def _output_count(op: IrOp) -> int:
    # auto_functionalized returns (*outputs, *new values); a single or absent output
    # still takes one slot
    returns = op.custom_op._opoverload._schema.returns
    return len(returns) if len(returns) > 1 else 1


def fake_value(value: Any) -> Any:
    """The meta value of a node (recursively through lists); constants unchanged."""
    return fx.node.map_aggregate(
        value, lambda v: v.meta.get("val") if isinstance(v, fx.Node) else v
    )


def fake_mode_of(value: Any) -> Any:
    """The fake mode of the fake tensors in ``value``, to compute new meta values in."""
    mode = detect_fake_mode([value])
    return contextlib.nullcontext() if mode is None else mode
