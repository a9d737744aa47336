"""A row of state that is several tensors (``RowSpec.state``): a quantized state and its
scales are read, written, checked, poisoned and copied as one row."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_ir
from mamba_ir import ops
from mamba_ir.op import RowSpec, register_op
from mamba_ir.ops._quant import QMAX, QUANTIZED, quantize, values
from mamba_ir.testing import check_impl

# -- the quantization the native ops define ---------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(QUANTIZED),
    blocks=st.lists(
        st.lists(st.floats(-1e4, 1e4, allow_subnormal=False, width=32), min_size=1, max_size=9),
        min_size=1, max_size=4,
    ).filter(lambda b: len({len(r) for r in b}) == 1),
)
def test_quantize_against_float64(dtype, blocks):
    h = torch.tensor(blocks, dtype=torch.float32)
    q, scale = quantize(h, dtype)
    qmax = QMAX[dtype]
    absmax = h.double().abs().amax(-1)
    flushed = absmax < qmax * torch.finfo(torch.float32).tiny  # no normal float32 scale
    want_scale = torch.where(flushed, 0.0, (absmax / qmax).float())
    assert torch.equal(scale, want_scale)  # one correctly rounded division per block
    assert not q[flushed].float().any()
    assert q.float().abs().max() <= qmax
    back = values(q, scale).double()
    err = (back - h.double()).abs()
    if dtype.is_floating_point:  # half a unit in the last place of a 3-bit mantissa
        exact = h.double() * (qmax / absmax.clamp(min=1e-300))[..., None]
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=2**-6))) - 3)
        bound = (0.5 * ulp + 1e-6 * exact.abs()) * want_scale.double()[..., None]
    else:  # half a step of the scale
        bound = (0.5 + 1e-6 * qmax) * want_scale.double()[..., None]
    bound = torch.where(flushed[..., None], absmax[..., None], bound)
    assert (err <= bound + 1e-30).all(), float((err - bound).max())


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_ties_round_to_even_and_special_blocks(dtype):
    qmax = QMAX[dtype]
    if dtype.is_floating_point:  # e4m3 steps by 2 in [16, 32): 17 and 19 are ties
        h, want = torch.tensor([[qmax, 17.0, -17.0, 19.0]]), [qmax, 16.0, -16.0, 20.0]
    else:
        h, want = torch.tensor([[qmax, 2.5, 3.5, -2.5]]), [qmax, 2.0, 4.0, -2.0]
    q, scale = quantize(h, dtype)
    assert q.float().tolist() == [want] and scale.tolist() == [1.0]
    q, scale = quantize(torch.zeros(2, 3), dtype)
    assert not q.float().any() and not scale.any()  # all zero: scale 0, not NaN
    q, scale = quantize(torch.tensor([[1.0, math.inf], [math.nan, 1.0], [1.0, 2.0]]), dtype)
    assert scale[:2].isnan().all() and scale[2] == 2.0 / qmax
    assert values(q, scale)[:2].isnan().all()  # non-finite stays non-finite


# -- the row rules read every member ------------------------------------------------------


def _quantized(slots: int, dtype=torch.int8, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(torch.randn(slots, *(shape or (2, 3))), dtype)


def test_copy_moves_each_member_of_a_row():
    state, scale = _quantized(6)
    want_state, want_scale = state.clone(), scale.clone()
    ops.copy_state_blocks(state, torch.tensor([0, -1, 4]), torch.tensor([3, 1, 5]),
                          state_scale=scale)
    want_state[[3, 5]], want_scale[[3, 5]] = want_state[[0, 4]], want_scale[[0, 4]]
    assert torch.equal(state, want_state) and torch.equal(scale, want_scale)


def test_a_member_with_other_rows_is_refused_before_anything_is_written():
    state, scale = _quantized(6)
    before = state.clone()
    with pytest.raises(ValueError, match=r"state_scale: expected 6 rows, one per row of state"):
        ops.copy_state_blocks(state, torch.tensor([0]), torch.tensor([3]),
                              state_scale=scale[:4])
    assert torch.equal(state, before)


def test_ssu_reads_and_writes_dequantized_rows():
    q, scale = _quantized(4, torch.int16, 2, 3, 8)
    x, dt = torch.randn(2, 2, 3), torch.rand(2, 2, 3)
    A, B, C = -torch.rand(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    idx = dict(state_batch_indices=torch.tensor([0, 1]),
               dst_state_batch_indices=torch.tensor([2, 3]))
    as_float = values(q, scale)
    want = ops.selective_state_update(as_float, x, dt, A, B, C, **idx)
    got = ops.selective_state_update(q, x, dt, A, B, C, **idx, state_scale=scale)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same float32 recurrence
    torch.testing.assert_close(values(q, scale)[2:], as_float[2:], atol=1e-4, rtol=0)
    assert torch.equal(q[:2], quantize(as_float[:2], torch.int16)[0])  # sources untouched


def test_a_row_member_must_be_mutated():
    def step(state: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor,
             pad_slot_id: int = -1) -> None:
        pass

    with pytest.raises(ValueError, match=r"every member of a state row in mutates_args"):
        register_op(mutates_args=("state",),
                    rows=RowSpec(("state", "scale"), "idx", "idx", lambda call: None))(step)


# -- check_impl poisons, compares and keeps every member ----------------------------------


def _forgets_scales(state, src, dst, pad_slot_id=-1, state_scale=None):
    ops.copy_state_blocks.native(state, src, dst, pad_slot_id)


def _reads_integers_as_values(**call):
    """Runs the recurrence on the stored integers, as if the state were not quantized."""
    scale = call.pop("state_scale")
    if scale is None:
        return ops.selective_state_update.native(**call)
    h = call["state"].float()
    ops.selective_state_update.native(**{**call, "state": h})
    call["state"].copy_(quantize(h, call["state"].dtype)[0])


@pytest.mark.parametrize("op, fn, words", [
    ("copy_state_blocks", _forgets_scales, "state_scale"),
    ("selective_state_update", _reads_integers_as_values, "as values|output"),
])
def test_check_impl_fails_a_provider_that_mishandles_scales(op, fn, words):
    target = mamba_ir.get_op(op)
    target.register_impl("careless", fn, platforms=("cpu",))
    try:
        with pytest.raises(Exception) as failed:  # hypothesis may group several failures
            check_impl(op, "careless", max_examples=80)
    finally:
        target.unregister_impl("careless")
    assert re.search(words, _messages(failed.value)), _messages(failed.value)


def _messages(exc: BaseException) -> str:
    return "\n".join([str(exc), *(_messages(e) for e in getattr(exc, "exceptions", ()))])


def _reads_every_scale(**call):
    """Right, but reads the scale of every row first (rows the call does not address)."""
    scale = call["state_scale"]
    if scale is not None and bool(scale.isnan().any()):
        call["out"].fill_(float("nan"))
        return None
    return ops.selective_state_update.native(**call)


def test_check_impl_poisons_the_scales_of_rows_a_call_does_not_address():
    op = mamba_ir.get_op("selective_state_update")
    op.register_impl("nosy", _reads_every_scale, platforms=("cpu",))
    try:
        with pytest.raises(Exception) as failed:
            check_impl(op, "nosy", max_examples=120)
    finally:
        op.unregister_impl("nosy")
    assert re.search("as values|output", _messages(failed.value))


# -- align fusion folds a copy that moves the whole row -------------------------------------


def _copy_then_step(q, scale, src, dst, x, dt, A, B, C, with_scale: bool):
    ops.copy_state_blocks(q, src, dst, state_scale=scale if with_scale else None)
    y = ops.selective_state_update(q, x, dt, A, B, C, state_batch_indices=dst, state_scale=scale)
    return y, q + 0, scale + 0


@pytest.mark.parametrize("with_scale", [True, False])
def test_align_fusion_folds_a_copy_of_every_member(with_scale):
    torch.manual_seed(0)
    q, scale = _quantized(6, torch.int16, 2, 3, 8)
    args = (torch.tensor([4, -1]), torch.tensor([0, 1]), torch.randn(2, 2, 3),
            torch.rand(2, 2, 3), -torch.rand(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    want = _copy_then_step(q.clone(), scale.clone(), *args, with_scale)
    torch._dynamo.reset()
    compiled = mamba_ir.compile(_copy_then_step, dynamic=False)
    got = compiled(q.clone(), scale.clone(), *args, with_scale)
    torch._dynamo.reset()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    copy = next(s for s in compiled.lowering_report if s.op == "copy_state_blocks")
    if with_scale:
        assert copy.fused, copy.fusion
    else:
        assert not copy.fused
        assert "the copy moves rows of state," in copy.fusion
        assert "rows are state, state_scale" in copy.fusion
