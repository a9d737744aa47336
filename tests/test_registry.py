"""Registration, priority and dispatch."""

import pytest
import torch

import mamba_ir
from mamba_ir import ENV_VAR, ops
from mamba_ir.priority import parse_priority


@pytest.fixture
def narrow():
    """A provider for copy_state_blocks that only takes fp32 states with 2-D rows."""
    op = ops.copy_state_blocks
    served = []

    def impl(**call):
        served.append(call["state"].dtype)
        return op.native(**call)

    def supports(state, **_):
        if state.dtype != torch.float32:
            return "needs float32 state"
        if state.dim() != 3:
            return "needs (slots, a, b) state"
        return True

    op.register_impl("narrow", impl, supports=supports, platforms=("cpu",))
    yield served
    del op.impls["narrow"]


def _copy_args(dtype=torch.float32, shape=(4, 2, 3)):
    return torch.randn(shape).to(dtype), torch.tensor([0, 1]), torch.tensor([2, 3])


def test_ops_are_torch_library_custom_ops():
    for name in mamba_ir.REGISTRY:
        overload = getattr(torch.ops.mamba_ir, name).default
        assert isinstance(overload, torch._ops.OpOverload)
    schema = torch.ops.mamba_ir.selective_state_update.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
    assert mutated == {"state", "out", "state_scale"}


