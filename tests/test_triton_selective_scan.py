"""Triton selective_scan (Mamba1 prefill) against the native op.

On CPU the kernel runs in Triton's interpreter on the hypothesis strategy's small shapes
(varlen with empty and one-token sequences, pads, src redirect, checkpoints, every layout);
a second provider with tiny tiles puts chunk ends, channel blocks that straddle groups and
block boundaries at chunk ends into those shapes. The ``gpu`` tests repeat this at
Falcon-Mamba / Jamba size (dim 8192, dstate 16). ``check_impl`` asserts agreement, that
rows the call does not write are bit-identical, and that no unaddressed row is read.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mamba_ir import get_op
from mamba_ir.testing import Sizes, assert_matches_native, check_impl

pytest.importorskip("triton")

from mamba_ir.impls.triton.selective_scan import (  # noqa: E402
    Config,
    default_config,
    supports,
)
from mamba_ir.impls.triton.selective_scan import selective_scan as triton_scan  # noqa: E402

OP = get_op("selective_scan")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU


@pytest.fixture
def tiny_tiles():
    """The Triton op under 4-channel blocks and 4-token chunks, as its own provider."""
    name = "triton-tiny-tiles"
    OP.register_impl(name, functools.partial(triton_scan, config=Config(4, 4, 1)),
                     supports=supports, platforms=("cpu", "cuda"))
    yield name
    del OP.impls[name]


def test_matches_native():
    assert check_impl(OP, "triton", device=DEVICE, max_examples=40) >= 30


def test_matches_native_in_tiny_tiles(tiny_tiles):
    sizes = Sizes(max_seqs=3, max_channels=16, max_scan_tokens=14)
    assert check_impl(OP, tiny_tiles, device=DEVICE, sizes=sizes, max_examples=15) >= 10


def _call(device=DEVICE, *, dim=6, dstate=4, lengths=(5, 0, 1, 9), ngroups=2, block_size=3,
          in_dtype=torch.float32, state_dtype=torch.float32, seed=0):
    """Sequence 0 reads a shared prefix row, 1 is empty, 2 starts from zeros (pad source),
    3 runs in place; every non-empty sequence writes checkpoints at each block boundary."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    ntok, nseq = sum(lengths), len(lengths)
    done = [2, 0, 7, 4][:nseq] + [0] * max(0, nseq - 4)
    ncols = 0
    if block_size:
        crossed = zip(done, lengths, strict=True)
        ncols = max((d + n) // block_size - d // block_size for d, n in crossed)
    slots = 2 + nseq * (1 + ncols)
    dst = list(range(2, 2 + nseq))
    ckpt = [[2 + nseq + b * ncols + j for j in range(ncols)] for b in range(nseq)]
    proj = rand(ntok, 2 * dim + 1, dtype=in_dtype)[:, 1:]  # vLLM's transposed projections
    params = rand(ntok, dim + 2 * ngroups * dstate, dtype=in_dtype)
    u, z = proj[:, :dim].t(), proj[:, dim:].t()
    delta, b, c = params.split([dim, ngroups * dstate, ngroups * dstate], dim=1)

    def idx(v):
        return torch.tensor(v, device=device)

    return OP.bind(
        u, rand(slots, dim, dstate, dtype=state_dtype), delta.t(), -rand(dim, dstate).exp(),
        b.t().unflatten(0, (ngroups, dstate)), c.t().unflatten(0, (ngroups, dstate)),
        rand(dim), z, rand(dim), True,
        query_start_loc=idx([0, *torch.tensor(lengths).cumsum(0).tolist()]),
        cache_indices=idx(dst), has_initial_state=idx([True, True, True, True][:nseq]),
        block_size=block_size,
        src_cache_indices=idx(([0, 1, -1] + dst[3:])[:nseq]),
        num_computed_tokens=idx(done),
        checkpoint_state_indices=idx(ckpt) if block_size else None,
    )


@pytest.mark.parametrize("dim", [6, 8])
def test_redirect_checkpoints_and_groups(tiny_tiles, dim):
    # 2 groups: of 3 channels, so 4-channel blocks straddle them, or of 4, one block each;
    # 4-token chunks put block boundaries at and inside chunk ends
    assert_matches_native(OP, tiny_tiles, _call(dim=dim))
    assert_matches_native(OP, "triton", _call(dim=dim))


def test_unchecked_rows_and_tokens_outside_the_call_are_not_touched():
    # what a compiled (unchecked) call may pass: -2 is not row slots-2, row `slots` does
    # not exist, the last offset is past the tokens, too few checkpoint columns; index
    # tensors longer than the sequences
    call = _call()
    call["checkpoint_state_indices"] = call["checkpoint_state_indices"][:, :1]  # too few
    slots = call["ssm_states"].shape[0]
    call["src_cache_indices"] = torch.tensor([-2, 1, slots, 5, 7, 7], device=DEVICE)
    call["cache_indices"] = torch.tensor([2, 3, slots + 1, 5, 9, 9], device=DEVICE)
    call["query_start_loc"] = torch.tensor([0, 5, 5, 6, 18], device=DEVICE)  # past the tokens
    call["out"] = torch.empty_like(call["u"])
    ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    before = call["ssm_states"].clone()
    OP.native(**ref)
    triton_scan(**call)
    torch.testing.assert_close(call["out"], ref["out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(call["ssm_states"], ref["ssm_states"], atol=1e-4, rtol=1e-4)
    # sequence 1 is empty; sequences 0 and 3 store their first checkpoint only
    stored = [2, 5, *call["checkpoint_state_indices"][:, 0].tolist()]
    kept = [r for r in range(slots) if r not in stored]
    assert torch.equal(call["ssm_states"][kept], before[kept])


def test_device_checks():
    # on CPU: a failed torch._assert_async on a GPU is a device-side assert
    good = _call("cpu")
    OP.device_check(good)
    bad = _call("cpu")
    bad["checkpoint_state_indices"][3, 0] = bad["cache_indices"][0]  # written twice
    with pytest.raises(RuntimeError, match="distinct destination rows"):
        OP.device_check(bad)
    bad = _call("cpu")
    bad["src_cache_indices"][0] = bad["checkpoint_state_indices"][3, 1]  # another's checkpoint
    with pytest.raises(RuntimeError, match="another entry writes"):
        OP.device_check(bad)


def test_device_checks_pass_valid_drawn_calls():
    from hypothesis import given, settings

    from mamba_ir.testing import calls

    @settings(max_examples=40, deadline=None)
    @given(calls("selective_scan"))
    def run(call):
        call = OP.bind(**call)
        OP.check(call)
        OP.device_check(call)

    run()


def test_benchmark_compares_like_with_like():
    # benchmarks/selective_scan.py times the op against the multi-token SSU on the same
    # tensors: both must compute the same outputs and states
    bench = pytest.importorskip("benchmarks.selective_scan")
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as ssu

    call = bench.make_call(10, 2, dim=8, dstate=4, device=DEVICE)
    other = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    triton_scan(**call)
    ssu(**bench.ssu_args(other))
    for name in ("out", "ssm_states"):
        torch.testing.assert_close(call[name].float(), other[name].float(), atol=2e-2,
                                   rtol=1.6e-2)


def test_refuses_wide_state_with_reason():
    call = _call(dim=2, dstate=512, lengths=(2,), ngroups=1, block_size=0)
    assert "dstate=512" in supports(**call)
    call = _call(dim=2, dstate=0, lengths=(2,), ngroups=1, block_size=0)
    assert "dstate=0" in supports(**call)


def test_default_config_fills_a_tile():
    cfg = default_config(8192, 16)
    assert cfg.block_d * 16 * cfg.block_t == 4096


@pytest.mark.gpu
def test_gpu_matches_native_hypothesis():
    # the native op walks tokens one by one: a few dozen calls keep this under a minute
    sizes = Sizes(max_seqs=8, max_channels=512, max_scan_tokens=120, dstates=(1, 16, 64, 256))
    check_impl(OP, "triton", device="cuda", sizes=sizes, max_examples=25)


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)])
def test_gpu_full_size(dtypes):
    # Falcon-Mamba-7B / Jamba mixer: d_inner 8192, dstate 16, one group
    in_dtype, state_dtype = dtypes
    call = _call("cuda", dim=8192, dstate=16, lengths=(1500, 0, 1, 2100), ngroups=1,
                 block_size=512, in_dtype=in_dtype, state_dtype=state_dtype)
    assert supports(**call) is True
    assert_matches_native(OP, "triton", call)
