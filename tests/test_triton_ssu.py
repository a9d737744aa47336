"""Triton selective_state_update against the native op, one test per argument form.

On CPU the kernel runs in Triton's interpreter on small shapes; the ``gpu`` tests repeat
the decode forms at Mamba2 size. Every comparison also asserts that rows the call does not
write are bit-identical afterwards (the source row under redirect included) and that every
output element is written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

import mamba_ir
from mamba_ir import get_op
from mamba_ir.testing import tolerance, touched_rows

pytest.importorskip("triton")

OP = get_op("selective_state_update")


@dataclass(frozen=True)
class Case:
    mamba1: bool = False
    nheads: int = 4
    ngroups: int = 2
    dim: int = 8
    dstate: int = 16
    nseq: int = 3
    tokens: int | None = None  # None: (batch, ...) single token; n: (batch, n, ...)
    lengths: tuple[int, ...] | None = None  # varlen (cu_seqlens)
    spec: bool = False
    index: str | None = "1d"  # None, "1d", "2d"
    index_dtype: torch.dtype = torch.int32
    pad: int = -1
    pads: bool = True
    redirect: bool = False
    state_dtype: torch.dtype = torch.float32
    in_dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32
    tied: bool = True
    z: bool = True
    D: bool = True
    bias: bool = True
    softplus: bool = True
    strided: bool = False
    limit: tuple[float, float] | None = None  # dt_limit
    bias_tied: bool | None = None  # None: as `tied`
    seed: int = 0


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a layout with a gap along the last dimension."""
    wide = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _rows(case: Case, ncols: int, lengths: list[int]) -> tuple[int, list, list]:
    """Slot count, source index rows and destination rows obeying the op's row rules."""
    rng = random.Random(case.seed)
    nslots = 2 * case.nseq * ncols + 3 + (case.pad == 0)
    pool = [r for r in range(nslots) if r != case.pad]
    rng.shuffle(pool)
    dst = [[pool.pop() for _ in range(ncols)] for _ in range(case.nseq)]
    if case.pads:
        for rows in dst:
            for j in range(ncols):
                if rng.random() < 0.25:
                    rows[j] = case.pad
    if not case.redirect:
        return nslots, dst, dst
    src = [[pool.pop() if rng.random() > 0.2 or not case.pads else case.pad
            for _ in range(ncols)] for _ in range(case.nseq)]
    return nslots, src, dst


def build(case: Case, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(case.seed)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(dtype=dtype, device=device)

    heads = () if case.mamba1 else (case.nheads,)
    groups = () if case.mamba1 else (case.ngroups,)
    if case.lengths is not None:
        lengths = list(case.lengths)
        lead = (sum(lengths),)
    elif case.tokens is not None:
        lengths = [case.tokens] * case.nseq
        lead = (case.nseq, case.tokens)
    else:
        lengths = [1] * case.nseq
        lead = (case.nseq,)
    ncols = max(lengths + [1]) if case.spec else 1
    if case.index is None:
        nslots = case.nseq + 2
        src_rows = dst_rows = [[i] for i in range(case.nseq)]
    else:
        nslots, src_rows, dst_rows = _rows(case, ncols, lengths)
    dim, dstate = case.dim, case.dstate

    state = rand(nslots, *heads, dim, dstate, dtype=case.state_dtype)
    x = rand(*lead, *heads, dim, dtype=case.in_dtype)
    if case.tied and not case.mamba1:
        dt = rand(*lead, *heads, 1, dtype=case.weight_dtype, scale=0.5).expand(x.shape)
        A = (-torch.rand(*heads, 1, 1, generator=gen) - 0.1).to(device).expand(*heads, dim, dstate)
        D = rand(*heads, 1, dtype=case.weight_dtype).expand(*heads, dim)
        bias = rand(*heads, 1, dtype=case.weight_dtype).expand(*heads, dim)
        if case.bias_tied is False:  # dt tied over headdim, its bias not
            bias = rand(*heads, dim, dtype=case.weight_dtype)
    else:
        dt = rand(*lead, *heads, dim, dtype=case.weight_dtype, scale=0.5)
        A = -torch.rand(*heads, dim, dstate, generator=gen).add(0.1).to(device)
        D = rand(*heads, dim, dtype=case.weight_dtype)
        bias = rand(*heads, dim, dtype=case.weight_dtype)
    B = rand(*lead, *groups, dstate, dtype=case.in_dtype)
    C = rand(*lead, *groups, dstate, dtype=case.in_dtype)
    z = rand(*lead, *heads, dim, dtype=case.in_dtype)
    out = torch.full_like(x, float("nan"))
    if case.strided:
        x, B, C, z, out = map(_strided, (x, B, C, z, out))
        state = _strided(state)
        if not case.tied:
            dt = _strided(dt)

    call = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, out=out, pad_slot_id=case.pad,
                D=D if case.D else None, z=z if case.z else None,
                dt_bias=bias if case.bias else None, dt_softplus=case.softplus,
                dt_limit=case.limit)
    if case.lengths is not None:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
        call["cu_seqlens"] = cu.to(case.index_dtype)
    if case.spec:
        nacc = [random.Random(case.seed + i).randint(0, n) for i, n in enumerate(lengths)]
        call["num_accepted_tokens"] = torch.tensor(nacc, dtype=case.index_dtype, device=device)
    if case.index is not None:
        def index(rows):
            t = torch.tensor(rows, dtype=case.index_dtype, device=device)
            if case.index == "2d" and t.shape[1] == 1:  # a second, unused column
                t = torch.cat([t, torch.full_like(t, case.pad)], dim=1)
            t = t if t.shape[1] > 1 or case.index == "2d" else t[:, 0]
            return _strided(t) if case.strided else t
        call["state_batch_indices"] = index(src_rows)
        if case.redirect:
            call["dst_state_batch_indices"] = index(dst_rows)
    return OP.bind(**call)


