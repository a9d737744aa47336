"""The Inductor post-grad pass that runs align fusion and lowering.

Installed as ``torch._inductor.config.post_grad_custom_post_pass``: it runs on the
functionalized graph after Inductor's own post-grad passes and before re-inplacing.
Its ``uuid`` keys Inductor's FX graph cache: it covers this package's source, every
registered implementation and the priority in effect, so a cached graph is reused
exactly when the passes would lower it the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from mamba_ir.op import REGISTRY
from mamba_ir.priority import PrioritySpec, checked_priority

from . import lowering
from .provider_ops import define_all
from .report import SiteReport

_SOURCES = tuple(sorted(Path(__file__).parent.glob("*.py")))


class LoweringPass(CustomGraphPass):
    """Align fusion + lowering for one compile setup.

    ``priority`` (as :func:`mamba_ir.set_priority` takes it) is handed to every decision
    and comes before the priority in effect when a graph compiles; ``on_graph`` receives
    each graph's site reports. ``then`` is a pass that was installed before (run first,
    its uuid folded into ours). ``validate`` lowers every call site to the checked
    provider op (device-side index checks before the provider).
    """

    def __init__(
        self,
        priority: PrioritySpec = None,
        on_graph: Callable[[list[SiteReport]], None] | None = None,
        then: Any = None,
        *,
        validate: bool = False,
    ) -> None:
        # a misspelt name fails here, not silently later
        self.priority = None if priority is None else checked_priority(priority, "priority")
        self.validate = bool(validate)
        self.on_graph = on_graph
        self.then = tuple(then) if isinstance(then, (list, tuple)) else (then,) if then else ()
        self.seconds = 0.0  # time spent in this pass (uuid included), for the report

    def __call__(self, graph: fx.Graph) -> None:
        for earlier in self.then:
            earlier(graph)
        start = time.perf_counter()
        reports = lowering.run(graph, priority=self.priority, validate=self.validate)
        self.seconds += time.perf_counter() - start
        if self.on_graph is not None:
            self.on_graph(reports)

    def uuid(self) -> str | None:
        # The cache key is taken right before the cache lookup: a hit loads code naming
        # provider ops without running the pass, so define them all here.
        start = time.perf_counter()
        define_all()
        digest = hashlib.sha256()
        for path in _SOURCES:
            digest.update(path.read_bytes())
        digest.update(f"validate={self.validate}".encode())
        digest.update(registry_fingerprint(self.priority).encode())
        for earlier in self.then:
            if not hasattr(earlier, "uuid"):
                return None  # a plain function cannot be keyed: Inductor skips its cache
            digest.update(repr(earlier.uuid()).encode())
        self.seconds += time.perf_counter() - start
        return digest.hexdigest()


def registry_fingerprint(priority: PrioritySpec = None) -> str:
    """Everything the lowering of a graph depends on besides the graph: each op's
    implementations (with their source) and its priority for every known device, under
    ``priority`` (the pass's own) and the priority in effect."""
    devices = sorted({"cpu", "cuda"} | {p for op in REGISTRY.values() for i in op.impls.values()
                                         for p in i.platforms})
    parts = []
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        for provider, impl in sorted(op.impls.items()):
            parts.append(f"{name}:{provider}:{_identity(impl.fn)}:{_identity(impl.supports)}")
        for device in devices:
            order = op.priority(device, priority=priority)
            parts.append(f"{name}@{device}={','.join(order)}")
    return "\n".join(parts)


def _identity(fn: Callable[..., Any] | None) -> str:
    if fn is None:
        return "-"
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    try:
        source = Path(inspect.getsourcefile(fn) or "").read_bytes()
    except (OSError, TypeError):
        source = b""
    return f"{name}#{hashlib.sha256(source).hexdigest()[:16]}"
