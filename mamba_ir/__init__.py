"""mamba-ir: a torch.compile custom-op IR for the state-space layers of hybrid models."""

from importlib.metadata import PackageNotFoundError, version

from . import ops
from .op import REGISTRY, Decision, IrOp, get_op, register_op
from .priority import ENV_VAR, NATIVE, set_priority
from .providers import load_providers

try:
    __version__ = version("mamba-ir")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "ENV_VAR",
    "compile",
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


def __getattr__(name: str):
    # The passes import Inductor, which is slow: load them on first use.
    if name == "compile":
        from .passes import compile

        return compile
    raise AttributeError(f"module 'mamba_ir' has no attribute {name!r}")
