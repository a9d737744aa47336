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

from torch import fx

from mamba_ir.op import Decision
from mamba_ir.priority import PrioritySpec

from .callsite import CallSite, ir_ops
from .fusion import Fusion, fuse_align_copies
from .provider_ops import provider_op
from .report import SiteReport


def decide(site: CallSite, priority: PrioritySpec = None) -> Decision:
    """The provider for one call site, with the better-ranked ones it skipped and why."""
    return site.op.decide(site.fake_call(), priority=priority)


def run(
    graph: fx.Graph, *, priority: PrioritySpec = None, validate: bool = False
) -> list[SiteReport]:
    """Fuse align copies, then lower every IR call site of ``graph``; report each site.

    ``priority`` (as :func:`mamba_ir.set_priority` takes it) comes before the priority in
    effect; ``validate`` lowers to the checked provider ops."""
    sites = CallSite.find(graph, ir_ops())
    if not sites:
        return []
    fusions = fuse_align_copies(graph, sites, priority=priority)
    by_copy = {f.copy.node: f for f in fusions}
    by_op = {f.op.node: f for f in fusions if f.op is not None}
    reports = []
    for site in sites:
        fusion = by_copy.get(site.node) or by_op.get(site.node)
        if fusion is not None and fusion.fused and not fusion.residual and site is fusion.copy:
            reports.append(_folded(site, fusion))
            continue
        decided = fusion.decision if fusion is not None and site is fusion.op else None
        decision = decided or decide(site, priority)
        site.retarget(provider_op(site.op, decision.provider, checked=validate))
        reports.append(_lowered(site, decision, fusion))
    return reports


def _folded(site: CallSite, fusion: Fusion) -> SiteReport:
    return SiteReport(
        graph=0,
        node=site.node.name,
        op=site.op.name,
        provider=None,
        fused=True,
        fused_with=fusion.op.node.name,
        fusion=fusion.reason,
    )


def _lowered(site: CallSite, decision: Decision, fusion: Fusion | None) -> SiteReport:
    partner = None
    if fusion is not None and fusion.op is not None:
        partner = fusion.op if site is fusion.copy else fusion.copy
    return SiteReport(
        graph=0,
        node=site.node.name,
        op=site.op.name,
        provider=decision.provider,
        skipped=decision.skipped,
        fused=bool(fusion and fusion.fused),
        fused_with=partner.node.name if partner is not None else None,
        fusion=fusion.reason if fusion is not None else None,
    )
