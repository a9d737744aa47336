"""Lowering: every IR call site becomes a direct call of the provider chosen for it.

The choice is :meth:`IrOp.decide` on the call site's fake arguments: the first provider,
in the op's priority order for the call's device, whose predicate accepts them. Each site
is decided once: an op the fusion pass looked at keeps the decision fusion validated its
redirected call against, every other site is decided here. The priority the pass was set
up with is handed to ``decide``, not entered as a ``set_priority`` context. The node
keeps its form (``auto_functionalized`` stays ``auto_functionalized``), only the op it
names changes to the provider op, so Inductor re-inplaces it like the IR op. In the checked
mode (``validate``) it names the checked provider op, which asserts the op's index rules on
the device before the provider runs.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from torch import fx

from mamba_ir.op import Decision
from mamba_ir.priority import PrioritySpec

from .callsite import CallSite, ir_ops, module_path
from .fusion import Fusion, fuse_align_copies
from .provider_ops import CHECKED_AS, checked_as, provider_op
from .report import SiteReport


def decide(site: CallSite, priority: PrioritySpec = None) -> Decision:
    """The provider for one call site, with the better-ranked ones it skipped and why."""
    return site.op.decide(site.fake_call(), priority=priority)


class SiteName(NamedTuple):
    """Where a call site is, as :class:`SiteReport` names it."""

    module: str  # the innermost module's path, "" outside any module
    call: str  # the op, numbered where the module (or graph) calls it more than once

    @property
    def site(self) -> str:
        return f"{self.module}: {self.call}" if self.module else self.call


def run(
    graph: fx.Graph, *, priority: PrioritySpec = None, validate: bool = False
) -> list[SiteReport]:
    """Fuse align copies, then lower every IR call site of ``graph``; report each site.

    ``priority`` (as :func:`mamba_ir.set_priority` takes it) comes before the priority in
    effect; ``validate`` lowers to the checked provider ops."""
    sites = CallSite.find(graph, ir_ops())
    if not sites:
        return []
    names = site_names(sites)  # before fusion moves or erases nodes
    fusions = fuse_align_copies(graph, sites, priority=priority,
                                names={node: name.site for node, name in names.items()})
    by_copy = {f.copy.node: f for f in fusions}
    by_op = {f.op.node: f for f in fusions if f.op is not None}
    reports = []
    for site in sites:
        fusion = by_copy.get(site.node) or by_op.get(site.node)
        if fusion is not None and fusion.fused and not fusion.residual and site is fusion.copy:
            reports.append(_folded(site, fusion, names))
            continue
        decided = fusion.decision if fusion is not None and site is fusion.op else None
        decision = decided or decide(site, priority)
        extra = {CHECKED_AS: _checked_as(site, fusion, names)} if validate else {}
        site.retarget(provider_op(site.op, decision.provider, checked=validate), **extra)
        reports.append(_lowered(site, decision, fusion, names))
    return reports


def _checked_as(site: CallSite, fusion: Fusion | None, names: dict[fx.Node, SiteName]) -> str:
    """How the checked call's failures name its arguments and itself: the site, and, for
    an op align fusion folded a copy into, the copy's ``src`` and ``dst`` the user passed
    where the op now reads indices the pass built from them."""
    name = names[site.node]
    where, arg_names = f"at {name.site}", {}
    if fusion is not None and fusion.fused and site is fusion.op:
        copy = names[fusion.copy.node]
        folded = copy.call if copy.module == name.module else copy.site
        rows = site.op.rows
        arg_names[rows.read] = f"src of {folded} (its dst where src is the pad)"
        arg_names[rows.write] = (f"dst of {folded}, given to {site.op.name} as "
                                 f"{' and '.join(fusion.dst_args)}")
        where += f", {folded} folded in by align fusion"
    return checked_as(arg_names, where)


def site_names(sites: list[CallSite]) -> dict[fx.Node, SiteName]:
    """Every site's name: the innermost module's path (``model.layers.3.mixer``), and the
    op numbered ``#1``, ``#2``, ... in graph order where that module (or the graph, outside
    any module) calls it more than once, so that two such calls stay apart."""
    where = {site.node: (module_path(site.node), site.op.name) for site in sites}
    counts = Counter(where.values())
    seen: Counter[tuple[str, str]] = Counter()
    names = {}
    for node, (module, op) in where.items():
        seen[module, op] += 1
        names[node] = SiteName(module, f"{op}#{seen[module, op]}" if counts[module, op] > 1
                               else op)
    return names


def _folded(site: CallSite, fusion: Fusion, names: dict[fx.Node, SiteName]) -> SiteReport:
    module, call = names[site.node]
    return SiteReport(
        graph=0,
        node=site.node.name,
        op=site.op.name,
        provider=None,
        fused=True,
        fused_with=names[fusion.op.node].site,
        fusion=fusion.reason,
        module=module,
        call=call,
    )


def _lowered(site: CallSite, decision: Decision, fusion: Fusion | None,
             names: dict[fx.Node, SiteName]) -> SiteReport:
    partner = None
    if fusion is not None and fusion.op is not None:
        partner = fusion.op if site is fusion.copy else fusion.copy
    module, call = names[site.node]
    return SiteReport(
        graph=0,
        node=site.node.name,
        op=site.op.name,
        provider=decision.provider,
        skipped=decision.skipped,
        fused=bool(fusion and fusion.fused),
        fused_with=names[partner.node].site if partner is not None else None,
        fusion=fusion.reason if fusion is not None else None,
        module=module,
        call=call,
    )
