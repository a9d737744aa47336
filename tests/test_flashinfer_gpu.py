"""The FlashInfer provider against the native op on a GPU, every argument form it accepts.

Shapes are fixed: FlashInfer compiles one module per (dtypes, headdim, dstate, tokens),
about 30 s each, so the cases share six modules, built in parallel before the tests.
Each case goes through :func:`mamba_ir.testing.assert_matches_native` (outputs and
written rows within tolerance, other rows bit-identical, rows the call does not address
poisoned with NaN, outputs starting as NaN) and asserts which FlashInfer kernel it takes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from mamba_ir import get_op, set_priority
from mamba_ir.impls.flashinfer import selective_state_update as fi
from mamba_ir.testing import assert_matches_native, tolerance

pytestmark = pytest.mark.gpu
OP = get_op("selective_state_update")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
I32, I64 = torch.int32, torch.int64

# How each sequence reads and writes: source -> destination.
KINDS = ("pad->real", "real->real", "real->pad", "pad->pad", "in place")


@dataclass(frozen=True)
class Case:
    form: str = "single"  # single (batch,), multi (batch, T), spec (batch, T), varlen (spec)
    nseq: int = 5
    tokens: int = 4  # T, or the index width for varlen
    lengths: tuple[int, ...] = (1, 4, 0, 3, 2)  # varlen
    nheads: int = 8
    ngroups: int = 2
    dim: int = 64
    dstate: int = 128
    state_dtype: torch.dtype = BF16
    in_dtype: torch.dtype = BF16
    weight_dtype: torch.dtype = BF16
    D_dtype: torch.dtype | None = None  # None: weight_dtype
    A_dtype: torch.dtype = F32
    index: str | None = "1d"  # None, "1d", "2d"
    index_dtype: torch.dtype = I32
    dst_dtype: torch.dtype | None = None  # None: index_dtype
    redirect: bool = False
    pad: int = -1
    pads: bool = True
    z: bool = True
    D: bool = True
    bias: bool = True
    softplus: bool = True
    misalign: int = 0  # elements by which x and B start off a 128-byte boundary
    out_strided: bool = False
    seed: int = 0
    kernel: str = "one-token"  # the FlashInfer kernel expected

    @property
    def spec(self) -> bool:
        return self.form in ("spec", "varlen")

    @property
    def module(self) -> tuple[Any, ...]:
        """The FlashInfer module the case compiles (its JIT key, as far as it varies here)."""
        wdtypes = {self.weight_dtype, self.D_dtype or self.weight_dtype}
        weight = self.weight_dtype if len(wdtypes) == 1 else F32
        index = self.index_dtype if self.index or not self.redirect else self.dst_dtype or I32
        ntokens = 1 if self.form == "single" else self.tokens
        dtypes = (self.state_dtype, self.in_dtype, weight, self.A_dtype, index)
        return (*dtypes, self.dim, self.dstate, ntokens)


def _rows(case: Case, rng: random.Random, lengths: list[int]) -> dict[str, Any]:
    """Index tensors (as lists) that exercise every pad kind and obey the op's row rules:
    distinct destinations, and no sequence reads a row another one writes."""
    width = case.tokens if case.spec else 1
    nslots = 2 * case.nseq * width + case.nseq + 3 + (case.pad == 0)
    low = case.nseq if case.index is None else 0  # sources are the sequence numbers
    pool = [r for r in range(low, nslots) if r != case.pad]
    rng.shuffle(pool)
    kinds = [KINDS[b % len(KINDS)] if case.pads else "real->real" for b in range(case.nseq)]
    if not case.redirect:  # in place: a pad source is a pad destination
        kinds = ["pad->pad" if k.startswith("pad") else "in place" for k in kinds]
    pad = case.pad
    dst = [[pool.pop() for _ in range(width)] for _ in kinds]
    accepted = [rng.randint(0 if b == 2 else 1, max(n, 1)) for b, n in enumerate(lengths)]
    col = [max(n, 1) - 1 if case.spec else 0 for n in accepted]  # the source column
    src = []
    for b, kind in enumerate(kinds):
        if kind.endswith("->pad"):
            dst[b][0] = pad
        if kind.startswith("pad"):
            src.append(b if case.index is None else pad)
        elif kind == "in place":
            src.append(dst[b][col[b]])
        else:
            src.append(pool.pop())
    if case.index is None and pad == 0:
        src[0] = 0  # sequence 0 reads the null row: a pad source
    rows: dict[str, Any] = {"nslots": nslots, "num_accepted_tokens": accepted}
    if case.spec and case.redirect:
        rows["state_batch_indices"] = [
            [src[b] if c == col[b] else pad for c in range(width)] for b in range(case.nseq)
        ]
        rows["dst_state_batch_indices"] = dst
    elif case.spec:  # in place: the destinations, the source column holding the source
        for b in range(case.nseq):
            dst[b][col[b]] = src[b]
        if case.pads and width > 1:  # a pad destination column other than the source's
            dst[1][(col[1] + 1) % width] = pad
        rows["state_batch_indices"] = dst
    elif case.redirect:
        rows["state_batch_indices"] = None if case.index is None else src
        rows["dst_state_batch_indices"] = [r[0] for r in dst]
    elif case.index is not None:
        rows["state_batch_indices"] = src
    return rows


def build(case: Case, device: str = "cuda") -> dict[str, Any]:
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape: int, dtype: torch.dtype = case.in_dtype, scale: float = 1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    H, G, P, N = case.nheads, case.ngroups, case.dim, case.dstate
    if case.form == "varlen":
        lengths = list(case.lengths)
        if case.seed:  # other seeds draw other lengths, zero included
            lengths = [random.Random(case.seed).randint(0, case.tokens) for _ in lengths]
        lead: tuple[int, ...] = (sum(lengths),)
    else:
        lengths = [case.tokens if case.form != "single" else 1] * case.nseq
        lead = (case.nseq,) if case.form == "single" else (case.nseq, case.tokens)
    rows = _rows(case, random.Random(case.seed), lengths)

    def placed(t: torch.Tensor) -> torch.Tensor:
        if not case.misalign:
            return t
        flat = torch.empty(t.numel() + case.misalign, dtype=t.dtype, device=device)
        flat[case.misalign :] = t.flatten()
        return flat[case.misalign :].view(t.shape)

    def tied(t: torch.Tensor) -> torch.Tensor:
        """One value per head, broadcast over headdim (positive without softplus)."""
        return (t if case.softplus else t.abs()).expand(*t.shape[:-1], P)

    def index(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        values = rows.get(name)
        if values is None:
            return None
        t = torch.tensor(values, dtype=dtype, device=device)
        return t[:, None] if case.index == "2d" and t.dim() == 1 else t

    call: dict[str, Any] = {
        "state": randn(rows["nslots"], H, P, N, dtype=case.state_dtype),
        "x": placed(randn(*lead, H, P)),
        "dt": tied(randn(*lead, H, 1, dtype=case.weight_dtype, scale=0.5)),
        "A": (-torch.rand(H, 1, 1, generator=gen) - 0.5).to(device, case.A_dtype).expand(H, P, N),
        "B": placed(randn(*lead, G, N)),
        "C": randn(*lead, G, N),
        "D": randn(H, 1, dtype=case.D_dtype or case.weight_dtype).expand(H, P)
        if case.D
        else None,
        "z": randn(*lead, H, P) if case.z else None,
        "dt_bias": tied(randn(H, 1, dtype=case.weight_dtype, scale=0.5)) if case.bias else None,
        "dt_softplus": case.softplus,
        "pad_slot_id": case.pad,
        "state_batch_indices": index("state_batch_indices", case.index_dtype),
        "dst_state_batch_indices": index(
            "dst_state_batch_indices", case.dst_dtype or case.index_dtype
        ),
        "out": None,
    }
    call["out"] = torch.full_like(call["x"], float("nan"))  # every element must be written
    if case.out_strided:
        wide = torch.full((2 * lead[0], *lead[1:], H, P), float("nan"), dtype=case.in_dtype,
                          device=device)  # fmt: skip
        call["out"] = wide[::2]
    if case.spec:
        call["num_accepted_tokens"] = torch.tensor(rows["num_accepted_tokens"], device=device)
    if case.form == "varlen":
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        call["cu_seqlens"] = torch.tensor(offsets, dtype=I32, device=device)
    return OP.bind(**call)


CASES: dict[str, Case] = {
    # one token per sequence, FlashInfer's one-token kernel
    "decode": Case(index=None, pads=False),
    "decode, pads": Case(),
    "decode, 2-D indices, null row 0": Case(index="2d", pad=0),
    "decode, no D/z/dt_bias, no softplus": Case(D=False, z=False, bias=False, softplus=False),
    "decode, 40 sequences (TMA variant)": Case(nseq=40),
    "decode, int64 indices": Case(index_dtype=I64),
    "decode, fp32 state and dt": Case(state_dtype=F32, weight_dtype=F32),
    "decode, fp32 D with bf16 dt": Case(state_dtype=F32, weight_dtype=BF16, D_dtype=F32),
    "decode, fp16, headdim 128, dstate 64": Case(
        state_dtype=F16, in_dtype=F16, weight_dtype=F16, dim=128, dstate=64
    ),
    "decode, fp16, headdim 128, 40 sequences": Case(
        state_dtype=F16, in_dtype=F16, weight_dtype=F16, dim=128, dstate=64, nseq=40
    ),
    "decode, dstate 256, 40 sequences": Case(dstate=256, nseq=40),
    "decode, dstate 96, 40 sequences": Case(dstate=96, nseq=40),
    "decode, fp32 inputs, bf16 A": Case(in_dtype=F32, A_dtype=BF16),
    # one token, multi-token kernel (T=1)
    "redirect, every pad kind": Case(redirect=True, kernel="multi-token"),
    "redirect, null row 0, int64 destinations": Case(
        redirect=True, pad=0, dst_dtype=I64, kernel="multi-token"
    ),
    "redirect, only destinations, null row 0": Case(
        redirect=True, index=None, pad=0, kernel="multi-token"
    ),
    "redirect, 2-D indices": Case(redirect=True, index="2d", kernel="multi-token"),
    "redirect, 40 sequences": Case(redirect=True, nseq=40, kernel="multi-token"),
    "redirect, int64 indices": Case(redirect=True, index_dtype=I64, kernel="multi-token"),
    "redirect, fp16 headdim 128": Case(
        redirect=True, state_dtype=F16, in_dtype=F16, weight_dtype=F16, dim=128, dstate=64,
        kernel="multi-token",
    ),
    "out not contiguous": Case(out_strided=True, kernel="multi-token"),
    # several tokens per sequence
    "(batch, T)": Case(form="multi", index=None, pads=False, kernel="multi-token"),
    "(batch, T), redirect": Case(form="multi", redirect=True, kernel="multi-token"),
    "(batch, T), 2-D indices, in place": Case(form="multi", index="2d", kernel="multi-token"),
    "speculative, in place": Case(form="spec", kernel="multi-token"),
    "speculative, redirect": Case(form="spec", redirect=True, kernel="multi-token"),
    "speculative varlen, in place": Case(form="varlen", kernel="multi-token"),
    "speculative varlen, redirect, null row 0": Case(
        form="varlen", redirect=True, pad=0, kernel="multi-token"
    ),
}


def _warm(case: Case) -> str:
    """Compile one case's module (run in a separate process, so modules build in parallel)."""
    call = build(case)
    fi.selective_state_update(**call)
    torch.cuda.synchronize()
    return str(case.module)


