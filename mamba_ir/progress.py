"""Progress bars for the CLI and the benchmarks: tqdm on a terminal, nothing in a log.

A bar redraws itself with carriage returns, which a log file or a pipe keeps as one long
line of frames; so bars are drawn only when both stdout and stderr are terminals (the
report lines on stdout say what was done either way).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def interactive() -> bool:
    """Whether stdout and stderr are both terminals."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, disabled unless :func:`interactive`."""
    sys.stdout.flush()  # lines printed so far come before the bar
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not interactive(), dynamic_ncols=True, **kwargs)
