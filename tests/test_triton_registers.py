"""The chunk-scan kernels fit their register caps without spilling at Mamba2 size.

Only ptxas sees spills, and only the GPU sees what they cost (one spilling branch of the
chunk-state kernel slowed calls of one-chunk sequences by 5-12 % on an H100): this runs
``registers_sm90.py`` (sm_90 compile without a GPU, ``ptxas -v``) in CI. The GPU's Triton
may allocate differently; the benchmark's GPU run is the final word on speed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

CAP = 128  # Config.scan_maxnreg and Config.state_maxnreg


def test_no_spills_at_mamba2_size() -> None:
    from compile_sm90 import run

    usage = run("registers_sm90.py")
    assert set(usage) == {"gated", "no-z"}
    for form, kernels in usage.items():
        assert {"chunk_state_kernel", "chunk_scan_kernel"} <= set(kernels), form
        for name, (registers, spill_stores, spill_loads) in kernels.items():
            assert spill_stores == spill_loads == 0, (form, name, spill_stores, spill_loads)
            if name in ("chunk_state_kernel", "chunk_scan_kernel"):
                assert registers <= CAP, (form, name, registers)
