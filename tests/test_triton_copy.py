"""Triton copy_state_blocks against the native op: bit-exact, any dtype, shape and layout."""

from __future__ import annotations

import random

import pytest
import torch

import mamba_ir
from mamba_ir import get_op

pytest.importorskip("triton")

OP = get_op("copy_state_blocks")


def _state(shape, dtype, device, gapped=False):
    gen = torch.Generator().manual_seed(sum(shape))
    if gapped:  # rows of a larger cache: the last dimension is sliced
        return _state((*shape[:-1], shape[-1] + 3), dtype, device)[..., 1 : shape[-1] + 1]
    if dtype == torch.bool:
        return (torch.rand(shape, generator=gen) > 0.5).to(device)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype=dtype, device=device)


def _pairs(nslots, npairs, pad, seed, index_dtype, device):
    """Pairs obeying the op's rule: no source row is written by another entry."""
    rng = random.Random(seed)
    rows = [r for r in range(nslots) if r != pad]
    rng.shuffle(rows)
    src, dst = [], []
    for _ in range(npairs):
        kind = rng.random()
        if kind < 0.15:
            s, d = pad, rows.pop()
        elif kind < 0.3:
            s, d = rows.pop(), pad  # a source no entry writes
        elif kind < 0.4:
            s = d = rows.pop()  # a row copied onto itself
        else:
            s, d = rows.pop(), rows.pop()
        src.append(s)
        dst.append(d)
    make = lambda v: torch.tensor(v, dtype=index_dtype, device=device)
    return make(src), make(dst)


def check(state, src, dst, pad):
    call = OP.bind(state, src, dst, pad)
    OP.check(call)
    assert OP.impls["triton"].refusal(call) is None
    with mamba_ir.set_priority({"copy_state_blocks": ["triton"]}):
        assert OP.decide(call).provider == "triton"
    ref = state.clone()
    OP.native(ref, src, dst, pad)
    got = torch.empty_strided(state.shape, state.stride(), dtype=state.dtype, device=state.device)
    got.copy_(state)  # same layout, gaps included
    OP.impls["triton"].fn(got, src, dst, pad)
    assert torch.equal(got, ref)


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((9, 3, 4, 8), torch.float32),
        ((9, 3, 4, 8), torch.bfloat16),
        ((9, 2, 3, 5), torch.float16),  # odd row length: 2-byte words
        ((9, 7), torch.uint8),  # 7-byte rows: byte words
        ((9, 2, 3), torch.bool),
        ((9, 2, 3, 2, 2), torch.int64),
        ((9, 4, 3), torch.complex64),
    ],
)
@pytest.mark.parametrize("pad", [-1, 0])
def test_contiguous_rows(shape, dtype, pad):
    src, dst = _pairs(shape[0], 3, pad, seed=len(shape), index_dtype=torch.int32, device="cpu")
    check(_state(shape, dtype, "cpu"), src, dst, pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_gapped_rows(dtype, ndim):
    shape = (8, 3, 2, 2, 5)[:ndim]
    state = _state(shape, dtype, "cpu", gapped=True)
    src, dst = _pairs(8, 3, -1, seed=ndim, index_dtype=torch.int64, device="cpu")
    check(state, src, dst, -1)


def test_transposed_rows_and_strided_indices():
    state = _state((6, 4, 5), torch.float32, "cpu").transpose(1, 2)
    src, dst = _pairs(6, 2, -1, seed=3, index_dtype=torch.int64, device="cpu")
    src = torch.stack([src, src]).t().reshape(-1)[::2]
    dst = torch.stack([dst, dst]).t().reshape(-1)[::2]
    check(state, src, dst, -1)


def test_slots_with_gaps():
    state = _state((12, 3, 8), torch.bfloat16, "cpu")[::2]  # contiguous rows, row stride x2
    src, dst = _pairs(6, 2, 0, seed=5, index_dtype=torch.int32, device="cpu")
    check(state, src, dst, 0)


def test_empty_index():
    empty = torch.empty(0, dtype=torch.int32)
    check(_state((4, 3), torch.float32, "cpu"), empty, empty, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_size_gpu(dtype):
    state = _state((96, 128, 64, 128), dtype, "cuda")
    src, dst = _pairs(96, 40, -1, seed=7, index_dtype=torch.int32, device="cuda")
    check(state, src, dst, -1)
    conv = _state((96, 8192 + 256, 3), dtype, "cuda", gapped=True)
    check(conv, src, dst, -1)


def test_check_impl_interpreter():
    from mamba_ir.testing import check_impl

    check_impl("copy_state_blocks", "triton", device="cpu", max_examples=30)


@pytest.mark.gpu
def test_check_impl_gpu():
    from mamba_ir.testing import check_impl

    check_impl("copy_state_blocks", "triton", device="cuda", max_examples=200)
