"""Shared benchmark plumbing: timing, the copy-rate roof, GPU time by kernel, progress,
JSON and plots.

Every benchmark measures a plain device-to-device copy of the same number of bytes in the
same run, so achieved bandwidth is always reported against a roof measured on that GPU.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
T = TypeVar("T")


def time_us(fn: Callable[[], Any], *, graph: bool = True, reps: int = 100) -> float:
    """Median time of one ``fn()`` in microseconds.

    With ``graph`` the call is captured in a CUDA graph and replayed, which removes launch
    gaps (how a serving engine runs decode); ``fn`` must then be graph-safe.
    """
    from triton.testing import do_bench

    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    run = capture(fn).replay if graph else fn
    ms = do_bench(run, warmup=25, rep=reps, return_mode="median")
    return ms * 1e3


def capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after one run on a side stream (as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copy_rate(nbytes: int, *, device: str = "cuda") -> float:
    """Bytes/s (read + written) of a device-to-device copy of ``nbytes``; the roof."""
    nbytes = max(nbytes, 1 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6)


def kernel_copy_rate(nbytes: int, *, device: str = "cuda") -> float:
    """Bytes/s (read + written) of an elementwise copy kernel over ``nbytes``.

    The second roof: on some sizes a memcpy runs slower than a kernel can stream the same
    bytes (seen on an H100 from 512 MiB: 2.4 against 3.0 TB/s), and a kernel is what we
    compare with a kernel.
    """
    src = torch.randn(max(nbytes, 1 << 20) // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    us = time_us(lambda: torch.neg(src, out=dst))
    return 2 * src.numel() * 2 / (us * 1e-6)


def roof_rate(nbytes: int, *, device: str = "cuda") -> dict[str, float]:
    """Both copy roofs for ``nbytes`` and the better of the two, in bytes/s."""
    memcpy, kernel = copy_rate(nbytes, device=device), kernel_copy_rate(nbytes, device=device)
    return {"memcpy": memcpy, "kernel": kernel, "roof": max(memcpy, kernel)}


def kernel_times(fn: Callable[[], Any], reps: int = 1) -> dict[str, float]:
    """GPU time of one ``fn()`` per kernel name (us, mean over ``reps`` calls), from the
    profiler: where a step's time goes, beside the wall time :func:`time_us` gives."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type == DeviceType.CUDA and evt.self_device_time_total > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + evt.self_device_time_total / reps
    return kernels


Categories = Sequence[tuple[str, Sequence[str]]]


def by_category(kernels: dict[str, float], categories: Categories) -> dict[str, float]:
    """Kernel times summed per category: the first whose name fragments occur in the
    kernel's name (lower case), else ``other``; every category present, zeros included."""
    out = {name: 0.0 for name, _ in categories} | {"other": 0.0}
    for kernel, t in kernels.items():
        low = kernel.lower()
        out[next((c for c, keys in categories if any(k in low for k in keys)), "other")] += t
    return out


def top(kernels: dict[str, float], n: int) -> dict[str, float]:
    """The ``n`` kernels that take the most time, slowest first."""
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:n])


def environment() -> dict[str, Any]:
    """Where and when a result was measured."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while a progress bar runs on a terminal (:mod:`mamba_ir.progress`)."""
    from mamba_ir.progress import bar

    with bar(total if total is not None else _length(items), desc, unit="case") as b:
        for item in items:
            yield item
            b.update(1)


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def write_json(name: str, payload: dict[str, Any], directory: Path = DOCS) -> Path:
    """Write ``payload`` plus the environment to ``directory/name``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def plot_series(
    path: Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    roof: Sequence[float] | None = None,
    roof_label: str = "device-to-device copy",
    logx: bool = True,
) -> Path:
    """Line plot of several series against ``x``, with the measured roof dashed."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    if roof is not None:
        ax.plot(x, roof, linestyle="--", color="black", label=roof_label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing into files only (no display needed); ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """``rows`` as fixed-width text: one column per ``(key, title, format)``, ``-`` where
    a row has no such key."""
    head = " ".join(f"{title:>{len(fmt.format(0))}}" for _, title, fmt in columns)
    lines = [head]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            width = len(fmt.format(0))
            cells.append(fmt.format(row[key]) if key in row else f"{'-':>{width}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot_or_hint(plot: Callable[[Path], Path], path: Path, later: str = "--plot-only") -> None:
    """Draw the plot of the results in ``path``, or say how to draw it later (``later``:
    the option that redraws it from the JSON)."""
    try:
        print(f"wrote {plot(path)}")
    except ImportError:
        print(f"matplotlib missing: plot later with {later} (pip install 'mamba-ir[plot]')")
