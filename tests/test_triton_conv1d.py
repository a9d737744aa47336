"""Triton causal_conv1d_fn / causal_conv1d_update against the native ops.

On CPU the kernels run through the Triton interpreter on small shapes; the GPU tests repeat
the comparison at model size (10240 channels, width 4, bf16).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mamba_ir
from mamba_ir.impls.triton import causal_conv1d_fn as fn_impl
from mamba_ir.impls.triton import causal_conv1d_update as update_impl
from mamba_ir.impls.triton._common import MAX_CONV_WIDTH
from mamba_ir.testing import tolerance

FN = mamba_ir.get_op("causal_conv1d_fn")
UPDATE = mamba_ir.get_op("causal_conv1d_update")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    from mamba_ir.testing import check_impl
except ImportError:  # older tree without the property-based checker
    check_impl = None


def _clone(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}


def _compare(op: mamba_ir.IrOp, state_arg: str, call: dict[str, Any], run: Any = None) -> None:
    """Native and Triton on copies of ``call``: outputs close, whole state tensor identical
    up to rounding of the written rows (untouched rows bit-identical)."""
    ref, got = op.bind(**_clone(call)), op.bind(**_clone(call))
    op.check(ref)
    ref_out = op.native(**ref)
    got_out = op.impls["triton"].fn(**got) if run is None else run(got)
    atol, rtol = tolerance(*(t.dtype for t in call.values() if isinstance(t, torch.Tensor)
                             and t.is_floating_point()), op=op)
    torch.testing.assert_close(got_out.float(), ref_out.float(), atol=atol, rtol=rtol)
    # the state is only ever copied (through fp32), so on the GPU written rows match bit for
    # bit; the interpreter rounds fp32 -> bf16 by truncation, hence the tolerance on CPU
    if DEVICE == "cuda":
        assert torch.equal(got[state_arg], ref[state_arg])
    else:
        torch.testing.assert_close(got[state_arg], ref[state_arg], atol=atol, rtol=rtol)
    assert got_out.stride() == ref_out.stride()


def _rand(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype=dtype, device=DEVICE)


def _idx(values: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _qsl(lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return _idx(offsets, dtype)


def _states(slots: int, dim: int, state_len: int, dtype: torch.dtype, channel_last: bool = True
            ) -> torch.Tensor:
    s = _rand(slots, state_len, dim, dtype=dtype).transpose(1, 2)
    return s if channel_last else s.contiguous()


# ------------------------------------------------------------------------------------------
# causal_conv1d_fn


def _fn_call(width: int, lengths: list[int], dim: int = 20, *, x_dtype=torch.float32,
             state_dtype=torch.float32, idx_dtype=torch.int32, channel_last=True, pad=-1,
             **over: Any) -> dict[str, Any]:
    torch.manual_seed(width * 100 + len(lengths))
    ntok = sum(lengths)
    x = _rand(ntok, dim, dtype=x_dtype).t() if channel_last else _rand(dim, ntok, dtype=x_dtype)
    call = {
        "x": x,
        "weight": _rand(dim, width, dtype=x_dtype, scale=0.5),
        "bias": _rand(dim, dtype=x_dtype),
        "conv_states": _states(2 * len(lengths) + 2, dim, width - 1 + 1, state_dtype, channel_last),
        "query_start_loc": _qsl(lengths, idx_dtype),
        "cache_indices": None,
        "has_initial_state": None,
        "activation": "silu",
        "pad_slot_id": pad,
        "src_cache_indices": None,
    }
    call.update(over)
    return call


@pytest.mark.parametrize("width", [2, 3, 4, 5, 8])
def test_fn_mixed_batch_in_place_and_redirect(width: int) -> None:
    # long prompts, one-token and empty sequences, sequences shorter than the window, in one
    # launch; some read their own destination row, one a shared row, one the pad
    lengths = [9, 1, 0, 2, 13, 1, 3]
    n = len(lengths)
    call = _fn_call(width, lengths,
                    cache_indices=_idx([5, -1, 2, 7, 3, 8, 11]),
                    src_cache_indices=_idx([5, 4, 1, 7, -1, 4, 11]),
                    has_initial_state=torch.tensor([True, True, False, True, True, True, True][:n],
                                                   device=DEVICE))
    _compare(FN, "conv_states", call)
    # tiles / chunks of 4 tokens: a sequence's first tokens straddle their boundaries
    _compare(FN, "conv_states", call,
             run=lambda c: fn_impl.launch(c, kernel="tile", block_t=4, block_d=8))
    if width <= fn_impl.STREAM_MAX_WIDTH:
        for chunk, depth in ((1, 4), (4, 4), (4, 8), (16, 8)):
            _compare(FN, "conv_states", call, run=lambda c, n=chunk, q=depth: fn_impl.launch(
                c, kernel="stream", block_t=n, block_d=8, depth=q))


@pytest.mark.parametrize("chunk,depth", [(1, 4), (2, 4), (4, 4), (64, 4), (2, 8), (4, 8),
                                         (16, 8)])
def test_fn_stream_chunks_and_empty_sequences(chunk: int, depth: int) -> None:
    # empty sequences before, between and after the others, starts on and off chunk starts
    call = _fn_call(4, [0, 5, 0, 0, 1, 2, 6, 0],
                    has_initial_state=torch.tensor([True, True, False, True, True, False, True,
                                                    True], device=DEVICE))
    _compare(FN, "conv_states", call,
             run=lambda c: fn_impl.launch(c, kernel="stream", block_t=chunk, block_d=8,
                                          depth=depth))


@pytest.mark.parametrize("length", [1, 5, 8, 21])
def test_fn_single_sequence_default(length: int) -> None:
    # one sequence takes its own default (8-token chunks, 8 rows loaded ahead): chunk tails
    # shorter than the queue, a sequence shorter than the window
    call = _fn_call(4, [length], cache_indices=_idx([2]), has_initial_state=torch.tensor(
        [True], device=DEVICE))
    _compare(FN, "conv_states", call)


@pytest.mark.parametrize(
    "x_dtype,state_dtype,idx_dtype,channel_last,pad",
    [
        (torch.bfloat16, torch.bfloat16, torch.int32, True, -1),
        (torch.float16, torch.float32, torch.int64, False, 0),
        (torch.float32, torch.bfloat16, torch.int64, True, 0),
    ],
)
def test_fn_dtypes_layouts_pads(x_dtype, state_dtype, idx_dtype, channel_last, pad) -> None:
    lengths = [4, 1, 6]
    call = _fn_call(4, lengths, dim=37, x_dtype=x_dtype, state_dtype=state_dtype,
                    idx_dtype=idx_dtype, channel_last=channel_last, pad=pad,
                    cache_indices=_idx([3, pad, 1], idx_dtype),
                    has_initial_state=torch.tensor([True, True, True], device=DEVICE),
                    activation=None, bias=None)
    _compare(FN, "conv_states", call)


def test_fn_without_indices_or_initial_state() -> None:
    # no cache_indices: sequence b owns row b; no has_initial_state: zero windows
    _compare(FN, "conv_states", _fn_call(3, [5, 1, 2], activation="swish"))
    init = torch.tensor([True, False, True], device=DEVICE)
    _compare(FN, "conv_states", _fn_call(3, [1, 4, 2], has_initial_state=init))


def test_fn_predicate_refuses_wide_window() -> None:
    call = FN.bind(**_fn_call(MAX_CONV_WIDTH + 1, [3]))
    reason = FN.impls["triton"].refusal(call)
    assert reason is not None and "width" in reason


# ------------------------------------------------------------------------------------------
# causal_conv1d_update


def _update_call(width: int, form: str, *, spec: bool = False, dim: int = 20,
                 x_dtype=torch.float32, state_dtype=torch.float32, idx_dtype=torch.int32,
                 channel_last=True, pad=-1, **over: Any) -> dict[str, Any]:
    torch.manual_seed(width * 10 + len(form))
    lengths = {"single": [1, 1, 1], "multi": [3, 3, 3], "varlen": [2, 0, 3]}[form]
    if form == "single":
        x = _rand(3, dim, dtype=x_dtype)
    elif form == "multi":
        x = _rand(3, 3, dim, dtype=x_dtype).transpose(1, 2)
    else:
        x = _rand(sum(lengths), dim, dtype=x_dtype)
    call = {
        "x": x,
        "conv_state": _states(8, dim, width - 1 + 3, state_dtype, channel_last),
        "weight": _rand(dim, width, dtype=x_dtype, scale=0.5),
        "bias": _rand(dim, dtype=x_dtype),
        "activation": "silu",
        "conv_state_indices": _idx([5, pad, 2], idx_dtype),
        "num_accepted_tokens": _idx([2, 1, 3], idx_dtype) if spec else None,
        "query_start_loc": _qsl(lengths, idx_dtype) if form == "varlen" else None,
        "pad_slot_id": pad,
        "src_conv_state_indices": _idx([5, 3, 1], idx_dtype),
        "src_token_offset": None,
    }
    call.update(over)
    return call


@pytest.mark.parametrize("width", [2, 3, 4, 7])
@pytest.mark.parametrize("form", ["single", "multi", "varlen"])
@pytest.mark.parametrize("spec", [False, True])
def test_update_forms(width: int, form: str, spec: bool) -> None:
    _compare(UPDATE, "conv_state", _update_call(width, form, spec=spec))


def test_update_token_offset_in_place() -> None:
    # a window read at an offset inside the row being rewritten
    call = _update_call(4, "multi", spec=True, conv_state_indices=_idx([5, 6, 2]),
                        src_conv_state_indices=None, src_token_offset=_idx([2, 0, 3]))
    _compare(UPDATE, "conv_state", call)
    call = _update_call(3, "varlen", src_token_offset=_idx([1, 3, 2]), activation=None)
    _compare(UPDATE, "conv_state", call)


@pytest.mark.parametrize(
    "x_dtype,state_dtype,idx_dtype,channel_last,pad",
    [
        (torch.bfloat16, torch.bfloat16, torch.int64, True, 0),
        (torch.float16, torch.float32, torch.int32, False, -1),
        (torch.float32, torch.float16, torch.int64, False, 0),
    ],
)
def test_update_dtypes_layouts_pads(x_dtype, state_dtype, idx_dtype, channel_last, pad) -> None:
    call = _update_call(4, "varlen", dim=37, x_dtype=x_dtype, state_dtype=state_dtype,
                        idx_dtype=idx_dtype, channel_last=channel_last, pad=pad,
                        src_conv_state_indices=_idx([5, pad, 1], idx_dtype), bias=None)
    _compare(UPDATE, "conv_state", call)


def test_update_index_defaults() -> None:
    for src, dst in ((None, None), (None, _idx([4, 0, 6])), (_idx([4, 1, 6]), None)):
        call = _update_call(4, "single", conv_state_indices=dst, src_conv_state_indices=src)
        _compare(UPDATE, "conv_state", call)


def test_update_channel_blocks_and_refusal() -> None:
    call = _update_call(4, "multi", spec=True, dim=37)
    _compare(UPDATE, "conv_state", call, run=lambda c: update_impl.launch(c, block_d=8))
    wide = UPDATE.bind(**_update_call(MAX_CONV_WIDTH + 1, "single"))
    reason = UPDATE.impls["triton"].refusal(wide)
    assert reason is not None and "width" in reason


def test_update_through_the_op() -> None:
    call = _update_call(4, "single")
    ref = _clone(call)
    with mamba_ir.set_priority({"causal_conv1d_update": ["triton"]}):
        assert UPDATE.decide(UPDATE.bind(**call)).provider == "triton"
        out = UPDATE(**call)
    torch.testing.assert_close(out, UPDATE.native(**UPDATE.bind(**ref)), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# property-based check against native (small shapes through the interpreter on CPU)


@pytest.mark.skipif(check_impl is None, reason="mamba_ir.testing.check_impl not available")
@pytest.mark.parametrize("op", ["causal_conv1d_fn", "causal_conv1d_update"])
def test_check_impl(op: str) -> None:
    check_impl(op, "triton", device=DEVICE, max_examples=60 if DEVICE == "cuda" else 20)


# ------------------------------------------------------------------------------------------
# model size on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 512])
def test_update_full_size(batch: int) -> None:
    dim = 8192 + 2 * 8 * 128
    torch.manual_seed(batch)
    rows = torch.randperm(2 * batch, device=DEVICE)[:batch]
    call = {
        "x": _rand(batch, dim, dtype=torch.bfloat16),
        "conv_state": _states(2 * batch, dim, 3, torch.bfloat16),
        "weight": _rand(dim, 4, dtype=torch.bfloat16, scale=0.5),
        "bias": _rand(dim, dtype=torch.bfloat16),
        "activation": "silu",
        "conv_state_indices": rows.to(torch.int32),
    }
    _compare(UPDATE, "conv_state", call)
    spec = dict(call, x=_rand(batch, 4, dim, dtype=torch.bfloat16).transpose(1, 2),
                conv_state=_states(2 * batch, dim, 6, torch.bfloat16),
                num_accepted_tokens=torch.randint(1, 4, (batch,), device=DEVICE))
    _compare(UPDATE, "conv_state", spec)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{}, {"kernel": "tile"},
                                    {"kernel": "stream", "block_t": 32, "block_d": 256},
                                    {"kernel": "stream", "block_t": 128, "block_d": 512,
                                     "num_warps": 2},
                                    {"kernel": "stream", "block_t": 16, "block_d": 128,
                                     "num_warps": 1, "depth": 8},
                                    {"kernel": "stream", "block_t": 64, "depth": 8},
                                    {"kernel": "stream", "block_t": 16, "block_d": 256,
                                     "num_warps": 2, "depth": 4}])
def test_fn_full_size(config: dict[str, Any]) -> None:
    dim = 8192 + 2 * 8 * 128
    torch.manual_seed(0)
    lengths = [3000, 1, 2, 1, 0, 517, 4096] + [1] * 100
    n = len(lengths)
    call = _fn_call(4, lengths, dim=dim, x_dtype=torch.bfloat16, state_dtype=torch.bfloat16,
                    conv_states=_states(2 * n, dim, 3, torch.bfloat16),
                    cache_indices=torch.randperm(2 * n, device=DEVICE)[:n].to(torch.int32),
                    has_initial_state=torch.rand(n, device=DEVICE) < 0.7)
    _compare(FN, "conv_states", call, run=lambda c: fn_impl.launch(c, **config))