def test_opcheck_every_op():
    state = torch.randn(4, 2, 3, 8)
    x, dt = torch.randn(2, 2, 3), torch.rand(2, 2, 3)
    ssu = (state, x, dt, -torch.rand(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    ssu_kwargs = {"state_batch_indices": torch.tensor([1, 0]), "out": torch.empty_like(x)}
    conv = torch.randn(3, 5, 3)
    samples = [
        (torch.ops.mamba_ir.selective_state_update, ssu, ssu_kwargs),
        (torch.ops.mamba_ir.causal_conv1d_update, (torch.randn(2, 5), conv, torch.randn(5, 4)), {}),
        (
            torch.ops.mamba_ir.causal_conv1d_fn,
            (torch.randn(5, 6), torch.randn(5, 4), None, conv, torch.tensor([0, 2, 6])),
            {"has_initial_state": torch.tensor([True, False])},
        ),
        (torch.ops.mamba_ir.copy_state_blocks, _copy_args(), {}),
    ]
    for op, args, kwargs in samples:
        torch.library.opcheck(op, args, kwargs)


def test_narrow_provider_is_chosen_exactly_where_it_applies(narrow):
    op = ops.copy_state_blocks
    with mamba_ir.set_priority({"copy_state_blocks": ["narrow"]}):
        op(*_copy_args())
        decision = op.decide(op.bind(*_copy_args()))
        assert decision.provider == "narrow" and decision.skipped == ()

        op(*_copy_args(dtype=torch.float16))
        decision = op.decide(op.bind(*_copy_args(dtype=torch.float16)))
        assert decision.provider == "native"
        assert decision.skipped == (("narrow", "needs float32 state"),)

        decision = op.decide(op.bind(*_copy_args(shape=(4, 6))))
        assert decision.skipped == (("narrow", "needs (slots, a, b) state"),)
    assert narrow == [torch.float32]


def test_platform_default_lists_providers_registered_for_that_device(narrow):
    op = ops.copy_state_blocks
    assert op.priority("cpu")[-2:] == ("narrow", "native")
    assert "narrow" not in op.priority("cuda")
    assert op.decide(op.bind(*_copy_args())).provider == "narrow"


def test_context_manager_nests_and_restores(narrow):
    op = ops.copy_state_blocks
    call = op.bind(*_copy_args())
    with mamba_ir.set_priority([]):
        assert op.decide(call).provider == "native"
        with mamba_ir.set_priority("copy_state_blocks=narrow"):
            assert op.decide(call).provider == "narrow"
        assert op.decide(call).provider == "native"
    assert op.decide(call).provider == "narrow"


def test_env_var_priority_takes_effect(narrow, monkeypatch):
    op = ops.copy_state_blocks
    call = op.bind(*_copy_args())
    monkeypatch.setenv(ENV_VAR, "selective_state_update=triton;copy_state_blocks=native")
    assert op.decide(call).provider == "native"
    monkeypatch.setenv(ENV_VAR, "copy_state_blocks=narrow")
    assert op.decide(call).provider == "narrow"
    with mamba_ir.set_priority({"copy_state_blocks": []}):  # the context wins over the env
        assert op.decide(call).provider == "native"


def test_failing_predicate_is_skipped_with_its_reason(narrow):
    op = ops.copy_state_blocks
    op.register_impl("broken", op.native, supports=lambda **_: 1 / 0, platforms=("cpu",))
    try:
        with mamba_ir.set_priority({"copy_state_blocks": ["broken", "narrow"]}):
            decision = op.decide(op.bind(*_copy_args()))
        assert decision.provider == "narrow"
        assert decision.skipped[0][0] == "broken"
        assert "ZeroDivisionError" in decision.skipped[0][1]
        assert "narrow" in str(decision) or str(decision).startswith("copy_state_blocks -> narrow")
    finally:
        del op.impls["broken"]


def test_native_is_reserved_and_always_last():
    with pytest.raises(ValueError, match="reserved"):
        ops.copy_state_blocks.register_impl("native", lambda **_: None)
    assert parse_priority("native,triton") == {"*": ("triton",)}
    with mamba_ir.set_priority(["native", "triton"]):
        assert ops.selective_state_update.priority("cuda") == ("triton", "native")


def test_parse_priority_forms():
    assert parse_priority("a=x,y;b=z") == {"a": ("x", "y"), "b": ("z",)}
    assert parse_priority({"a": "x, y"}) == {"a": ("x", "y")}
    assert parse_priority(["x"]) == {"*": ("x",)}
    assert parse_priority(None) == {}


def test_get_op_names_the_declared_ops():
    with pytest.raises(KeyError, match="selective_state_update"):
        mamba_ir.get_op("nope")


def test_allocated_output_is_returned():
    state = torch.randn(3, 2, 4, 8)
    out = ops.selective_state_update(
        state,
        torch.randn(2, 2, 4),
        torch.rand(2, 2, 4),
        -torch.rand(2, 4, 8),
        torch.randn(2, 1, 8),
        torch.randn(2, 1, 8),
    )
    assert out.shape == (2, 2, 4)
    given = torch.empty(2, 2, 4)
    same = ops.selective_state_update(
        state,
        torch.randn(2, 2, 4),
        torch.rand(2, 2, 4),
        -torch.rand(2, 4, 8),
        torch.randn(2, 1, 8),
        torch.randn(2, 1, 8),
        out=given,
    )
    assert same is given


def test_a_call_reaches_the_custom_op_positionally(monkeypatch):
    # torch 2.11 bumps a mutated argument's version by its position when autograd is on,
    # and fails on one passed by name: every argument must go positionally
    op = mamba_ir.get_op("selective_state_update")
    seen = []
    real = op.custom_op
    monkeypatch.setattr(op, "custom_op", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    ops.selective_state_update(torch.randn(3, 2, 4, 8), torch.randn(2, 2, 4),
                               torch.rand(2, 2, 4), -torch.rand(2, 4, 8),
                               torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    assert seen == [{}]


def test_a_registered_provider_is_replaced_only_on_request(narrow):
    op = ops.copy_state_blocks
    first = op.impls["narrow"]
    with pytest.raises(ValueError, match=r"provider 'narrow': .*not yet registered.*replace=True"):
        op.register_impl("narrow", op.native, platforms=("cpu",))
    assert op.impls["narrow"] is first
    op.register_impl("narrow", op.native, platforms=("cpu",), replace=True)
    assert op.impls["narrow"].fn is op.native


def test_unregister_returns_the_implementation_and_keeps_native():
    op = ops.copy_state_blocks
    op.register_impl("gone", op.native, platforms=("cpu",))
    removed = op.unregister_impl("gone")
    assert removed.provider == "gone" and "gone" not in op.impls
    with pytest.raises(ValueError, match="expected one registered"):
        op.unregister_impl("gone")
    with pytest.raises(ValueError, match="cannot be removed"):
        op.unregister_impl("native")


def test_implementations_must_take_the_ops_arguments_by_name():
    op = ops.copy_state_blocks

    def wrong_names(state, source, dst, pad_slot_id, state_scale=None):
        return None

    def needs_more(state, src, dst, pad_slot_id, state_scale, tile):
        return None

    def tunable(state, src, dst, pad_slot_id=-1, state_scale=None, *, tile=4):
        return None

    def positional_only(state, src, dst, pad_slot_id, state_scale, /):
        return None

    missing = r"missing \['state', 'src', 'dst', 'pad_slot_id', 'state_scale'\]"
    for fn, words in ((wrong_names, r"missing \['src'\]"),
                      (needs_more, r"extra parameters without defaults \['tile'\]"),
                      (positional_only, missing)):
        with pytest.raises(ValueError, match=r"fn of provider 'sig': expected .*" + words):
            op.register_impl("sig", fn, platforms=("cpu",))
        assert "sig" not in op.impls
    op.register_impl("sig", tunable, platforms=("cpu",))  # keyword extras with defaults
    op.unregister_impl("sig")
