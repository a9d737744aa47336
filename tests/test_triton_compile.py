"""Every Triton kernel compiles for an H100 (sm_90) on this machine, GPU or not.

The CPU tests run the kernels in Triton's interpreter, which executes them as Python and so
accepts code the compiler rejects. ``compile_sm90.py`` compiles each provider's kernels to
a cubin in a fresh process (Triton reads ``TRITON_INTERPRET`` when a kernel is defined).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

# every kernel of every launch form the script runs (a kernel missing here is one the
# script no longer reaches)
KERNELS = {
    "selective_state_update": ["ssu_kernel"],
    "mamba_chunk_scan": ["chunk_dt_kernel", "chunk_plan_kernel", "chunk_scan_kernel",
                         "chunk_state_kernel", "state_pass_kernel"],
    "selective_scan": ["scan_kernel"],
    "causal_conv1d_fn": ["final_window_kernel", "stream_kernel", "tile_kernel"],
    "causal_conv1d_update": ["update_kernel"],
    "copy_state_blocks": ["copy_rows_kernel"],
    "replay_state_update": ["replay_kernel"],
    "selective_state_update (stored states)": ["ssu_kernel"],
    "flashinfer index preparation": ["_prepare_kernel"],
}


def test_every_kernel_compiles_for_sm90() -> None:
    from compile_sm90 import run

    assert run("compile_sm90.py") == KERNELS