@pytest.fixture(scope="module", autouse=True)
def modules() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    found = fi.load_flashinfer()
    if isinstance(found, str):
        pytest.skip(found)
    first = {}
    for case in CASES.values():
        first.setdefault(case.module, case)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(first), mp_context=ctx) as pool:
        list(pool.map(_warm, first.values()))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_native(name: str) -> None:
    case = CASES[name]
    call = build(case)
    how = fi.plan(call, fi.device_info(0), True)
    assert isinstance(how, fi.Plan) and how.kernel == case.kernel, how
    assert OP.impls["flashinfer"].refusal(call) is None
    assert_matches_native(OP, "flashinfer", call)


SEEDED = [n for n, c in CASES.items() if c.redirect or c.spec or c.pads]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", SEEDED)
def test_other_seeds(name: str, seed: int) -> None:
    """Other row assignments, accepted counts and (varlen) lengths on the same modules."""
    call = build(replace(CASES[name], seed=seed))
    assert OP.impls["flashinfer"].refusal(call) is None
    assert_matches_native(OP, "flashinfer", call)


def test_every_case_varies_one_thing() -> None:
    assert len({replace(c, kernel="") for c in CASES.values()}) == len(CASES)


@pytest.fixture
def multi_token_only() -> Iterator[str]:
    """The provider kept off FlashInfer's one-token kernel, registered under its own name
    for the checker (which runs a provider by name)."""
    name = "flashinfer_multi_token"
    OP.register_impl(name, functools.partial(fi.selective_state_update, one_token=False),
                     supports=fi.supports)
    yield name
    OP.unregister_impl(name)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.kernel == "one-token"])