def _clone(call: dict) -> dict:
    """Copies with the same strides (gaps kept); stride-0 inputs are shared, never written."""
    out = {}
    for k, v in call.items():
        if isinstance(v, torch.Tensor) and 0 not in v.stride():
            v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
        out[k] = v
    return out


def written_rows(call: dict) -> set[int]:
    return touched_rows(OP, call)[1]


def check(call: dict) -> None:
    OP.check(call)
    assert OP.impls["triton"].refusal(call) is None
    ref, got = _clone(call), _clone(call)
    OP.native(**ref)
    with mamba_ir.set_priority({"selective_state_update": ["triton"]}):
        assert OP.decide(got).provider == "triton"
    OP.impls["triton"].fn(**got)
    atol, rtol = tolerance(call["state"].dtype, call["x"].dtype, op=OP)
    written = sorted(written_rows(call))
    keep = sorted(set(range(call["state"].shape[0])) - set(written))
    if keep:
        k = torch.tensor(keep, device=call["state"].device)
        assert torch.equal(got["state"][k], call["state"][k]), "rows not written changed"
        assert torch.equal(ref["state"][k], call["state"][k])
    if written:
        w = torch.tensor(written, device=call["state"].device)
        torch.testing.assert_close(
            got["state"][w].float(), ref["state"][w].float(), atol=atol, rtol=rtol
        )
    assert not got["out"].isnan().any(), "an output element was not written"
    torch.testing.assert_close(got["out"].float(), ref["out"].float(), atol=atol, rtol=rtol)


CASES = {
    "mamba2-tied": Case(),
    "mamba2-untied": Case(tied=False),
    "mamba1": Case(mamba1=True, tied=False),
    "mamba1-multi-token": Case(mamba1=True, tied=False, tokens=3, index="2d"),
    "no-extras": Case(z=False, D=False, bias=False, softplus=False),
    "no-indices": Case(index=None),
    "no-indices-pad-0": Case(index=None, pad=0),
    "index-2d-int64": Case(index="2d", index_dtype=torch.int64),
    "pad-0": Case(pad=0),
    "redirect": Case(redirect=True),
    "redirect-pad-0-int64": Case(redirect=True, pad=0, index_dtype=torch.int64),
    "multi-token": Case(tokens=3),
    "multi-token-redirect": Case(tokens=2, redirect=True, index="2d"),
    "varlen": Case(lengths=(2, 0, 3), nseq=3),
    "varlen-redirect-pad0": Case(lengths=(1, 3, 0, 2), nseq=4, redirect=True, pad=0),
    "spec": Case(tokens=3, spec=True, index="2d"),
    "spec-redirect": Case(tokens=3, spec=True, index="2d", redirect=True),
    "spec-varlen": Case(lengths=(3, 0, 1, 2), nseq=4, spec=True, index="2d",
                        index_dtype=torch.int64),
    "spec-varlen-redirect": Case(lengths=(2, 3, 0), spec=True, index="2d", redirect=True,
                                 pad=0),
    "bf16-state": Case(state_dtype=torch.bfloat16, in_dtype=torch.bfloat16,
                       weight_dtype=torch.bfloat16),
    "fp16-state-mixed": Case(state_dtype=torch.float16, in_dtype=torch.bfloat16),
    "bf16-multi-token": Case(state_dtype=torch.bfloat16, in_dtype=torch.float16, tokens=2),
    "strided": Case(strided=True, redirect=True),
    "strided-untied-varlen": Case(strided=True, tied=False, lengths=(2, 1, 0)),
    "odd-sizes": Case(dim=5, dstate=12, nheads=3, ngroups=1, tied=False),
    "one-group-per-head": Case(nheads=4, ngroups=4, redirect=True),
    "dt-tied-bias-not": Case(bias_tied=False),
    "dt-limit": Case(limit=(0.1, 0.6)),
    "dt-limit-untied-multi-token": Case(tied=False, limit=(0.0, 0.3), tokens=2),
}


