"""selective_scan under mamba_ir.compile: lowered once, the align copy folded into it, the
same rows as eager (checkpoints included)."""

from __future__ import annotations

import torch

from mamba_ir import ops
from mamba_ir.passes import compile

NSLOT, DIM, DSTATE = 12, 6, 4
PAD = -1


def prefill(S, src, dst, u, delta, A, B, C, qsl, init, done, ckpt):
    ops.copy_state_blocks(S, src, dst)
    return ops.selective_scan(
        u, S, delta, A, B, C, D=torch.ones(DIM), delta_softplus=True, query_start_loc=qsl,
        cache_indices=dst, has_initial_state=init, block_size=4, num_computed_tokens=done,
        checkpoint_state_indices=ckpt,
    )


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    qsl = torch.tensor([0, 9, 9, 14])  # the middle sequence is empty
    n = int(qsl[-1])
    return (
        r(NSLOT, DIM, DSTATE),
        torch.tensor([8, 9, PAD]),  # a cached prefix, one for the empty sequence, a fresh one
        torch.tensor([1, 2, 3]),
        r(n, DIM).t(), r(n, DIM).t(), -torch.rand(DIM, DSTATE, generator=g),
        r(n, DSTATE).t(), r(n, DSTATE).t(), qsl,
        torch.tensor([True, True, False]),
        torch.tensor([4, 0, 0]),
        torch.tensor([[4, 5, PAD], [PAD, PAD, PAD], [6, PAD, PAD]]),
    )


def test_copy_folds_into_the_scan_and_rows_match_eager():
    args = _inputs()
    want_state = args[0].clone()
    want = prefill(want_state, *args[1:])

    compiled = compile(prefill, fullgraph=True)
    state = args[0].clone()
    got = compiled(state, *args[1:])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)
    # the checkpoint rows were written (positions 8 and 12 of the first sequence, 4 of the last)
    assert not torch.equal(state[[4, 5, 6]], args[0][[4, 5, 6]])

    copy, scan = compiled.lowering_report
    assert (copy.op, scan.op) == ("copy_state_blocks", "selective_scan")
    assert scan.fused and copy.fused
    assert "empty sequences" in copy.fusion  # the empty sequence's row still gets its copy
