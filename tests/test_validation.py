"""Bad input raises a ValueError naming the argument, before any state is written."""

import pytest
import torch

from mamba_ir import REGISTRY, get_op, ops, set_priority


def ssu_args():
    return {
        "state": torch.randn(6, 2, 4, 8),
        "x": torch.randn(3, 2, 4),
        "dt": torch.rand(3, 2, 4),
        "A": -torch.rand(2, 4, 8),
        "B": torch.randn(3, 1, 8),
        "C": torch.randn(3, 1, 8),
        "D": torch.randn(2, 4),
        "state_batch_indices": torch.tensor([0, 1, 2]),
        "dst_state_batch_indices": torch.tensor([3, 4, 5]),
    }


def conv_update_args():
    return {
        "x": torch.randn(2, 5),
        "conv_state": torch.randn(4, 5, 3),
        "weight": torch.randn(5, 4),
        "conv_state_indices": torch.tensor([1, 2]),
    }


def conv_fn_args():
    return {
        "x": torch.randn(5, 7),
        "weight": torch.randn(5, 4),
        "bias": None,
        "conv_states": torch.randn(4, 5, 3),
        "query_start_loc": torch.tensor([0, 3, 7]),
        "cache_indices": torch.tensor([0, 2]),
        "has_initial_state": torch.tensor([True, False]),
    }


def copy_args():
    return {"state": torch.randn(4, 3), "src": torch.tensor([0, 1]), "dst": torch.tensor([2, 3])}


def _set(**changes):
    return changes


CASES = [
    # (op, args, changes, argument named, words expected)
    ("selective_state_update", ssu_args, _set(x=torch.randn(3, 2, 5)), "x", "shape"),
    ("selective_state_update", ssu_args, _set(dt=torch.rand(3, 2)), "dt", "shape"),
    ("selective_state_update", ssu_args, _set(A=-torch.rand(2, 4)), "A", "shape"),
    ("selective_state_update", ssu_args, _set(B=torch.randn(3, 3, 8)), "B", "ngroups"),
    ("selective_state_update", ssu_args, _set(D=torch.randn(4)), "D", "shape"),
    ("selective_state_update", ssu_args, _set(x=torch.randn(3, 2, 4).long()), "x", "dtype"),
    (
        "selective_state_update",
        ssu_args,
        _set(x=torch.randn(3, 2, 4, device="meta")),
        "x",
        "device",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(state=torch.randn(1, 2, 4, 1).expand(6, 2, 4, 8)),
        "state",
        "stride-0",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(state_batch_indices=torch.tensor([0, 1, 6])),
        "state_batch_indices",
        "rows in [0, 6)",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(state_batch_indices=torch.tensor([0.0, 1, 2])),
        "state_batch_indices",
        "dtype",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(dst_state_batch_indices=torch.tensor([3, 3, 5])),
        "dst_state_batch_indices",
        "distinct",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(state_batch_indices=torch.tensor([4, 1, 2])),
        "state_batch_indices",
        "another entry writes",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(num_accepted_tokens=torch.tensor([1, 1, 1])),
        "state_batch_indices",
        "2 dimensions",
    ),
    (
        "selective_state_update",
        ssu_args,
        _set(cu_seqlens=torch.tensor([0, 1, 1, 2])),
        "cu_seqlens",
        "offsets from 0 to 3",
    ),
    ("causal_conv1d_update", conv_update_args, _set(x=torch.randn(2, 6)), "x", "channels"),
    ("causal_conv1d_update", conv_update_args, _set(weight=torch.randn(5, 1)), "weight", "width"),
    ("causal_conv1d_update", conv_update_args, _set(weight=torch.randn(6, 4)), "weight", "(5,"),
    # a state narrower than the weight's window: the state is what is too small
    (
        "causal_conv1d_update",
        conv_update_args,
        _set(conv_state=torch.randn(4, 5, 2)),
        "conv_state",
        "at least 3 columns",
    ),
    (
        "causal_conv1d_update",
        conv_update_args,
        _set(weight=torch.randn(5, 5)),
        "conv_state",
        "at least 4 columns",
    ),
    (
        "causal_conv1d_update",
        conv_update_args,
        _set(x=torch.randn(2, 5, 2), num_accepted_tokens=torch.tensor([1, 2])),
        "conv_state",
        "at least 4 columns",
    ),
    (
        "causal_conv1d_update",
        conv_update_args,
        _set(conv_state_indices=torch.tensor([1, 9])),
        "conv_state_indices",
        "rows in [0, 4)",
    ),
    (
        "causal_conv1d_update",
        conv_update_args,
        _set(src_token_offset=torch.tensor([0, 1])),
        "src_token_offset",
        "window start",
    ),
    ("causal_conv1d_update", conv_update_args, _set(activation="relu"), "activation", "silu"),
    (
        "causal_conv1d_update",
        conv_update_args,
        _set(conv_state_indices=torch.tensor([1])),
        "conv_state_indices",
        "2 rows",
    ),
    (
        "causal_conv1d_fn",
        conv_fn_args,
        _set(query_start_loc=torch.tensor([0, 3, 6])),
        "query_start_loc",
        "to 7",
    ),
    (
        "causal_conv1d_fn",
        conv_fn_args,
        _set(has_initial_state=torch.tensor([1, 0])),
        "has_initial_state",
        "dtype",
    ),
    (
        "causal_conv1d_fn",
        conv_fn_args,
        _set(conv_states=torch.randn(4, 5, 2)),
        "conv_states",
        "shape",
    ),
    (
        "causal_conv1d_fn",
        conv_fn_args,
        _set(src_cache_indices=torch.tensor([2, 1])),
        "src_cache_indices",
        "another entry writes",
    ),
    ("copy_state_blocks", copy_args, _set(dst=torch.tensor([2, 2])), "dst", "distinct"),
    ("copy_state_blocks", copy_args, _set(dst=torch.tensor([1, 3])), "src", "another entry writes"),
    ("copy_state_blocks", copy_args, _set(src=torch.tensor([0, -2])), "src", "rows in [0, 4)"),
    ("copy_state_blocks", copy_args, _set(dst=torch.tensor([2])), "dst", "2 rows"),
]


