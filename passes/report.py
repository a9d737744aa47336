"""The lowering report: what every IR call site of a compiled graph became, and why."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

logger = logging.getLogger("mamba_ir")


@dataclass(frozen=True)
class SiteReport:
    """One call site: the provider chosen, those skipped with their reasons, and fusion.

    A site is named where the model made the call: ``module`` is the path of the
    innermost module whose call made it (``model.layers.3.mixer``; ``""`` in a plain
    function), ``call`` the op, numbered ``#1``, ``#2``, ... in graph order where that
    module (or, without one, the graph) calls the op more than once. :attr:`site` joins
    the two and is unique within a graph; ``node`` is the FX node's name (as in Inductor's
    ``output_code`` logs).

    ``provider`` is ``None`` for a ``copy_state_blocks`` folded into the op that follows
    it (``fused_with`` names that op's site, ``fused_with_op`` the op). For an op,
    ``fusion`` says whether a preceding copy was folded into it, or why not. ``residual``:
    the copy was folded but stays for the rows of empty sequences (varlen calls), which
    the op does not write. ``graph_name`` labels the graph (see
    :meth:`LoweringReport.add_graph`); ``rank`` is the process's rank where
    ``torch.distributed`` was initialised when the graph compiled (tensor parallelism:
    every rank compiles its own graphs), else None.
    """

    graph: int
    node: str
    op: str
    provider: str | None
    skipped: tuple[tuple[str, str], ...] = ()
    fused: bool = False
    fused_with: str | None = None
    fusion: str | None = None
    graph_name: str = ""
    fused_with_op: str | None = None
    residual: bool = False
    module: str = ""
    call: str = ""
    rank: int | None = None

    @property
    def label(self) -> str:
        """The graph's label, with the rank that compiled it where there are ranks."""
        label = self.graph_name or f"graph {self.graph}"
        return label if self.rank is None else f"{label}, rank {self.rank}"

    @property
    def site(self) -> str:
        """Where the call is: ``model.layers.3.mixer: copy_state_blocks#2``, or the op
        (with its number) alone in a plain function."""
        call = self.call or self.op
        return f"{self.module}: {call}" if self.module else call

    @property
    def folded(self) -> bool:
        """A copy that no longer runs: the op it was folded into reads its source rows."""
        return self.provider is None

    def _partner(self) -> str:
        """The site on the other side of a fusion, as short as it stays clear: the call
        alone when it is in this site's module."""
        other = self.fused_with or self.fused_with_op or "the op"
        if self.module and other.startswith(f"{self.module}: "):
            return other[len(self.module) + 2:]
        return other

    def __str__(self) -> str:
        partner = self._partner()
        text = f"[{self.label}] {self.site}"
        if self.folded:
            return text + f" folded into {partner}, which reads the copy's source rows"
        text += f" -> {self.provider}"
        if self.skipped:
            text += " (skipped " + "; ".join(f"{p}: {why}" for p, why in self.skipped) + ")"
        if self.fused and self.op == COPY:
            text += (f" [folded into {partner}; this copy remains for the rows of empty "
                     "sequences only]")
        elif self.fused:
            remains = ("remains for empty sequences' rows only" if self.residual
                       else "no longer runs")
            text += f" [reads the source rows of {partner}, which {remains}]"
        elif self.fusion:
            text += f" [{self.fusion}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = [list(s) for s in self.skipped]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteReport:
        data = dict(data)
        data["skipped"] = tuple(tuple(s) for s in data.get("skipped", ()))
        return cls(**data)


COPY = "copy_state_blocks"


@dataclass
class LoweringReport:
    """The call sites of every graph compiled through one compiled object, in order.

    ``name`` labels the graphs (the compiled function's name). ``print(report)`` shows
    one line per call site; :meth:`summary` groups them. A graph served from Inductor's
    cache appears with the report saved when it was compiled (``cached`` lists such
    graphs).
    """

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0
    cached: list[int] = field(default_factory=list)
    pass_seconds: float = 0.0  # in the passes (and their cache key), all graphs
    compile_seconds: float = 0.0  # in Inductor (passes included), all graphs
    name: str = ""

    def add_graph(self, sites: list[SiteReport], *, cached: bool = False) -> None:
        """Append one compiled graph's sites (``graph`` counts every graph compiled).

        Graphs are labelled by ``name``: the first graph with call sites is ``name``, the
        next ``name 1``, ``name 2``, ... (``graph 0``, ``graph 1``, ... without a name).
        Graphs without an IR call are compiled too (a graph break, code around the model)
        but neither shown nor counted in the labels, so a label does not shift with how
        a torch version splits the code around the model. Each site carries the rank of
        the process, where ``torch.distributed`` is initialised (``SiteReport.rank``)."""
        if cached:
            self.cached.append(self.graphs)
        if sites:
            shown = len({s.graph for s in self.sites})
            if self.name:
                label = self.name if shown == 0 else f"{self.name} {shown}"
            else:
                label = f"graph {shown}"
        by_site = {site.site: site for site in sites}
        rank = _process_rank()
        for site in sites:
            partner = by_site.get(site.fused_with) if site.fused_with else None
            copy = site if site.op == COPY else partner
            site = replace(
                site, graph=self.graphs, graph_name=label, rank=rank,
                fused_with_op=partner.op if partner is not None else site.fused_with_op,
                residual=site.residual or bool(
                    site.fused and copy is not None and copy.provider is not None),
            )
            self.sites.append(site)
            logger.info("lowering %s%s", site, " (from cache)" if cached else "")
        self.graphs += 1

    @classmethod
    def merged(cls, reports: Iterable[LoweringReport]) -> LoweringReport:
        """One report holding the sites of several, in order (e.g. prefill and decode)."""
        out = cls()
        reports = list(reports)
        for report in reports:
            out.sites.extend(report.sites)
            out.cached.extend(out.graphs + g for g in report.cached)
            out.graphs += report.graphs
            out.pass_seconds += report.pass_seconds
            out.compile_seconds += report.compile_seconds
        out.name = ", ".join(r.name for r in reports if r.name)
        return out

    def by_op(self, op: str) -> list[SiteReport]:
        return [s for s in self.sites if s.op == op]

    def summary(self) -> str:
        """The sites grouped: per graph, one line per op, provider and fusion outcome with
        the number of sites, and under it the reasons better-ranked providers gave.

        Where ``print(report)`` shows every site, this shows what a model's layers have in
        common (``mamba-ir demo`` prints it), e.g.::

            decode:
              causal_conv1d_update       3 site(s) -> triton
              selective_state_update     3 site(s) -> triton
                  skipped flashinfer: flashinfer is not importable (...)

        Each distinct reason a better-ranked provider gave is listed once, under its group;
        graphs come in the order they compiled. An empty report gives ``""``.
        """
        groups: dict[tuple[str, str, str, str], list[SiteReport]] = {}
        for site in self.sites:
            if site.folded:
                chosen, note = f"folded into {site.fused_with_op}", "reads the copy's source rows"
            else:
                chosen, note = str(site.provider), _fusion_note(site)
            graph = site.label
            groups.setdefault((graph, site.op, chosen, note), []).append(site)
        graphs = list(dict.fromkeys(key[0] for key in groups))
        lines: list[str] = []
        for graph in graphs:
            lines.append(f"{graph}:")
            for key in sorted(k for k in groups if k[0] == graph):
                _, op, chosen, note = key
                line = f"  {op:<24} {len(groups[key]):>3} site(s) -> {chosen}"
                lines.append(line + (f"  [{note}]" if note else ""))
                reasons = sorted({f"{p}: {why}" for s in groups[key] for p, why in s.skipped})
                lines.extend(f"      skipped {reason}" for reason in reasons)
        return "\n".join(lines)

    @property
    def fused(self) -> list[SiteReport]:
        return [s for s in self.sites if s.fused and s.provider is not None]

    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, index: int) -> SiteReport:
        return self.sites[index]

    def __str__(self) -> str:
        if not self.sites:
            return "no mamba_ir call sites compiled"
        return "\n".join(str(s) for s in self.sites)

    def __repr__(self) -> str:
        return f"<LoweringReport: {len(self.sites)} call sites in {self.graphs} graphs>\n{self}"

    def to_dicts(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.sites]


def _process_rank() -> int | None:
    """This process's rank, where ``torch.distributed`` is initialised."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _fusion_note(site: SiteReport) -> str:
    if not site.fused:
        return site.fusion or ""
    if site.op == COPY:
        return f"rest folded into {site.fused_with_op}; kept for empty sequences' rows only"
    if site.residual:
        return "reads the copy's source rows; the copy remains for empty sequences' rows"
    return "reads the copy's source rows; the copy no longer runs"
