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

    ``provider`` is ``None`` for a ``copy_state_blocks`` folded into the op that follows
    it (``fused_with`` names that op's node, ``fused_with_op`` the op). For an op,
    ``fusion`` says whether a preceding copy was folded into it, or why not. ``residual``:
    the copy was folded but stays for the rows of empty sequences (varlen calls), which
    the op does not write. ``graph_name`` is the compiled function's name (``prefill``,
    ``decode``, ...), numbered from its second graph on.
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

    @property
    def folded(self) -> bool:
        """A copy that no longer runs: the op it was folded into reads its source rows."""
        return self.provider is None

    def __str__(self) -> str:
        label = self.graph_name or f"graph {self.graph}"
        partner = f"{self.fused_with_op or 'the op'} ({self.fused_with})"
        text = f"[{label}] {self.node}: {self.op} "
        if self.folded:
            return text + f"folded into {partner}, which reads the copy's source rows"
        text += f"-> {self.provider}"
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
    one line per call site. A graph served from Inductor's cache appears with the report
    saved when it was compiled (``cached`` lists such graphs).
    """

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0
    cached: list[int] = field(default_factory=list)
    pass_seconds: float = 0.0  # in the passes (and their cache key), all graphs
    compile_seconds: float = 0.0  # in Inductor (passes included), all graphs
    name: str = ""

    def add_graph(self, sites: list[SiteReport], *, cached: bool = False) -> None:
        if cached:
            self.cached.append(self.graphs)
        label = self.name or "graph"
        label = label if self.graphs == 0 and self.name else f"{label} {self.graphs}"
        by_node = {site.node: site for site in sites}
        for site in sites:
            partner = by_node.get(site.fused_with) if site.fused_with else None
            copy = site if site.op == COPY else partner
            site = replace(
                site, graph=self.graphs, graph_name=label,
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
