"""The lowering report: what every IR call site of a compiled graph became, and why."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("mamba_ir")


@dataclass(frozen=True)
class SiteReport:
    """One call site: the provider chosen, those skipped with their reasons, and fusion.

    ``provider`` is ``None`` for a ``copy_state_blocks`` folded into the op that follows
    it (``fused_into`` names that op's node). For an op, ``fusion`` says whether a
    preceding copy was folded into it, or why not.
    """

    graph: int
    node: str
    op: str
    provider: str | None
    skipped: tuple[tuple[str, str], ...] = ()
    fused: bool = False
    fused_with: str | None = None
    fusion: str | None = None

    def __str__(self) -> str:
        chosen = f"-> {self.provider}" if self.provider else f"folded into {self.fused_with}"
        text = f"[graph {self.graph}] {self.node}: {self.op} {chosen}"
        if self.skipped:
            text += " (skipped " + "; ".join(f"{p}: {why}" for p, why in self.skipped) + ")"
        if self.fusion:
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


@dataclass
class LoweringReport:
    """The call sites of every graph compiled through one compiled object, in order.

    A graph served from Inductor's cache appears with the report saved when it was
    compiled (``cached`` lists such graphs).
    """

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0
    cached: list[int] = field(default_factory=list)
    pass_seconds: float = 0.0  # in the passes (and their cache key), all graphs
    compile_seconds: float = 0.0  # in Inductor (passes included), all graphs

    def add_graph(self, sites: list[SiteReport], *, cached: bool = False) -> None:
        if cached:
            self.cached.append(self.graphs)
        for site in sites:
            site = SiteReport(**{**site.__dict__, "graph": self.graphs})
            self.sites.append(site)
            logger.info("lowering %s%s", site, " (from cache)" if cached else "")
        self.graphs += 1

    def by_op(self, op: str) -> list[SiteReport]:
        return [s for s in self.sites if s.op == op]

    @property
    def fused(self) -> list[SiteReport]:
        return [s for s in self.sites if s.fused and s.provider is not None]

    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        if not self.sites:
            return "no mamba_ir call sites compiled"
        return "\n".join(str(s) for s in self.sites)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.sites]