def test_one_token_calls_on_the_multi_token_kernel(name: str, multi_token_only: str) -> None:
    """The multi-token kernel (T=1) is the fallback for one-token calls FlashInfer's
    one-token kernel cannot take (unaligned inputs, non-contiguous out)."""
    call = build(CASES[name])
    assert fi.plan(call, fi.device_info(0), True, one_token=False).kernel == "multi-token"
    assert_matches_native(OP, multi_token_only, call)


def test_unaligned_inputs() -> None:
    """x and B 16 but not 128 bytes aligned, 40 sequences (where FlashInfer's one-token
    kernel would load with TMA and reject them). Compared by hand: the checker's copies
    would be aligned."""
    call = build(Case(nseq=40, misalign=8))
    assert fi.plan(call, fi.device_info(0), True).kernel == "multi-token"
    ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    OP.native(**ref)
    fi.selective_state_update(**call)
    atol, rtol = tolerance(BF16, op=OP)
    torch.testing.assert_close(call["out"].float(), ref["out"].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(call["state"].float(), ref["state"].float(), atol=atol, rtol=rtol)


def test_refusals_fall_through_to_triton() -> None:
    """Calls FlashInfer would reject (or get wrong) go to the next provider and run."""
    refused = {
        "headdim 32": build(Case(dim=32)),
        "per-channel dt": build(Case()) | {"dt": torch.rand(5, 8, 64, device="cuda")},
        "B in fp32": build(Case()) | {"B": torch.rand(5, 2, 128, device="cuda")},
        "varlen without num_accepted_tokens": _plain_varlen(),
    }
    for name, call in refused.items():
        with set_priority({"selective_state_update": ["flashinfer", "triton"]}):
            decision = OP.decide(call)
            assert decision.provider == "triton", (name, decision)
            assert decision.skipped[0][0] == "flashinfer"
            OP(**call)  # runs: the op call goes to triton
        torch.cuda.synchronize()


def _plain_varlen() -> dict[str, Any]:
    call = build(Case(form="varlen"))
    call["num_accepted_tokens"] = None
    call["state_batch_indices"] = call["state_batch_indices"][:, 0].contiguous()
    return call


def _junk_rows(t: torch.Tensor, n: int = 3) -> torch.Tensor:
    """``t`` followed by ``n`` entries past the sequences (vLLM's CUDA-graph padding)."""
    tail = torch.full((n, *t.shape[1:]), 1 << 20, dtype=t.dtype, device=t.device)
    return torch.cat([t, tail])


def _column_of_wider(t: torch.Tensor) -> torch.Tensor:
    """The same values as a strided view: the leading columns of a wider 2-D tensor."""
    wide = torch.full((t.shape[0], (t.shape[1] if t.dim() == 2 else 1) + 1), 1 << 20,
                      dtype=t.dtype, device=t.device)
    if t.dim() == 1:
        wide[:, 0] = t
        return wide[:, 0]
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


@pytest.mark.parametrize("layout", ["column", "padded"])
@pytest.mark.parametrize("name", ["decode, pads", "redirect, every pad kind",
                                  "speculative, redirect", "speculative varlen, in place"])
def test_index_layouts(name: str, layout: str) -> None:
    """Strided (column-sliced) and padded index tensors and accepted counts, strided
    cu_seqlens."""
    call = build(CASES[name])
    change = _column_of_wider if layout == "column" else _junk_rows
    for key in ("state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens"):
        if call[key] is not None:
            call[key] = change(call[key])
    if layout == "column" and call["cu_seqlens"] is not None:
        call["cu_seqlens"] = _column_of_wider(call["cu_seqlens"])
    assert OP.impls["flashinfer"].refusal(call) is None
    assert_matches_native(OP, "flashinfer", call)


def test_accepted_counts_past_this_steps_tokens() -> None:
    """vLLM's num_accepted_tokens counts the previous step: with 4 tokens this step and 6
    source columns it may be 5 or 6 (source column 4 or 5)."""
    call = build(CASES["speculative, redirect"])
    sbi, dst = call["state_batch_indices"], call["dst_state_batch_indices"]
    nseq, width = sbi.shape
    free = sorted(set(range(call["state"].shape[0])) - set(sbi.flatten().tolist())
                  - set(dst.flatten().tolist()) - {call["pad_slot_id"]})
    wider = torch.full((nseq, width + 2), call["pad_slot_id"], dtype=sbi.dtype, device=sbi.device)
    accepted = torch.tensor([5, 6, 1, 6, 5][:nseq], device=sbi.device)
    for b in range(nseq):
        wider[b, int(accepted[b]) - 1] = free[b]
    call["state_batch_indices"], call["num_accepted_tokens"] = wider, accepted
    OP.check(call)
    assert OP.impls["flashinfer"].refusal(call) is None
    assert_matches_native(OP, "flashinfer", call)
