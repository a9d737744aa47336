"""The FlashInfer provider's predicate, pinned without a GPU or FlashInfer.

:func:`plan` is the whole predicate minus "is FlashInfer importable and are the tensors on
CUDA" (tested separately below), so the table runs on meta tensors with an injected
device. Each constraint has one accepted and one refused argument set; docs/flashinfer.md
says where each rule comes from. The pad-source rewrite runs in Triton's interpreter.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import mamba_ir
from mamba_ir import get_op, set_priority
from mamba_ir.impls.flashinfer import selective_state_update as fi

OP = get_op("selective_state_update")
H100 = fi.Device((9, 0), 232448)
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def make_call(
    *,
    device: str = "meta",
    nheads: int = 8,
    ngroups: int = 2,
    dim: int = 64,
    dstate: int = 128,
    lead: tuple[int, ...] = (4,),
    slots: int = 8,
    state_dtype: torch.dtype = BF16,
    in_dtype: torch.dtype = BF16,
    weight_dtype: torch.dtype = BF16,
    **overrides: Any,
) -> dict[str, Any]:
    """A Mamba2 decode call (tied dt, A, D, dt_bias; 1-D int32 indices), then overrides."""

    def t(*shape: int, dtype: torch.dtype = in_dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    call = {
        "state": t(slots, nheads, dim, dstate, dtype=state_dtype),
        "x": t(*lead, nheads, dim),
        "dt": t(*lead, nheads, 1, dtype=weight_dtype).expand(*lead, nheads, dim),
        "A": t(nheads, 1, 1, dtype=F32).expand(nheads, dim, dstate),
        "B": t(*lead, ngroups, dstate),
        "C": t(*lead, ngroups, dstate),
        "D": t(nheads, 1, dtype=weight_dtype).expand(nheads, dim),
        "z": t(*lead, nheads, dim),
        "dt_bias": t(nheads, 1, dtype=weight_dtype).expand(nheads, dim),
        "dt_softplus": True,
        "state_batch_indices": torch.zeros(lead[0], dtype=torch.int32, device=device),
        "pad_slot_id": -1,
        "out": t(*lead, nheads, dim),
    }
    call.update(overrides)
    return OP.bind(**call)


def spec_call(lengths: tuple[int, ...] | None = None, width: int = 4, **kw: Any) -> dict:
    """Speculative decoding: (batch, T) tokens, or packed tokens with ``cu_seqlens``."""
    nseq = 3 if lengths is None else len(lengths)
    lead = (nseq, width) if lengths is None else (sum(lengths),)
    idx = torch.zeros(nseq, width, dtype=torch.int32, device="meta")
    extra: dict[str, Any] = {"state_batch_indices": idx, "num_accepted_tokens": idx[:, 0].long()}
    if lengths is not None:
        extra["cu_seqlens"] = torch.zeros(nseq + 1, dtype=torch.int32, device="meta")
    return make_call(lead=lead, **extra, **kw)


def every_other(*shape: int, last: bool = False) -> torch.Tensor:
    """A bf16 tensor of ``shape`` made of every other row (or last-dim element) of a buffer."""
    if last:
        return torch.zeros(*shape[:-1], 2 * shape[-1], dtype=BF16, device="meta")[..., ::2]
    return torch.zeros(2 * shape[0], *shape[1:], dtype=BF16, device="meta")[::2]


def offset_view(t: torch.Tensor, elements: int) -> torch.Tensor:
    """The same shape, starting ``elements`` into its storage."""
    flat = torch.zeros(t.numel() + elements, dtype=t.dtype, device=t.device)
    return flat[elements:].view(t.shape)


def mamba1(call: dict[str, Any]) -> dict[str, Any]:
    """The same call in the Mamba1 layout (no head dimension)."""
    call = dict(call)
    call["state"] = call["state"][:, 0]
    for name in ("x", "dt", "B", "C", "z", "out"):
        call[name] = call[name][..., 0, :]
    for name in ("A", "D", "dt_bias"):
        call[name] = call[name][0]
    return call


ONE = fi.Plan("one-token")
MULTI1 = fi.Plan("multi-token", 1, False)
MULTI1_FIX = fi.Plan("multi-token", 1, True)

# (name, call, device, can_index, expected Plan or a fragment of the refusal)
TABLE: list[tuple[str, dict[str, Any], fi.Device, bool, fi.Plan | str]] = [
    ("decode", make_call(), H100, True, ONE),
    ("sm80 accepted", make_call(), fi.Device((8, 0), 166912), True, ONE),
    ("sm100 refused", make_call(), fi.Device((10, 0), 232448), True, "compute capability 10.0"),
    ("Mamba2 one head", make_call(nheads=1, ngroups=1), H100, True, ONE),
    ("Mamba1 refused", mamba1(make_call(nheads=1, ngroups=1)), H100, True, "Mamba1 layout"),
    ("no tokens: nothing to do", make_call(lead=(0,)), H100, True, fi.Plan("none")),
    # dtypes: one input dtype (x, B, C, z, out); state, A and weights independent
    ("fp32 state, bf16 inputs", make_call(state_dtype=F32), H100, True, ONE),
    ("fp16 everywhere", make_call(state_dtype=F16, in_dtype=F16, weight_dtype=F16),
     H100, True, ONE),
    ("B in another dtype", make_call(B=torch.zeros(4, 2, 128, dtype=F32, device="meta")),
     H100, True, "B is float32 but x is bfloat16"),
    ("D in fp32, dt in bf16 (widened)",
     make_call(D=torch.zeros(8, 1, device="meta").expand(8, 64)), H100, True, ONE),
    ("int64 indices", make_call(state_batch_indices=torch.zeros(4, dtype=torch.int64,
                                                                device="meta")), H100, True, ONE),
    # Mamba2 ties
    ("dt per channel", make_call(dt=torch.zeros(4, 8, 64, dtype=BF16, device="meta")),
     H100, True, "dt has strides (512, 64, 1)"),
    ("A per channel", make_call(A=torch.zeros(8, 64, 128, device="meta")),
     H100, True, "A has strides"),
    ("D per channel", make_call(D=torch.zeros(8, 64, dtype=BF16, device="meta")),
     H100, True, "D has strides"),
    ("dt_bias per channel", make_call(dt_bias=torch.zeros(8, 64, dtype=BF16, device="meta")),
     H100, True, "dt_bias has strides"),
    ("no D, z, dt_bias", make_call(D=None, z=None, dt_bias=None), H100, True, ONE),
    # sizes
    ("headdim 128", make_call(dim=128), H100, True, ONE),
    ("headdim 32", make_call(dim=32), H100, True, "headdim=32"),
    ("headdim 192", make_call(dim=192), H100, True, "headdim=192"),
    ("dstate 64", make_call(dstate=64), H100, True, ONE),
    ("dstate 256", make_call(dstate=256), H100, True, ONE),
    ("dstate 32", make_call(dstate=32), H100, True, "dstate=32"),
    ("dstate 100", make_call(dstate=100), H100, True, "dstate=100"),
    ("dstate 512", make_call(dstate=512), H100, True, "dstate=512"),
    ("more sequences than state rows", make_call(lead=(9,), slots=8),
     H100, True, "9 sequences but 8 state rows"),
    ("pad id beyond int32", make_call(pad_slot_id=2**31), H100, True, "pad_slot_id=2147483648"),
    # layouts
    ("state rows strided", make_call(state=torch.zeros(8, 16, 64, 128, dtype=BF16,
                                                       device="meta")[:, :8]), H100, True, ONE),
    ("state inner dims not contiguous",
     make_call(state=torch.zeros(8, 8, 128, 64, dtype=BF16, device="meta").transpose(2, 3)),
     H100, True, "state has strides"),
    ("state rows off 16 bytes", make_call(state=offset_view(
        torch.zeros(8, 8, 64, 128, dtype=BF16, device="meta"), 4)), H100, True, "state rows"),
    ("x strided over tokens (one-token kernel)", make_call(x=every_other(4, 8, 64)),
     H100, True, ONE),
    ("x not contiguous over headdim", make_call(x=every_other(4, 8, 64, last=True)),
     H100, True, "x has strides"),
    ("C off 16 bytes", make_call(C=offset_view(torch.zeros(4, 2, 128, dtype=BF16,
                                                           device="meta"), 4)),
     H100, True, "C must start on"),
    ("B off 128 bytes: multi-token kernel", make_call(B=offset_view(
        torch.zeros(4, 2, 128, dtype=BF16, device="meta"), 8)), H100, True, MULTI1),
    ("out not contiguous: multi-token kernel", make_call(out=every_other(4, 8, 64)),
     H100, True, MULTI1),
    # heads per group: only the multi-token kernel instantiates a fixed set of ratios
    ("6 heads per group, one-token kernel", make_call(nheads=6, ngroups=1), H100, True, ONE),
    ("6 heads per group, multi-token kernel",
     make_call(nheads=6, ngroups=1, dst_state_batch_indices=torch.zeros(4, dtype=torch.int32,
                                                                        device="meta")),
     H100, True, "nheads/ngroups=6"),
    # destination indices: multi-token kernel, with the pad-source rewrite (Triton)
    ("dst indices", make_call(dst_state_batch_indices=torch.zeros(4, dtype=torch.int64,
                                                                  device="meta")),
     H100, True, MULTI1_FIX),
    ("dst indices without triton", make_call(dst_state_batch_indices=torch.zeros(
        4, dtype=torch.int32, device="meta")), H100, False, "triton is not installed"),
    ("decode without indices, without triton", make_call(state_batch_indices=None), H100,
     False, ONE),
    ("decode with indices, without triton", make_call(), H100, False,
     "the provider bounds the index tensors with a Triton launch"),
    # several tokens
    ("(batch, T) tokens", make_call(lead=(3, 4), state_batch_indices=None),
     H100, True, fi.Plan("multi-token", 4, False)),
    ("(batch, T), 2-D indices", make_call(lead=(3, 4), state_batch_indices=torch.zeros(
        3, 1, dtype=torch.int32, device="meta")), H100, True, fi.Plan("multi-token", 4, False)),
    ("speculative (batch, T)", spec_call(), H100, True, fi.Plan("multi-token", 4, True)),
    ("speculative varlen", spec_call(lengths=(1, 4, 0), width=5),
     H100, True, fi.Plan("multi-token", 5, True)),
    ("varlen without num_accepted_tokens",
     make_call(lead=(6,), cu_seqlens=torch.zeros(4, dtype=torch.int32, device="meta"),
               state_batch_indices=None), H100, True, "cu_seqlens without num_accepted_tokens"),
    ("129 tokens per sequence", make_call(lead=(1, 129), state_batch_indices=None),
     H100, True, "at most 128"),
    ("shared memory", make_call(lead=(1, 128), dim=128, dstate=256, in_dtype=F32,
                                state_batch_indices=None), H100, True, "bytes of shared memory"),
    ("shared memory fits", make_call(lead=(1, 128), dim=64, dstate=128,
                                     state_batch_indices=None),
     H100, True, fi.Plan("multi-token", 128, False)),
]  # fmt: skip


def _validate(call: dict[str, Any]) -> None:
    """Every row is a valid call of the op, so refusals are FlashInfer's alone. (The op's
    value checks read meta tensors when no index tensor is given: skip those rows.)"""
    names = ("state_batch_indices", "dst_state_batch_indices", "cu_seqlens")
    if any(call[n] is not None for n in names):
        OP.check(call)


@pytest.mark.parametrize(("call", "device", "can_fix", "expected"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])  # fmt: skip
def test_plan(call: dict, device: fi.Device, can_fix: bool, expected: fi.Plan | str) -> None:
    _validate(call)
    got = fi.plan(call, device, can_fix)
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got, got
    else:
        assert got == expected


def test_out_in_another_dtype_is_refused_by_the_op_and_the_plan() -> None:
    """The op refuses it before any provider is asked (tests/test_validation.py); the plan
    refuses it too, for a caller of the provider's function."""
    call = make_call(out=torch.zeros(4, 8, 64, dtype=F32, device="meta"))
    with pytest.raises(ValueError, match="^out: expected dtype bfloat16 \\(that of x\\)"):
        _validate(call)
    got = fi.plan(call, H100, True)
    assert isinstance(got, str) and "out is float32 but x is bfloat16" in got


