"""The native ops against independent float64 per-token loops, on hypothesis argument sets."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from oracles import ORACLES

import mamba_ir
from mamba_ir import checks
from mamba_ir.testing import calls, tolerance, touched_rows

EXAMPLES = 200


def _float_dtypes(call):
    return [v.dtype for v in call.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_native_matches_float64_loop(name):
    op = mamba_ir.get_op(name)
    state_arg = op.rows.primary

    # too_slow: drawing large calls on a loaded 2-core CI machine is slow, not wrong
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(calls(name))
    def run(call):
        call = op.bind(**call)
        want_state, want_out = ORACLES[name](call)
        before = call[state_arg].clone()
        _, written = touched_rows(op, call)
        with mamba_ir.set_priority([]):  # native only
            got_out = op(**call)
        atol, rtol = tolerance(*_float_dtypes(call))
        state = call[state_arg]
        # a row as the values it encodes (a quantized row: within one quantization step)
        value = op.rows.value or (lambda members: (members[state_arg].float(), 0.0))
        values, step = value({n: call[n] for n in op.rows.states})
        step = torch.as_tensor(step, dtype=torch.float64).expand(values.shape)
        for r in range(state.shape[0]):
            if r in written:
                want = want_state[r]
                if state.dtype in checks.FLOAT_DTYPES:
                    want = want.to(state.dtype).double()  # as the row stores it
                err = (values[r].double() - want).abs()
                assert (err <= atol + rtol * want.abs() + step[r]).all(), (
                    f"row {r}: {float(err.max()):.3g} from the float64 loop")
            else:
                assert torch.equal(state[r], before[r]), f"row {r} is not addressed but changed"
        if want_out is not None:
            torch.testing.assert_close(got_out.double(), want_out, atol=atol, rtol=rtol)

    run()


def test_conv_sources_without_destinations_write_row_b():
    op = mamba_ir.get_op("causal_conv1d_update")
    call = op.bind(
        torch.randn(2, 5),
        torch.randn(4, 5, 3),
        torch.randn(5, 4),
        src_conv_state_indices=torch.tensor([3, 2]),
    )
    want_state, want_out = ORACLES["causal_conv1d_update"](call)
    got_out = op(**call)
    # float32 arithmetic against a float64 loop: float32's tolerance, not float64's
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(call["conv_state"].double(), want_state, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_out.double(), want_out, atol=atol, rtol=rtol)
