"""Entry points: :func:`compile`, the :class:`Backend` it uses, and ways to install the
passes into a torch.compile setup of one's own (:func:`inductor_options`,
:func:`use_passes`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx

from mamba_ir.priority import PrioritySpec, checked_priority

from .callsite import ir_ops
from .graph_pass import LoweringPass
from .report import LoweringReport, SiteReport

POST_GRAD_PASS = "post_grad_custom_post_pass"
logger = logging.getLogger("mamba_ir")


class Backend:
    """A ``torch.compile`` backend: Inductor with align fusion and lowering installed.

    ``torch.compile(model, backend=Backend(priority=...))``; ``mode`` and ``options`` are
    Inductor's (also accepted from ``torch.compile``). ``report`` collects the call sites
    of every graph this backend compiles. A graph served from Inductor's cache did not run
    the passes: its report is the one saved beside the cache when it was compiled.
    ``validate`` turns on the checked mode (see :func:`compile`).
    """

    def __init__(
        self,
        priority: PrioritySpec = None,
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
        dynamic: bool | None = None,
        validate: bool = False,
    ) -> None:
        checked_priority(priority, "priority")
        self.priority = priority
        self.validate = bool(validate)
        self.mode = mode
        self.options = dict(options or {})
        self.dynamic = dynamic
        self.report = LoweringReport()

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Any:
        from torch._inductor.compile_fx import compile_fx

        patches = self._patches(mode, options)
        ran: list[list[SiteReport]] = []
        graph_pass = LoweringPass(
            self.priority, ran.append, then=_installed(patches), validate=self.validate
        )
        patches[POST_GRAD_PASS] = graph_pass
        start = time.perf_counter()
        saved = _SavedReports(graph_pass, gm, example_inputs, patches)
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        self.report.compile_seconds += time.perf_counter() - start
        self.report.pass_seconds += graph_pass.seconds
        if ran:
            sites = [site for graph in ran for site in graph]
            saved.store(sites)
            self.report.add_graph(sites)
        elif _calls_ir(gm):
            sites = saved.load()
            if not sites:
                logger.info("graph %d came from Inductor's cache without a saved report",
                            self.report.graphs)
            self.report.add_graph(sites, cached=True)
        else:
            self.report.add_graph([])
        return compiled

    def _patches(self, mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
        from torch._inductor import list_mode_options

        patches: dict[str, Any] = {}
        mode = mode or self.mode
        if mode and mode != "default":
            patches.update(list_mode_options(mode, self.dynamic))
        patches.update(self.options)
        patches.update(options or {})
        return patches

    def reset(self) -> None:
        """Drop CUDA graph trees when they are in use (what Inductor's own backend does)."""
        from torch._inductor import config

        if self._patches(None, None).get("triton.cudagraphs", config.triton.cudagraphs):
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()


def compile(
    model_or_fn: Any,
    priority: PrioritySpec = None,
    *,
    validate: bool = False,
    **torch_compile_kwargs: Any,
) -> Any:
    """``torch.compile`` with every IR call site lowered to its provider, align copies
    folded where the chosen provider reads from a source row.

    ``priority`` orders the providers while compiling (as :func:`mamba_ir.set_priority`;
    otherwise the priority in effect when a graph compiles applies). ``validate`` is the
    checked mode: every call site first asserts, on the device and without a host sync,
    what eager calls check on the host (index ranges, offsets, the row rules), so a bad
    index fails loudly instead of writing the wrong rows; off by default (it costs a few
    small kernels per call, docs/passes.md). Other keyword
    arguments go to ``torch.compile`` (``mode`` and ``options`` to Inductor). The result
    carries ``lowering_report`` (a :class:`LoweringReport`), filled as graphs compile.
    """
    kwargs = dict(torch_compile_kwargs)
    if "backend" in kwargs:
        raise TypeError("mamba_ir.compile always uses Inductor; pass Backend() to "
                        "torch.compile to combine the passes with another setup")
    backend = Backend(
        priority,
        mode=kwargs.pop("mode", None),
        options=kwargs.pop("options", None),
        dynamic=kwargs.get("dynamic"),
        validate=validate,
    )
    # graphs are labelled with the function's name (a bound method's: prefill, decode)
    backend.report.name = getattr(model_or_fn, "__name__", type(model_or_fn).__name__)
    compiled = torch.compile(model_or_fn, backend=backend, **kwargs)
    # on the wrapper itself: an OptimizedModule would hand a plain setattr to the model
    object.__setattr__(compiled, "lowering_report", backend.report)
    return compiled


def inductor_options(
    priority: PrioritySpec = None, report: LoweringReport | None = None, *, validate: bool = False
) -> dict[str, Any]:
    """Inductor options installing the passes: ``torch.compile(m, options=...)``.

    Any other post-grad pass already configured runs first. Site reports go to ``report``
    (graphs served from Inductor's cache run no pass and add nothing there).
    """
    on_graph = report.add_graph if report is not None else None
    return {
        POST_GRAD_PASS: LoweringPass(priority, on_graph, then=_installed({}), validate=validate)
    }


@contextlib.contextmanager
def use_passes(priority: PrioritySpec = None, *, validate: bool = False
               ) -> Iterator[LoweringReport]:
    """Within the block, every Inductor compile runs the passes; yields their report."""
    from torch._inductor import config

    report = LoweringReport()
    with config.patch(inductor_options(priority, report, validate=validate)):
        yield report


def _installed(patches: dict[str, Any]) -> Any:
    """The post-grad pass configured so far, to run before ours (not an earlier copy of
    ours: lowering twice would leave the second with nothing to do and nothing to report)."""
    from torch._inductor import config

    existing = patches.get(POST_GRAD_PASS, getattr(config, POST_GRAD_PASS))
    return None if isinstance(existing, LoweringPass) else existing


def _calls_ir(gm: fx.GraphModule) -> bool:
    targets = ir_ops()
    return any(node.target in targets for node in gm.graph.nodes)


class _SavedReports:
    """A graph's site reports saved beside Inductor's cache, under the key Inductor's
    caches look the graph up by (AOTAutograd's cache key, which covers the graph, its
    inputs as the cache sees them, symbolic sizes included, and the Inductor config with
    this pass's uuid): a hit at another batch size of a dynamic graph finds its report."""

    def __init__(self, graph_pass: LoweringPass, gm: fx.GraphModule, inputs: list[Any],
                 patches: dict[str, Any]) -> None:
        self.path = None
        uuid = graph_pass.uuid()
        key = _inductor_key(gm, inputs, patches) if uuid is not None else None
        if key is not None:
            digest = hashlib.sha256(f"{uuid}\n{key}".encode()).hexdigest()
            self.path = _report_dir() / f"{digest}.json"

    def store(self, sites: list[SiteReport]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps([s.to_dict() for s in sites]))
        except OSError:
            pass  # a report that cannot be saved is rebuilt on the next cache miss

    def load(self) -> list[SiteReport]:
        if self.path is None:
            return []
        try:
            return [SiteReport.from_dict(d) for d in json.loads(self.path.read_text())]
        except (OSError, TypeError, AttributeError, ValueError):
            return []


def _inductor_key(gm: fx.GraphModule, inputs: list[Any], patches: dict[str, Any]) -> str | None:
    """The key AOTAutograd's cache gives this graph under ``patches``; on a torch without
    ``autograd_cache_key`` (before 2.12), the Dynamo graph with its inputs' metadata as
    the graph holds them (symbolic sizes, not the example batch). None where neither can
    be had: then nothing is saved."""
    from torch._inductor import config

    try:
        from torch._inductor.compile_fx import autograd_cache_key
    except ImportError:
        return _graph_key(gm)
    try:
        with config.patch(patches):
            key = autograd_cache_key(gm, inputs, ignore_shape_env=False)
    except Exception as exc:  # a graph AOTAutograd's cache does not take
        logger.debug("no cache key for the lowering report: %s", exc)
        return None
    return key[0] if isinstance(key, tuple) else str(key)


def _graph_key(gm: fx.GraphModule) -> str:
    metas = []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            metas.append((tuple(map(str, value.shape)), tuple(map(str, value.stride())),
                          str(value.dtype), str(value.device)))
        else:
            metas.append(repr(value))
    return _canonical_symbols(f"{gm.code}\n{metas}")


def _canonical_symbols(text: str) -> str:
    """Size symbols renamed in order of appearance: their numbers depend on how many were
    created before in the process, which Inductor's cache key does not see either."""
    names: dict[str, str] = {}
    return re.sub(r"\b[su]\d+\b", lambda m: names.setdefault(m[0], f"{m[0][0]}#{len(names)}"),
                  text)


def _report_dir() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # torch < 2.7
        from torch._inductor.runtime.runtime_utils import cache_dir
    return Path(cache_dir()) / "mamba_ir_reports"
