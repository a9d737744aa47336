"""What ``check_impl`` / ``assert_matches_native`` tell a provider author: the op, the
provider, the result that disagreed, the errors and where, the call's layout; reads of
unaddressed rows traced to the row; 16-bit arithmetic flagged where the ops promise float32;
and the hypothesis settings that checks and a user's own ``@given`` tests run under.

Each broken provider is registered on a real op under a unique name for one test only."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import DeadlineExceeded, FlakyFailure

from mamba_ir import IrOp, get_op, ops
from mamba_ir.testing import (
    assert_matches_native,
    calls,
    check_impl,
    describe_call,
    describe_tensor,
    result_tolerance,
    tolerance,
)

OPS = ("copy_state_blocks", "selective_state_update", "causal_conv1d_fn",
       "causal_conv1d_update", "selective_scan", "mamba_chunk_scan")
_names = itertools.count()


@contextmanager
def registered(op: IrOp, fn: Callable[..., Any]) -> Iterator[str]:
    """``fn`` as a provider of ``op`` (in no default priority) for the with-block."""
    name = f"broken_{next(_names)}"
    op.register_impl(name, fn, platforms=())
    try:
        yield name
    finally:
        op.unregister_impl(name)


def _failure(op: IrOp, fn: Callable[..., Any], call: dict[str, Any]) -> str:
    with registered(op, fn) as name, pytest.raises(AssertionError) as info:
        assert_matches_native(op, name, call)
    message = str(info.value)
    assert message.startswith(f"{op.name}, provider '{name}': "), message
    return message


# -- the layout of a call ---------------------------------------------------------------


def test_describe_tensor_names_views_offsets_ties_and_index_values() -> None:
    view = torch.zeros(2, 5, 4)[1]
    assert describe_tensor(view) == ("(5, 4) float32 on cpu, strides (4, 1), offset 20, "
                                      "a view into a buffer of 40 elements")
    tied = torch.ones(3, 1).expand(3, 4)
    assert "stride 0 in dim 1 (one value broadcast)" in describe_tensor(tied)
    assert "view into" not in describe_tensor(tied)  # the tie is no larger buffer
    assert "non-contiguous" in describe_tensor(torch.zeros(3, 4).t())
    column = torch.tensor([[3, 9], [-1, 9]], dtype=torch.int32)[:, 0]
    assert describe_tensor(column) == ("(2,) int32 on cpu, strides (2,), offset 0, "
                                       "non-contiguous, a view into a buffer of 4 elements, "
                                       "values [3, -1]")
    assert "values" not in describe_tensor(torch.arange(40))  # too many to list
    assert "values" not in describe_tensor(torch.zeros(2))  # float values are data, not layout


def _copy_call() -> dict[str, Any]:
    """Rows 2 and 4 written from row 1 (shared source); rows 0, 3, 5 not addressed. The
    state is the second layer of a two-layer cache."""
    state = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))[1]
    return ops.copy_state_blocks.bind(state, torch.tensor([1, 1]), torch.tensor([2, 4]))


def test_describe_call_lists_every_argument_and_the_rows() -> None:
    text = describe_call(_copy_call(), "copy_state_blocks")
    assert text.splitlines() == [
        "copy_state_blocks call:",
        "  state       : (6, 3) float32 on cpu, strides (3, 1), offset 18, "
        "a view into a buffer of 36 elements",
        "  src         : (2,) int64 on cpu, strides (1,), offset 0, values [1, 1]",
        "  dst         : (2,) int64 on cpu, strides (1,), offset 0, values [2, 4]",
        "  pad_slot_id : -1",
        "  state_scale : None",
        "  rows of state (6 slots, pad_slot_id=-1): reads [1], writes [2, 4], "
        "does not address [0, 3, 5]",
    ]


# -- failure messages -------------------------------------------------------------------


def _copy_then(extra: Callable[[torch.Tensor], None]) -> Callable[..., None]:
    def provider(state, src, dst, pad_slot_id, state_scale=None):
        ops.copy_state_blocks.native(state, src, dst, pad_slot_id, state_scale)
        extra(state)

    return provider


def test_a_changed_unaddressed_row_is_named_with_the_call_layout() -> None:
    def write_row_5(state):
        state[5, 2] = 0.0

    message = _failure(ops.copy_state_blocks, _copy_then(write_row_5), _copy_call())
    assert ("changed state row 5, which the call does not write (a row the call does not "
            "address, NaN before the call): 1 of 3 elements differ, first at (5, 2) "
            "(before nan, bits 0x7fc00000, after 0)") in message
    assert describe_call(_copy_call(), "copy_state_blocks").split("\n", 1)[1] in message


def test_a_changed_source_row_is_named_as_one() -> None:
    def scale_source(state):
        state[1] *= 2

    message = _failure(ops.copy_state_blocks, _copy_then(scale_source), _copy_call())
    assert "changed state row 1, which the call does not write (a source row the call reads)" \
        in message


def test_reading_an_unaddressed_row_names_the_row() -> None:
    def add_row_3(state):
        state[[2, 4]] += 0 * state[3]

    message = _failure(ops.copy_state_blocks, _copy_then(add_row_3), _copy_call())
    assert "state (written rows [2, 4]): 6 of 6 elements differ" in message
    assert "6 elements are NaN where native's are not, first at (2, 0)" in message
    assert ("read a row the call does not address: state row 3 (NaN before the call; with "
            "only row 3 NaN, state (written rows [2, 4]) still gets NaN)") in message


def test_a_wrong_value_names_the_result_the_errors_and_where() -> None:
    def off_by_one(state):
        state[4, 1] += 1.0

    call = _copy_call()
    message = _failure(ops.copy_state_blocks, _copy_then(off_by_one), call)
    want = float(call["state"][1, 1])
    assert (f"state (written rows [2, 4]): 1 of 6 elements differ from native by more than "
            f"atol 1e-05 + rtol 1e-05 * |native|; first at (4, 1) (provider {want + 1:.8g}, "
            f"native {want:.8g})") in message
    assert "max abs error 1 at (4, 1); max rel error" in message
    assert "reduced precision" not in message  # an error no rounding makes


def _ssu_call(in_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Two Mamba2 sequences of a 3-slot state: rows 2 and 0 in place, row 1 alone."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return ops.selective_state_update.bind(
        randn(3, 2, 4, 8), randn(2, 2, 4, dtype=in_dtype),
        randn(2, 2, 4, dtype=in_dtype).abs(), -randn(2, 4, 8).exp(),
        randn(2, 1, 8, dtype=in_dtype), randn(2, 1, 8, dtype=in_dtype), D=randn(2, 4),
        dt_bias=randn(2, 4).abs(), state_batch_indices=torch.tensor([2, 0]))


def test_an_unwritten_output_element_is_named() -> None:
    op = ops.selective_state_update

    def skip_first(**call):
        first = call["out"].reshape(-1)[:1].clone()
        op.native(**call)
        call["out"].view(-1)[:1] = first

    message = _failure(op, skip_first, _ssu_call())
    assert "out: 1 of 16 elements differ from native" in message
    assert "left 1 elements of out unwritten, first at (0, 0, 0) (outputs start as NaN)" \
        in message
    assert "out                     : (2, 2, 4) float32 on cpu" in message


def test_a_nan_of_the_providers_own_is_told_apart_from_a_read_row() -> None:
    op = ops.selective_state_update

    def nan_out(**call):
        op.native(**call)
        call["out"][1, 0, 3] = float("nan")

    message = _failure(op, nan_out, _ssu_call())
    assert "computed NaN where native does not, from the addressed rows alone" in message


def test_a_provider_exception_carries_the_call_layout() -> None:
    def raises(**_):
        raise RuntimeError("kernel launch failed")

    with registered(ops.copy_state_blocks, raises) as name:
        with pytest.raises(RuntimeError, match="kernel launch failed") as info:
            assert_matches_native(ops.copy_state_blocks, name, _copy_call())
    if hasattr(info.value, "__notes__"):  # Python 3.11+
        assert "offset 18, a view into a buffer of 36 elements" in info.value.__notes__[0]


# no shrinking: a failing draw is enough, and each shrink step reruns the provider
FAILING_FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                        phases=[Phase.generate],
                        suppress_health_check=[HealthCheck.filter_too_much])


def test_check_impl_fails_with_the_message_of_the_failing_call() -> None:
    def write_last(state, src, dst, pad_slot_id, state_scale=None):
        ops.copy_state_blocks.native(state, src, dst, pad_slot_id, state_scale)
        state[-1] = 0

    with registered(ops.copy_state_blocks, write_last) as name:
        with pytest.raises(AssertionError, match=r"(?s)changed state row \d+, which the call "
                           r"does not write.*\n  rows of state \(\d+ slots"):
            check_impl(ops.copy_state_blocks, name, settings=FAILING_FAST)


# -- 16-bit arithmetic where the ops promise float32 ------------------------------------

def _rounded_inputs(op: IrOp, dtype: torch.dtype = torch.bfloat16) -> Callable[..., Any]:
    """A provider that computes from its inputs rounded to ``dtype``: what arithmetic in
    ``dtype`` does to a result."""
    def provider(**call):
        for name, value in call.items():
            if (isinstance(value, torch.Tensor) and value.is_floating_point()
                    and name not in op.mutates_args):
                call[name] = value.to(dtype).to(value.dtype)
        return op.native(**call)

    return provider


def _copy_through_bf16(state, src, dst, pad_slot_id, state_scale=None):
    keep = (src != pad_slot_id) & (dst != pad_slot_id)
    rows = state[src[keep]]
    if state.dtype in (torch.float32, torch.float16):  # what bfloat16 can round
        rows = rows.to(torch.bfloat16).to(state.dtype)
    state[dst[keep]] = rows
    if state_scale is not None:
        state_scale[dst[keep]] = state_scale[src[keep]]


@pytest.mark.parametrize("name", OPS)
def test_16_bit_arithmetic_fails_check_impl_as_reduced_precision(name: str) -> None:
    op = get_op(name)
    fn = _copy_through_bf16 if name == "copy_state_blocks" else _rounded_inputs(op)
    with registered(op, fn) as provider:
        with pytest.raises(AssertionError, match="computed at reduced precision: this float"):
            check_impl(op, provider, settings=FAILING_FAST)


def test_a_float32_call_at_bfloat16_precision_says_so() -> None:
    op = ops.selective_state_update
    message = _failure(op, _rounded_inputs(op), _ssu_call())
    assert ("computed at reduced precision: this float32 result agrees with native only to "
            "16-bit precision") in message
    assert "promises float32 arithmetic whatever the storage dtype" in message


def test_a_float32_state_of_16_bit_inputs_is_held_to_float32() -> None:
    """bfloat16 inputs are exact values both read: a float32 state computed from them in
    float32 agrees to float32 precision, so a provider that also rounds the float32
    parameters (A, D, dt_bias) to the inputs' dtype fails, where the loosest dtype of the
    call (bfloat16) would have let it pass."""
    op = ops.selective_state_update
    call = _ssu_call(torch.bfloat16)
    message = _failure(op, _rounded_inputs(op), call)
    assert ": state (written rows [0, 2]): " in message.split("\n", 1)[0]
    assert "computed at reduced precision: this float32 result" in message
    assert tolerance(torch.float32, torch.bfloat16, op=op) == tolerance(torch.bfloat16)


def test_result_tolerance_is_the_results_dtype_unless_the_op_loosens_it() -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    # (the op's own float32 entry: its GPU exp and FMA need 2e-4 at full size)
    ssu = "selective_state_update"
    assert result_tolerance(f32, [bf16, f32], ssu) == tolerance(f32, op=ssu)
    assert result_tolerance(bf16, [f32], "selective_state_update") == tolerance(bf16)
    # the chunked scan multiplies 16-bit inputs on tensor cores: a float32 state of bfloat16
    # inputs carries their rounding; of float32 inputs (IEEE products) it does not
    chunked = get_op("mamba_chunk_scan")
    assert result_tolerance(f32, [bf16], chunked) == chunked.input_tolerances[bf16]
    assert result_tolerance(f32, [f32], chunked) == tolerance(f32)


# -- hypothesis settings ----------------------------------------------------------------


@pytest.fixture
def default_profile() -> Iterator[None]:
    """hypothesis' own defaults (a 200 ms deadline), not the test suite's profile;
    derandomized, so CI draws the same few calls each run."""
    previous = settings.get_current_profile_name()
    settings.register_profile("default-derandomized", settings.get_profile("default"),
                              derandomize=True)
    settings.load_profile("default-derandomized")
    try:
        yield
    finally:
        settings.load_profile(previous)


@pytest.mark.usefixtures("default_profile")
def test_check_impl_runs_under_hypothesis_defaults() -> None:
    pytest.importorskip("triton")
    # the interpreter takes seconds a call: under the default 200 ms deadline it fails
    with pytest.raises((DeadlineExceeded, FlakyFailure)):
        check_impl("mamba_chunk_scan", "triton", max_examples=5,
                   settings=settings(phases=[Phase.generate]))
    # check_impl lifts the deadline itself
    assert check_impl("mamba_chunk_scan", "triton", max_examples=2) >= 1


def test_check_impl_runs_under_the_callers_settings() -> None:
    mine = settings(max_examples=3, deadline=None, database=None)
    assert check_impl("copy_state_blocks", "native", settings=mine) <= 3
    assert check_impl("copy_state_blocks", "native", settings=mine, max_examples=1) == 1


# What docs/providers.md tells a user's own @given test of calls(op) to run under
DOCUMENTED = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", OPS)
def test_a_users_given_test_runs_under_the_documented_settings(name: str) -> None:
    pytest.importorskip("triton")
    op = get_op(name)

    # derandomized so CI draws the same few calls each run (random ones take 1-60 s)
    @settings(settings.get_profile("default"), max_examples=3, derandomize=True, **DOCUMENTED)
    @given(calls(name))
    def users_test(call: dict[str, Any]) -> None:
        call = op.bind(**call)
        if op.impls["triton"].refusal(call) is None:
            assert_matches_native(op, "triton", call)

    users_test()