def test_tied_case_is_tied() -> None:
    call = build(Case())
    assert call["A"].stride()[-2:] == (0, 0)
    assert call["dt"].stride(-1) == call["D"].stride(-1) == call["dt_bias"].stride(-1) == 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_native(name: str) -> None:
    check(build(CASES[name]))


def test_blocks_of_headdim() -> None:
    """A headdim spread over several programs, with a ragged last block."""
    from mamba_ir.impls.triton.selective_state_update import Config
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as ssu

    call = build(Case(dim=12, redirect=True))
    ref, got = _clone(call), _clone(call)
    OP.native(**ref)
    ssu(**got, config=Config(block_d=4, num_warps=1))
    torch.testing.assert_close(got["out"], ref["out"], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got["state"], ref["state"], atol=2e-4, rtol=2e-4)


def test_refuses_wide_state() -> None:
    call = build(Case(dstate=16))
    call["state"] = torch.empty(*call["state"].shape[:-1], 2048)
    assert "dstate" in OP.impls["triton"].refusal(call)


FULL = dict(nheads=128, ngroups=8, dim=64, dstate=128, state_dtype=torch.bfloat16,
            in_dtype=torch.bfloat16, weight_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        Case(**FULL, nseq=64),
        Case(**FULL, nseq=64, redirect=True, pad=0, index_dtype=torch.int64),
        Case(**FULL, nseq=256, redirect=True),
        Case(**FULL, nseq=16, tokens=4, spec=True, index="2d", redirect=True),
        Case(**FULL, nseq=5, lengths=(3, 0, 5, 1, 2), spec=True, index="2d"),
        Case(**FULL, nseq=8, tokens=3),
        Case(**{**FULL, "state_dtype": torch.float32}, nseq=32, strided=True),
        Case(**FULL, nseq=32, tied=False, z=False),
        Case(**FULL, nseq=64, bias_tied=False, redirect=True),
        Case(**FULL, nseq=64, limit=(0.0, 0.1)),
    ],
    ids=lambda c: (f"{c.nseq}-{c.tokens}-{c.lengths is not None}-{c.spec}-{c.redirect}"
                   f"-{c.tied}-{c.bias_tied}-{c.limit}"),
)
def test_full_size_gpu(case: Case) -> None:
    check(build(replace(case, seed=1), device="cuda"))


def test_check_impl_interpreter() -> None:
    from mamba_ir.testing import check_impl

    check_impl("selective_state_update", "triton", device="cpu", max_examples=25)


@pytest.mark.gpu
def test_check_impl_gpu() -> None:
    from mamba_ir.testing import check_impl

    check_impl("selective_state_update", "triton", device="cuda", max_examples=100)


@pytest.mark.gpu
def test_check_impl_gpu_large() -> None:
    """The harness on shapes drawn up to Mamba2 size (128 heads, headdim 64, dstate 128)."""
    from mamba_ir.testing import Sizes, check_impl

    sizes = Sizes(max_seqs=8, max_tokens=4, max_heads=128, max_dim=64, dstates=(16, 64, 128))
    check_impl("selective_state_update", "triton", device="cuda", sizes=sizes, max_examples=20)
