"""Loading providers: the built-in ones, then any installed package's ``mamba_ir.providers``
entry point (a module or callable that registers its implementations on import)."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

logger = logging.getLogger("mamba_ir")

BUILTIN = ("mamba_ir.impls.triton", "mamba_ir.impls.flashinfer")
ENTRY_POINT_GROUP = "mamba_ir.providers"


def load_providers() -> list[str]:
    """Import every provider module once; return the names of those that loaded."""
    loaded = []
    for module in BUILTIN:
        importlib.import_module(module)
        loaded.append(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
        except Exception as exc:  # a broken third-party provider must not break the IR
            logger.warning("provider entry point %s failed to load: %s", ep.name, exc)
            continue
        if callable(target):
            target()
        loaded.append(ep.name)
    return loaded
