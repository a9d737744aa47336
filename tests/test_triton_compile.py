"""Every Triton kernel compiles for an H100 (sm_90) on this machine, GPU or not.

The CPU tests run the kernels in Triton's interpreter, which executes them as Python and so
accepts code the compiler rejects. ``compile_sm90.py`` compiles each provider's kernels to
a cubin in a fresh process (Triton reads ``TRITON_INTERPRET`` when a kernel is defined).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# every kernel of every launch form the script runs (a kernel missing here is one the
# script no longer reaches)
KERNELS = {
    "selective_state_update": ["ssu_kernel"],
    "mamba_chunk_scan": ["chunk_cb_kernel", "chunk_dt_kernel", "chunk_plan_kernel",
                         "chunk_scan_kernel", "chunk_state_kernel", "state_pass_kernel"],
    "selective_scan": ["scan_kernel"],
    "causal_conv1d_fn": ["final_window_kernel", "stream_kernel", "tile_kernel"],
    "causal_conv1d_update": ["update_kernel"],
    "copy_state_blocks": ["copy_rows_kernel"],
}


def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, said explicitly
    script = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == KERNELS
