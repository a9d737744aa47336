"""Align fusion: fold ``copy_state_blocks`` into the op that reads the copied rows.

Pattern, on the functionalized post-grad graph::

    S1 = copy_state_blocks(S0, src, dst)          # S1 = S0 with rows dst <- rows src
    S2 = op(S1, ..., reads dst, writes dst)        # an op declaring register_op(redirect=)

becomes, when the provider chosen for ``op`` accepts the redirected call::

    read = where((src != pad) & (dst != pad), src, dst)
    S2 = op(S0, ..., reads read, writes dst)

Both forms leave every row of ``S2`` identical when the op rewrites each destination row
entirely (each op's ``Redirect.whole_rows`` says when): a copied row is overwritten by the
op, and the op reads from the source row what the copy would have put there. A pad source
in a copy means "no copy" (read ``dst`` as before) while a pad source in the op means
"zero state", hence the ``where``. Variable-length calls may hold empty sequences, whose
destination rows the op does not write: for those the copy stays, narrowed to the empty
sequences' rows. A row of several tensors (``RowSpec.state``: a state and its scales) is
copied and read as one: the copy folds only when it moves each member the op's row has,
each into that member's place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from mamba_ir.op import Decision
from mamba_ir.priority import PrioritySpec

from .callsite import CallSite, fake_mode_of, fake_value, module_path

aten = torch.ops.aten
prims = torch.ops.prims

COPY = "copy_state_blocks"


@dataclass
class Fusion:
    """What the fusion pass decided about one copy: fused into ``op``, or kept and why.

    ``decision`` is the provider chosen for ``op`` where the pass asked (a fused ``op``'s
    provider is the one its redirected call was validated against): lowering takes it
    as it is, so a site is decided once."""

    copy: CallSite
    op: CallSite | None
    fused: bool
    reason: str
    residual: bool = False
    decision: Decision | None = None
    dst_args: tuple[str, ...] = ()  # the op's arguments the caller passed the copy's dst as


def fuse_align_copies(
    graph: fx.Graph,
    sites: list[CallSite],
    *,
    priority: PrioritySpec = None,
    names: Mapping[fx.Node, str] | None = None,
) -> list[Fusion]:
    """Fold every foldable copy; ``priority`` orders the providers of the ops (as
    :meth:`IrOp.decide` takes it). A reason naming another call site names it by
    ``names`` (the report's site names; the FX node's name otherwise)."""
    by_node = {site.node: site for site in sites}

    def name(node: fx.Node) -> str:
        return _describe(node, names or {})

    outcomes = []
    for copy in [s for s in sites if s.op.name == COPY]:
        op, reason = _partner(copy, by_node, name)
        if op is None:
            outcomes.append(Fusion(copy, None, False, reason))
            continue
        rows, spec = op.op.rows, op.op.redirect
        call = op.fake_call()
        why = spec.whole_rows(call)
        if why is not None:
            outcomes.append(Fusion(copy, op, False, f"kept: {why}"))
            continue
        decision = op.op.decide(call, priority=priority)  # for the unfused call, as lowered
        provider = decision.provider
        fused_call = {**call, rows.read: _read_fake(copy),
                      rows.write: fake_value(copy.arg("dst"))}
        refusal = op.op.impls[provider].refusal(fused_call)
        if refusal is not None:
            why = f"kept: {provider} refuses redirect: {refusal}"
            outcomes.append(Fusion(copy, op, False, why, decision=decision))
            continue
        residual = spec.bounds is not None and call[spec.bounds] is not None
        dst = copy.arg("dst")
        dst_args = tuple(n for n in dict.fromkeys((rows.read, rows.write)) if op.arg(n) is dst)
        _rewrite(graph, copy, op, residual)
        text = "fused: reads the copy's source rows"
        if residual:
            text += "; copy kept for empty sequences only"
        outcomes.append(Fusion(copy, op, True, text, residual, decision, dst_args))
    return outcomes


def _describe(node: fx.Node, names: Mapping[fx.Node, str]) -> str:
    """A node as a reason names it: an IR call by its site, another op by what it calls
    and where (the FX node's name means little to whoever reads the report)."""
    if node in names:
        return names[node]
    if node.op == "output":
        return "the graph's output"
    if node.target is aten.copy_.default and node.args[0].op == "placeholder":
        return "the write-back into the caller's tensor"
    module = module_path(node)
    return f"{node.target}" + (f" in {module}" if module else "")


def _partner(
    copy: CallSite, by_node: dict[fx.Node, CallSite], name: Callable[[fx.Node], str]
) -> tuple[CallSite | None, str]:
    """The op that reads the copied rows next, or why there is none to fold into."""
    if not copy.functional:
        return None, "kept: graph is not functionalized"
    copy_members = _members(copy)
    copied = copy.state_out(copy_members[0])
    users = [] if copied is None else list(copied.users)
    if not users:
        return None, "kept: no op reads the copied state"
    if len(users) > 1:
        users_text = ", ".join(name(u) for u in users)
        return None, f"kept: the copied state is used by several nodes ({users_text})"
    op = by_node.get(users[0])
    if op is None or op.op.redirect is None:
        return None, (f"kept: the copied state is next used by {name(users[0])}, not an op "
                      "declaring a src redirect (register_op(redirect=...))")
    rows = op.op.rows
    members = _members(op)
    if len(members) != len(copy_members):
        return None, (f"kept: the copy moves rows of {', '.join(copy_members)}, "
                      f"{name(op.node)}'s rows are {', '.join(members)}")
    for theirs, mine in zip(copy_members, members, strict=True):
        out = copy.state_out(theirs)
        if out is None or list(out.users) != [op.node]:
            return None, f"kept: the copied {theirs} is used by another node"
        base, view = op.state_in(mine)
        if base is not out or view != copy.state_in(theirs)[1]:
            return None, f"kept: {name(op.node)} uses the copied {theirs} through another view"
    dst = copy.arg("dst")
    read, write = op.arg(rows.read), op.arg(rows.write)
    if (read if read is not None else write) is not dst or (
        write if write is not None else read
    ) is not dst:
        return None, f"kept: {name(op.node)} does not read and write the copy's dst rows"
    if op.arg(rows.pad) != copy.arg("pad_slot_id"):
        return None, f"kept: {name(op.node)} has another pad_slot_id"
    return op, ""


def _members(site: CallSite) -> list[str]:
    """The members of a state row (``RowSpec.state``) a call site passes, in order: a copy
    folds into an op when each member it moves is the op's member in the same place."""
    return [n for n in site.op.rows.states if site.state_in(n)[0] is not None]


def _read_fake(copy: CallSite) -> Any:
    src, dst = fake_value(copy.arg("src")), fake_value(copy.arg("dst"))
    pad = copy.arg("pad_slot_id")
    with fake_mode_of(dst):
        return torch.where((src != pad) & (dst != pad), src.to(dst.dtype), dst)


def _rewrite(graph: fx.Graph, copy: CallSite, op: CallSite, residual: bool):
    rows, spec = op.op.rows, op.op.redirect
    src, dst, pad = copy.arg("src"), copy.arg("dst"), copy.arg("pad_slot_id")
    if residual:
        # the copy stays for the rows of empty sequences only, right before the op
        for node in [copy.node, *copy.node.users]:
            op.node.prepend(node)
        with graph.inserting_before(copy.node):
            bounds = op.arg(spec.bounds)
            ends = _call(graph, aten.slice.Tensor, bounds, 0, 1)
            starts = _call(graph, aten.slice.Tensor, bounds, 0, 0, -1)
            empty = _call(graph, aten.eq.Scalar, _call(graph, aten.sub.Tensor, ends, starts), 0)
            copy.set_arg("src", _call(graph, aten.where.ScalarOther, empty, src, pad))
    with graph.inserting_before(op.node):
        if fake_value(src).dtype != fake_value(dst).dtype:
            src = _call(graph, prims.convert_element_type.default, src, fake_value(dst).dtype)
        valid = _call(
            graph,
            aten.bitwise_and.Tensor,
            _call(graph, aten.ne.Scalar, src, pad),
            _call(graph, aten.ne.Scalar, dst, pad),
        )
        read = _call(graph, aten.where.self, valid, src, dst)
    op.set_arg(rows.read, read)
    op.set_arg(rows.write, dst)
    if not residual:
        for theirs, mine in zip(_members(copy), _members(op), strict=True):
            op.set_state_in(mine, copy.state_in(theirs)[0])
        for user in list(copy.node.users):
            graph.erase_node(user)
        graph.erase_node(copy.node)


def _call(graph: fx.Graph, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` with its meta value computed on fake tensors."""
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fake_value(args), fake_value(kwargs)
    with fake_mode_of(fake_args):
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node
