"""Lowering decides once per call site, with the priority the passes were set up with
handed to ``IrOp.decide`` (no ``set_priority`` context entered while compiling)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

import mamba_ir
from mamba_ir import get_op, ops
from mamba_ir.passes import LoweringPass, compile

SSU = get_op("selective_state_update")
COPY = get_op("copy_state_blocks")
PROVIDER = "asked"


@dataclass
class Asked:
    """Every question put to the test provider's predicate."""

    redirected: list[bool] = field(default_factory=list)  # the read index is not the dst
    orders: list[tuple[str, ...]] = field(default_factory=list)  # SSU's order in effect


@pytest.fixture
def asked() -> Iterator[Asked]:
    """An SSU provider registered for CUDA only (a CPU call tries it only when a priority
    names it) whose predicate accepts every call and records each time it is asked."""
    record = Asked()

    def supports(**call) -> bool:
        dst = call["dst_state_batch_indices"]
        record.redirected.append(dst is not None and dst is not call["state_batch_indices"])
        record.orders.append(SSU.priority("cpu"))
        return True

    SSU.register_impl(PROVIDER, lambda **call: SSU.native(**call), supports=supports)
    torch._dynamo.reset()
    yield record
    SSU.unregister_impl(PROVIDER)


def copy_then_ssu(S, src, dst, x, dt, A, B, C):
    ops.copy_state_blocks(S, src, dst)
    return ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=dst)


def ssu_only(S, src, dst, x, dt, A, B, C):
    return ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=dst)


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(8, 2, 4, 16), torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2]), r(3, 2, 4),
            r(3, 2, 4), -torch.rand(2, 4, 16, generator=g), r(3, 2, 16), r(3, 2, 16))


def _run(fn, priority) -> tuple[list, torch.Tensor, torch.Tensor]:
    args = _inputs()
    want_state = args[0].clone()
    want = fn(want_state, *args[1:])  # eager, native on the CPU
    compiled = compile(fn, priority=priority)
    got = compiled(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(args[0], want_state, rtol=0, atol=0)
    return list(compiled.lowering_report), got, want


def test_a_fused_site_is_decided_once_and_keeps_the_validated_provider(asked: Asked) -> None:
    sites, _, _ = _run(copy_then_ssu, {"selective_state_update": [PROVIDER]})
    folded, ssu = sites
    assert folded.op == "copy_state_blocks" and folded.provider is None and folded.fused
    assert ssu.provider == PROVIDER and ssu.fused
    # one decision (the call as written), one check of the redirected call; no re-decision
    assert asked.redirected == [False, True]


def test_a_site_fusion_never_saw_is_decided_once(asked: Asked) -> None:
    sites, _, _ = _run(ssu_only, {"selective_state_update": [PROVIDER]})
    assert [(s.op, s.provider) for s in sites] == [("selective_state_update", PROVIDER)]
    assert asked.redirected == [False]


def test_the_passes_hand_their_priority_over_instead_of_a_context(asked: Asked) -> None:
    with mamba_ir.set_priority({"copy_state_blocks": []}):
        sites, _, _ = _run(copy_then_ssu, {"selective_state_update": [PROVIDER]})
        context_order = SSU.priority("cpu")
    # while the predicate ran, the order in effect was the caller's, not the pass's
    assert asked.orders and all(order == context_order for order in asked.orders)
    assert PROVIDER not in context_order
    assert [s.provider for s in sites] == [None, PROVIDER]


def test_explicit_priority_comes_before_the_context() -> None:
    call = COPY.bind(torch.randn(4, 3), torch.tensor([0]), torch.tensor([1]))
    calls = []

    def counted(**call):
        calls.append(1)
        return COPY.native(**call)

    COPY.register_impl(PROVIDER, counted, platforms=("cpu",))
    try:
        with mamba_ir.set_priority([]):  # native only, for every op
            assert COPY.decide(call).provider == "native"
            assert COPY.decide(call, priority=[PROVIDER]).provider == PROVIDER
            # an explicit priority that does not name the op falls through to the context
            other = {"selective_state_update": ["triton"]}
            assert COPY.decide(call, priority=other).provider == "native"
            assert COPY.priority("cpu", priority=[PROVIDER]) == (PROVIDER, "native")
        assert calls == []  # deciding never runs a provider
    finally:
        COPY.unregister_impl(PROVIDER)


def test_the_cache_key_covers_the_pass_priority_without_a_context() -> None:
    spec = {"copy_state_blocks": []}
    keyed = LoweringPass(spec).uuid()
    assert keyed != LoweringPass().uuid()
    with mamba_ir.set_priority(spec):  # the same order reached through the context
        assert LoweringPass().uuid() == keyed