def test_every_refusal_says_flashinfer_or_what_to_do() -> None:
    for name, call, device, can_fix, expected in TABLE:
        if isinstance(expected, str):
            reason = fi.plan(call, device, can_fix)
            assert isinstance(reason, str) and len(reason) > 30, name


def test_refuses_dt_limit() -> None:
    reason = fi.plan(make_call(dt_limit=(0.0, 1.0)), H100, True)
    assert isinstance(reason, str) and reason.startswith("dt_limit")
    assert isinstance(fi.plan(make_call(), H100, True), fi.Plan)


def test_strided_and_padded_indices_are_accepted() -> None:
    """Index tensors in any layout and longer than the sequences: the provider cuts and
    copies them before launch, so the plan does not depend on them."""
    column = torch.zeros(4, 3, dtype=torch.int32, device="meta")[:, 0]
    padded = torch.zeros(9, dtype=torch.int32, device="meta")
    for idx in (column, padded):
        assert fi.plan(make_call(state_batch_indices=idx), H100, True) == fi.Plan("one-token")


@pytest.mark.parametrize("fix", [False, True])
def test_unchecked_indices_are_bounded_before_launch(fix: bool) -> None:
    """What a compiled call may pass (no value checks): rows outside the state become pads,
    accepted counts name an existing column, offsets stay within the tokens. Valid values
    are unchanged and everything comes out contiguous, from one launch."""
    if fi.triton is None:
        pytest.skip("needs triton")
    state = torch.zeros(8, 2, 1, 4)
    cu = torch.tensor([0, 3, 2, 9, 0, 1, 2, 3], dtype=torch.int32)[::2]
    sbi = torch.tensor([[1, -3], [7, 8], [2, 5], [4, 4]], dtype=torch.int32)[:3]
    dst = torch.tensor([0, -1, 6, 99])[:3, None].expand(3, 2)
    nacc = torch.tensor([0, 3, 2, 7, 1, 1])[::2]
    x = torch.zeros(5, 2, 1)
    cu, sbi, dst, nacc = fi._prepare(state, x, sbi, dst, nacc, cu, -1, fix)
    assert cu.tolist() == [0, 2, 2, 2]
    assert sbi.tolist() == [[1, -1], [7, -1], [2, 5]] and sbi.dtype == torch.int32
    assert dst.tolist() == [[0, 0], [-1, -1], [6, 6]] and dst.dtype == torch.int32
    assert nacc.tolist() == [0, 2, 1]
    assert all(t.is_contiguous() for t in (cu, sbi, dst, nacc))


