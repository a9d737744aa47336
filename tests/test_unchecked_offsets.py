"""Unchecked sequence offsets (what a graph compiled with the passes hands a provider):
past the tokens, negative, int32's maximum, decreasing, negative or huge computed-token
counts, too few checkpoint columns; for the replay ops, row indices past the rows,
negative or overlapping, and ring lengths below 0, past the ring or huge. No provider
raises or touches memory outside its tensors (each runs with its state, output and inputs
in the middle of NaN-filled buffers); where the values clamped (offsets to ``[0, tokens]``,
ring lengths to ``[0, ring]``, a row outside the state to a pad) still describe a valid
call, every provider gives native's result on that (docs/ops.md, "Compiled calls").

Triton runs in a subprocess (``tests/unchecked_offsets.py``): an access outside a tensor
can corrupt the interpreter's heap or the GPU context, and must fail the test, not the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from unchecked_offsets import LENGTHS, OPS, cases, run_case

SCRIPT = Path(__file__).with_name("unchecked_offsets.py")


# the Triton ops in two subprocesses of about equal interpreter time (each pays the imports)
GROUPS = ["mamba_chunk_scan,causal_conv1d_update",
          "selective_state_update,causal_conv1d_fn,selective_scan",
          "replay_state_update,replay_materialize"]


def _subprocess(ops: str, provider: str, *flags: str) -> dict[str, str | None]:
    # one thread: the interpreter is Python, and CI's two cores run two test workers
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), ops, provider, *flags],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{ops} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op", OPS)
def test_native(op: str) -> None:
    report = {c.name: run_case(op, "native", c) for c in cases(op, sum(LENGTHS), LENGTHS)}
    assert report == dict.fromkeys(report), report


def test_groups_cover_every_op() -> None:
    assert sorted(",".join(GROUPS).split(",")) == OPS


@pytest.mark.parametrize("ops", GROUPS)
def test_triton(ops: str) -> None:
    pytest.importorskip("triton")
    report = _subprocess(ops, "triton")
    assert report == dict.fromkeys(report), report


def test_triton_in_place_negative_ring_len() -> None:
    """In place, a negative source length is clamped to 0 and the new length written over
    the tickets: the sign bits of the length are not tickets (they once kept every
    program from drawing the last one, and the length was never written)."""
    pytest.importorskip("triton")
    op = "replay_state_update"
    case = next(c for c in cases(op, 3, LENGTHS) if c.name == "ring-len-negative")
    assert run_case(op, "triton", case) is None


@pytest.mark.gpu
@pytest.mark.parametrize("ops", GROUPS)
def test_triton_full_size_gpu(ops: str) -> None:
    """Mamba2 sizes (bf16), compiled kernels: sequences of several 256-token chunks."""
    report = _subprocess(ops, "triton", "cuda")
    assert report == dict.fromkeys(report), report
