"""mamba-ir: a torch.compile custom-op IR for the state-space layers of hybrid models."""

from . import ops
from .op import REGISTRY, Decision, IrOp, get_op, register_op
from .priority import ENV_VAR, NATIVE, set_priority
from .providers import load_providers

__all__ = [
    "ENV_VAR",
    "NATIVE",
    "REGISTRY",
    "Decision",
    "IrOp",
    "get_op",
    "load_providers",
    "ops",
    "register_op",
    "set_priority",
]

load_providers()