def test_prepared_indices_without_speculation_take_one_column() -> None:
    """Only the final state is written: one column of each index tensor, cut to the
    batch; no index tensors, no launch."""
    if fi.triton is None:
        pytest.skip("needs triton")
    state = torch.zeros(4, 2, 1, 4)
    x = torch.zeros(2, 2, 1)
    sbi = torch.tensor([[3, 0], [9, 1], [1, 1]], dtype=torch.int64)
    dst = torch.tensor([2, 1, 0], dtype=torch.int32)
    cu, new, new_dst, nacc = fi._prepare(state, x, sbi, dst, None, None, -1, False)
    assert (cu, nacc) == (None, None)
    assert new.tolist() == [3, -1] and new_dst.tolist() == [2, 1]
    assert new_dst.dtype == torch.int64
    assert fi._prepare(state, x, None, None, None, None, -1, False) == (None,) * 4


def test_shared_memory_model() -> None:
    # bf16, 4 tokens, headdim 64, dstate 128: B 1024, C 1024, x 512, dt 16, out 1024,
    # slots 32 (ends at 3632), state prefetch from 3712: 2 stages x 16 rows x 128 x 2 bytes
    assert fi.multi_token_smem(BF16, BF16, 4, 64, 128) == 3712 + 8192


# -- availability: FlashInfer importable, tensors on CUDA ---------------------------------


