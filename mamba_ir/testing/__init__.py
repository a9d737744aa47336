"""Property-based checking of provider implementations against the native ops.

>>> from mamba_ir.testing import check_impl
>>> check_impl("copy_state_blocks", "native", max_examples=5)  # doctest: +SKIP
"""

from .check import assert_matches_native, check_impl, touched_rows
from .describe import describe_call, describe_tensor
from .strategies import SMALL, Sizes, assign_rows, calls
from .tolerances import TOLERANCES, result_tolerance, tolerance

__all__ = [
    "SMALL",
    "TOLERANCES",
    "Sizes",
    "assert_matches_native",
    "assign_rows",
    "calls",
    "check_impl",
    "describe_call",
    "describe_tensor",
    "result_tolerance",
    "tolerance",
    "touched_rows",
]
