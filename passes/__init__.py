"""Inductor graph passes: align-copy fusion and lowering of IR ops to their providers.

``mamba_ir.passes.compile(model)`` is ``torch.compile`` with the passes installed;
``Backend``, ``inductor_options`` and ``use_passes`` add them to a setup of one's own.
See docs/passes.md.
"""

from mamba_ir.op import Redirect

from .compile import Backend, compile, inductor_options, use_passes
from .graph_pass import LoweringPass
from .provider_ops import provider_op
from .report import LoweringReport, SiteReport

__all__ = [
    "Backend",
    "LoweringPass",
    "LoweringReport",
    "Redirect",
    "SiteReport",
    "compile",
    "inductor_options",
    "provider_op",
    "use_passes",
]