def test_registered_even_without_flashinfer() -> None:
    assert "flashinfer" in OP.impls


def test_refuses_when_flashinfer_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fi, "load_flashinfer", lambda: "flashinfer is not importable (test)")
    assert OP.impls["flashinfer"].refusal(make_call()) == "flashinfer is not importable (test)"


def test_refuses_non_cuda_tensors_when_flashinfer_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fi, "load_flashinfer", lambda: print)
    assert "FlashInfer needs CUDA" in OP.impls["flashinfer"].refusal(make_call(device="cpu"))


def test_import_failure_is_a_reason_and_cached() -> None:
    fi.load_flashinfer.cache_clear()
    try:
        import flashinfer  # noqa: F401
    except Exception:
        got = fi.load_flashinfer()
        assert isinstance(got, str) and "pip install mamba-ir[flashinfer]" in got
        assert fi.load_flashinfer() is got
    else:  # pragma: no cover - FlashInfer present (GPU machine)
        assert callable(fi.load_flashinfer())


# -- fall-through: what FlashInfer refuses goes to the next provider -----------------------


@pytest.fixture
def flashinfer_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the predicate believe FlashInfer runs on these (meta) tensors, on an H100."""
    monkeypatch.setattr(fi, "runnable", lambda call: True)
    monkeypatch.setattr(fi, "device_info", lambda index: H100)


@pytest.mark.usefixtures("flashinfer_on_meta")
@pytest.mark.parametrize(
    ("name", "call"),
    [(row[0], row[1]) for row in TABLE if isinstance(row[4], str) and row[2] is H100 and row[3]],
)
def test_refused_calls_fall_through(name: str, call: dict) -> None:
    """The next provider serves it: triton where it runs on meta tensors (its interpreter,
    on a CPU machine), else native."""
    with set_priority({"selective_state_update": ["flashinfer", "triton"]}):
        decision = OP.decide(call)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert decision.provider == ("triton" if interpreted else "native"), decision
    assert decision.skipped[0] == ("flashinfer", fi.plan(call, H100, True))


@pytest.mark.usefixtures("flashinfer_on_meta")
def test_accepted_call_goes_to_flashinfer() -> None:
    with set_priority({"selective_state_update": ["flashinfer", "triton"]}):
        assert OP.decide(make_call()).provider == "flashinfer"


def test_default_priority_puts_triton_first() -> None:
    assert OP.priority("cuda")[:2] == ("triton", "flashinfer")


# -- argument rewriting --------------------------------------------------------------------

# The pad-source rewrite is a Triton kernel: on the GPU when there is one, else interpreted.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_weights_widen_together_and_fill_D() -> None:
    dt = torch.rand(3, 4, 1, dtype=BF16).expand(3, 4, 8)
    bias = torch.rand(4, 1).expand(4, 8)
    dt2, D2, bias2 = fi._weights(dt, None, bias, 4)
    assert dt2.dtype == D2.dtype == bias2.dtype == F32
    assert dt2.stride()[-2:] == (1, 0) and D2.stride() == (1, 0) and bias2.stride() == (1, 0)
    assert torch.equal(dt2, dt.float()) and not D2.any()


def test_per_head_makes_heads_contiguous() -> None:
    A = torch.rand(4, 2)[:, :1, None].expand(4, 8, 16)  # head stride 2
    got = fi._per_head(A)
    assert got.stride() == (1, 0, 0) and torch.equal(got, A)


def test_indices_one_column_unless_speculative() -> None:
    sbi = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    dst = torch.tensor([[5, 6], [7, 8]])
    pytest.importorskip("triton")
    state, x = torch.zeros(9, 1, 1, 1), torch.zeros(2, 1, 1)
    _, s, d, _ = fi._prepare(state, x, sbi, dst, None, None, -1, False)
    assert s.tolist() == [1, 3] and d.tolist() == [5, 7] and d.dtype == torch.int32
    _, s, d, _ = fi._prepare(state, x, sbi, None, torch.tensor([1, 2]), None, -1, False)
    assert s.tolist() == [[1, 2], [3, 4]] and d is s


@pytest.mark.parametrize("pad", [-1, 0])
def test_pad_sources_start_from_a_zeroed_destination(pad: int) -> None:
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    state = (torch.randn(12, 2, 4, 8, generator=g) + 3).to(DEV)
    before = state.clone()
    # (batch,) form with destinations: seq 0 pad -> 5, seq 1 real, seq 2 pad -> pad
    sbi = torch.tensor([pad, 1, pad], dtype=torch.int32, device=DEV)
    dst = torch.tensor([5, 6, pad], dtype=torch.int32, device=DEV)
    x = torch.zeros(3, 1, 2, 4, device=DEV)
    _, new, _, _ = fi._prepare(state, x, sbi, dst, None, None, pad, True)
    assert new.tolist() == [5, 1, pad] and sbi.tolist() == [pad, 1, pad]
    assert not state[5].any()
    keep = [r for r in range(12) if r != 5]
    assert torch.equal(state[keep], before[keep])


def test_pad_sources_speculative_varlen() -> None:
    pytest.importorskip("triton")
    state = (torch.randn(12, 2, 4, 8) + 3).to(DEV)
    before = state.clone()
    sbi = torch.tensor([[-1, -1, 7], [0, 1, -1], [-1, 9, 10], [-1, -1, -1]], device=DEV)
    dst = torch.tensor([[-1, 4, 5], [8, 2, -1], [3, 11, 6], [-1, -1, -1]], device=DEV)
    nacc = torch.tensor([2, 1, 1, 1], device=DEV)
    # seq 0 reads a pad, writes 4 first (column 0 is a pad); seq 2 has no tokens
    cu = torch.tensor([0, 3, 5, 5, 6], device=DEV)
    x = torch.zeros(6, 2, 4, device=DEV)
    _, new, _, _ = fi._prepare(state, x, sbi, dst, nacc, cu, -1, True)
    assert new.tolist() == [[-1, 4, 7], [0, 1, -1], [-1, 9, 10], [-1, -1, -1]]
    assert not state[4].any()
    keep = [r for r in range(12) if r != 4]
    assert torch.equal(state[keep], before[keep])


def test_module_imports_without_flashinfer() -> None:
    assert mamba_ir.get_op("selective_state_update").impls["flashinfer"].fn is (
        fi.selective_state_update
    )


def test_plan_on_fake_tensors() -> None:
    """At compile time the predicate sees fake tensors: same answers, no data pointers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        call = make_call(device="cpu")
        unaligned = make_call(device="cpu", B=offset_view(call["B"], 8))
        assert fi.plan(call, H100, True) == ONE
        assert fi.plan(unaligned, H100, True) == MULTI1
