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


# Known defects of a provider (its case in the report -> what is wrong), each held by a
# strict xfail below, so the case stops being skipped when the defect is fixed
DEFECTS = {
    "replay_state_update ring-len-negative": (
        "Triton replay_state_update, in place, a source ring_len in [-2**15, 0): the length "
        "is read and clamped to 0 as native does, but the new length is never written: the "
        "ticket count `ticket >> TICKETS_AT` (impls/triton/_replay_kernel.py, `last = ...`) "
        "takes the sign-extended length's high bits as -1 tickets, so no program draws the "
        "last ticket; the row keeps the length plus 2**16 per program (-1 -> 131071 in this "
        "call; native writes 1). Counting `(ticket - low16(ticket)) >> 16` fixes it"),
}


def _known(report: dict[str, str | None]) -> dict[str, str | None]:
    return {k: v for k, v in report.items() if k not in DEFECTS}


@pytest.mark.parametrize("ops", GROUPS)
def test_triton(ops: str) -> None:
    pytest.importorskip("triton")
    report = _known(_subprocess(ops, "triton"))
    assert report == dict.fromkeys(report), report


@pytest.mark.xfail(strict=True, reason=DEFECTS["replay_state_update ring-len-negative"])
def test_triton_in_place_negative_ring_len() -> None:
    """In this process: the case writes nothing outside the tensors (``test_triton``)."""
    pytest.importorskip("triton")
    op = "replay_state_update"
    case = next(c for c in cases(op, 3, LENGTHS) if c.name == "ring-len-negative")
    assert run_case(op, "triton", case) is None


@pytest.mark.gpu
@pytest.mark.parametrize("ops", GROUPS)
def test_triton_full_size_gpu(ops: str) -> None:
    """Mamba2 sizes (bf16), compiled kernels: sequences of several 256-token chunks."""
    report = _known(_subprocess(ops, "triton", "cuda"))
    assert report == dict.fromkeys(report), report