@pytest.mark.parametrize(
    ("name", "make", "changes", "argument", "words"),
    CASES,
    ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in CASES],
)
def test_bad_input_is_named_and_nothing_is_written(name, make, changes, argument, words):
    args = {**make(), **changes}
    states = {k: v.clone() for k, v in args.items() if k in ("state", "conv_state", "conv_states")}
    with pytest.raises(ValueError) as info:
        getattr(ops, name)(**args)
    message = str(info.value)
    assert message.startswith(f"{argument}: expected"), message
    assert words in message, message
    for k, before in states.items():
        if args[k].device.type != "meta":
            assert torch.equal(args[k], before), f"{k} changed by a rejected call"


def test_valid_calls_pass():
    ops.selective_state_update(**ssu_args())
    ops.causal_conv1d_update(**conv_update_args())
    ops.causal_conv1d_fn(**conv_fn_args())
    ops.copy_state_blocks(**copy_args())


OUT_OPS = sorted(name for name, op in REGISTRY.items() if "out" in op.signature.parameters)


def test_every_op_with_out_is_covered():
    assert OUT_OPS == ["mamba_chunk_scan", "replay_state_update", "selective_scan",
                       "selective_state_update"]


@pytest.mark.parametrize("via", ["ops", "torch.ops", "triton"])
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_of_another_dtype_is_refused_before_anything_is_written(name, via):
    """Whichever provider would serve the call, and through either entry point, an `out`
    whose dtype is not its input's is refused naming `out`; no state or output changes."""
    op = get_op(name)
    call = op.bind(**op.example(torch.device("cpu"), torch.float32))
    source = "u" if "u" in call else "x"
    call["out"] = torch.full(call[source].shape, 7.0, dtype=torch.bfloat16)
    before = {k: call[k].clone() for k in op.mutates_args if call[k] is not None}
    with pytest.raises(ValueError) as info, set_priority(["triton"] if via == "triton" else []):
        if via == "torch.ops":
            getattr(torch.ops.mamba_ir, name)(**call)
        else:
            getattr(ops, name)(**call)
    assert str(info.value).startswith(f"out: expected dtype float32 (that of {source}), got "), (
        str(info.value))
    for k, value in before.items():
        assert torch.equal(call[k], value), f"{k} changed by a rejected call"
def _scalar_cases():
    """Every scalar argument of every op with a value of the wrong Python type: a float or a
    bool for an int, an int or a string for a bool, a string for a float."""
    import mamba_ir
    from mamba_ir import checks

    wrong = {int: [1.0, True], bool: [1, "yes"], float: ["0.5"]}
    for name in sorted(mamba_ir.op.REGISTRY):
        op = mamba_ir.get_op(name)
        for arg, (kind, _) in checks.scalar_kinds(op.signature).items():
            for value in wrong[kind]:
                yield pytest.param(name, arg, value, id=f"{name}-{arg}-{value!r}")


@pytest.mark.parametrize(("name", "arg", "value"), list(_scalar_cases()))
def test_scalar_arguments_of_the_wrong_type_are_value_errors_naming_them(name, arg, value):
    """``mamba_ir.ops.<op>`` refuses them with our ValueError before anything is written,
    not torch's schema RuntimeError (which also took True for 1 and 1 for True)."""
    import mamba_ir

    op = mamba_ir.get_op(name)
    call = op.bind(**op.example(torch.device("cpu"), torch.float32))
    states = {k: v.clone() for k, v in call.items() if k in op.mutates_args and v is not None}
    with pytest.raises(ValueError, match=rf"^{arg}: expected (an int|a bool|a number)"):
        getattr(ops, name)(**{**call, arg: value})
    for k, v in states.items():
        assert torch.equal(call[k], v), k


def test_every_op_has_its_scalar_arguments_checked():
    from mamba_ir import checks, get_op

    kinds = {name: sorted(checks.scalar_kinds(get_op(name).signature)) for name in (
        "selective_state_update", "mamba_chunk_scan", "causal_conv1d_fn")}
    assert kinds == {
        "selective_state_update": ["dt_softplus", "pad_slot_id"],
        "mamba_chunk_scan": ["block_size", "chunk_size", "dt_softplus", "pad_slot_id"],
        "causal_conv1d_fn": ["pad_slot_id"],
    }


def test_conv_fn_without_channels_returns_an_empty_output():
    """dim == 0: nothing to convolve or keep, in every provider (native's conv1d refuses
    zero groups)."""
    from mamba_ir import get_op

    args = conv_fn_args()
    args.update(x=torch.randn(0, 7), weight=torch.randn(0, 4), conv_states=torch.randn(4, 0, 3))
    op = get_op("causal_conv1d_fn")
    for provider in op.impls:
        call = op.bind(**args)
        if op.impls[provider].refusal(call) is not None:
            continue
        out = op.impls[provider].fn(**call)
        assert out.shape == (0, 7), provider
    assert ops.causal_conv1d_fn(**args).shape == (0, 7)
