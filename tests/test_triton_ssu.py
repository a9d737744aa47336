"""Triton selective_state_update against the native op, one test per argument form.

On CPU the kernel runs in Triton's interpreter on small shapes; the ``gpu`` tests repeat
the decode forms at Mamba2 size. Every comparison also asserts that rows the call does not
write are bit-identical afterwards (the source row under redirect included, and a quantized
state's scales with its values) and that every output element is written. A quantized
state's written rows are compared as the values they encode, within one quantization step
(rounding follows the float32 arithmetic before it); the quantization itself is compared
bit for bit on states whose float32 value is known exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

import mamba_ir
from mamba_ir import get_op
from mamba_ir.ops._quant import QMAX, QUANTIZED, quantize
from mamba_ir.testing import calls, check_impl, tolerance, touched_rows

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
    scale_view: bool = False  # a quantized state's scales a view of a wider cache
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


def _state(
    case: Case, h: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 values ``h`` as the case's state (and scales): quantized blocks of mixed
    magnitudes, some all zero, so that every block gets a scale of its own."""
    if case.state_dtype not in QUANTIZED:
        return h.to(case.state_dtype), None
    magnitude = torch.tensor([1.0, 0.0, 1e-6, 30.0])[
        torch.randint(0, 4, h.shape[:-1], generator=gen)].to(h.device)
    q, scale = quantize(h * magnitude[..., None], case.state_dtype)
    if case.scale_view:  # every other row of a cache of twice the rows
        wide = torch.full((scale.shape[0], 2, *scale.shape[1:]), float("nan"),
                          device=scale.device)
        wide[:, 1] = scale
        scale = wide[:, 1]
    return q, scale


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

    state, scale = _state(case, rand(nslots, *heads, dim, dstate), gen)
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
        scale = None if scale is None else _strided(scale)
        if not case.tied:
            dt = _strided(dt)

    call = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, out=out, pad_slot_id=case.pad,
                D=D if case.D else None, z=z if case.z else None,
                dt_bias=bias if case.bias else None, dt_softplus=case.softplus,
                dt_limit=case.limit, state_scale=scale)
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


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of ``t``'s elements (float8 has no equality on every device)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _members(call: dict) -> tuple[str, ...]:
    return ("state",) if call["state_scale"] is None else ("state", "state_scale")


def assert_rows_close(got: dict, ref: dict, rows: torch.Tensor, atol: float, rtol: float) -> None:
    """The state ``rows`` of two results agree: as floats, or a quantized state as the
    values it encodes, within one quantization step of either."""
    if got["state_scale"] is None:
        torch.testing.assert_close(
            got["state"][rows].float(), ref["state"][rows].float(), atol=atol, rtol=rtol
        )
        return
    (got_v, got_step), (ref_v, ref_step) = (
        OP.rows.value({name: c[name][rows] for name in _members(c)}) for c in (got, ref)
    )
    err = (got_v - ref_v).abs()
    bad = ~(err <= atol + rtol * ref_v.abs() + torch.maximum(got_step, ref_step))
    assert not bad.any(), f"{int(bad.sum())} state values differ, worst {float(err[bad].max())}"


def check(call: dict, **tuning) -> None:
    OP.check(call)
    assert OP.impls["triton"].refusal(call) is None
    ref, got = _clone(call), _clone(call)
    OP.native(**ref)
    with mamba_ir.set_priority({"selective_state_update": ["triton"]}):
        assert OP.decide(got).provider == "triton"
    OP.impls["triton"].fn(**got, **tuning)
    atol, rtol = tolerance(call["state"].dtype, call["x"].dtype, op=OP)
    written = sorted(written_rows(call))
    keep = sorted(set(range(call["state"].shape[0])) - set(written))
    if keep:
        k = torch.tensor(keep, device=call["state"].device)
        for name in _members(call):
            assert torch.equal(_bits(got[name][k]), _bits(call[name][k])), (
                f"{name}: rows not written changed")
            assert torch.equal(_bits(ref[name][k]), _bits(call[name][k]))
    if written:
        assert_rows_close(got, ref, torch.tensor(written, device=call["state"].device),
                          atol, rtol)
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
    # quantized states: every layout and token form, each dtype somewhere
    "int16": Case(state_dtype=torch.int16, redirect=True),
    "int8-mamba1-multi-token": Case(state_dtype=torch.int8, mamba1=True, tied=False, tokens=3,
                                    index="2d"),
    "fp8-varlen-redirect-pad0": Case(state_dtype=torch.float8_e4m3fn, lengths=(1, 3, 0, 2),
                                     nseq=4, redirect=True, pad=0),
    "int8-spec-varlen-redirect": Case(state_dtype=torch.int8, lengths=(2, 3, 0), spec=True,
                                      index="2d", redirect=True, pad=0),
    "fp8-spec-untied": Case(state_dtype=torch.float8_e4m3fn, tokens=3, spec=True, index="2d",
                            tied=False, in_dtype=torch.bfloat16),
    "int16-strided-scale-view": Case(state_dtype=torch.int16, strided=True, scale_view=True,
                                     redirect=True, tokens=2, index="2d"),
    "int8-no-indices-odd-sizes": Case(state_dtype=torch.int8, index=None, dim=5, dstate=12,
                                      nheads=3, ngroups=1, tied=False, scale_view=True),
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


@pytest.mark.parametrize("dtype", QUANTIZED, ids=str)
def test_blocks_of_headdim_quantized(dtype: torch.dtype) -> None:
    """Several programs per head, each storing the scales of its own rows."""
    from mamba_ir.impls.triton.selective_state_update import Config

    check(build(Case(dim=10, state_dtype=dtype, redirect=True)),
          config=Config(block_d=4, num_warps=1))


def test_quantized_tile_sizes_by_bytes() -> None:
    """The tile holds 4 KiB of state whatever the element: twice the rows at one byte, on
    twice the warps, so that a thread holds a bf16 tile's 64 float32 values."""
    from mamba_ir.impls.triton.selective_state_update import Config, default_config

    assert default_config(64, 128, 2) == Config(16, 1)  # measured: unchanged
    assert default_config(64, 128, 1) == Config(32, 2)
    for block_n in (16, 64, 128, 256, 1024):
        for state_bytes in (1, 2, 4):
            for heads in (1, 1 << 20):
                c = default_config(64, block_n, state_bytes, heads)
                assert c.block_d * block_n // (32 * c.num_warps) <= 64, (block_n, c)


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
    check_impl("selective_state_update", "triton", device="cpu", max_examples=25)


def test_check_impl_interpreter_quantized() -> None:
    """The harness on quantized states alone: Triton accepts each it draws."""
    quantized = calls("selective_state_update").filter(lambda c: c["state_scale"] is not None)
    check_impl("selective_state_update", "triton", device="cpu", strategy=quantized,
               max_examples=10, min_accepted=10)


# -- the quantization, bit for bit ---------------------------------------------------------


def _crafted_blocks(dtype: torch.dtype) -> list[list[float]]:
    """Blocks of 16 values for ``dtype``: ties (the block's maximum is QMAX, so the
    inverse is 1 and the values are stored as given), an all-zero block, blocks with inf
    or NaN, tiny and huge blocks, and random ones."""
    q, inf, nan = QMAX[dtype], float("inf"), float("nan")
    if dtype.is_floating_point:  # e4m3 ties: 17, 19 (step 2), 200 (16), 440 (32), subnormal
        sub = 2.0**-10  # half of e4m3's smallest subnormal step
        ties = [q, 17.0, -17.0, 19.0, -19.0, 200.0, 440.0, -440.0, sub, -sub, 3 * sub,
                -3 * sub, 5 * sub, 2.0**-6 + sub, 0.0, 300.0]
    else:
        ties = [q, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 4.5, -6.5, 100.5, 0.0, 1.0, -1.0,
                q - 0.5, -q + 0.5]
    gen = torch.Generator().manual_seed(3)

    def rand(scale: float) -> list[float]:
        return (torch.randn(16, generator=gen) * scale).tolist()

    single = [0.0] * 16
    single[5] = -3.7
    blocks = [ties, [0.0] * 16, [1.0] * 15 + [inf], [-inf] + [2.0] * 15,
              [0.5] * 7 + [nan] + [0.5] * 8, [inf, nan] + [0.0] * 14, single,
              rand(1e-30), rand(1e37), rand(1.0), rand(1e-3), rand(3e4)]
    blocks += [rand(10.0 ** e) for e in (-12, -5, 0, 2, 6, 20)]
    return blocks + _rounding_deciders(dtype, gen)


def _rounding_deciders(dtype: torch.dtype, gen: torch.Generator, count: int = 8) -> list:
    """Blocks in which how a division is rounded shows. ``[absmax, 0, ...]``: the scale
    absmax / QMAX correctly rounded differs from absmax times a rounded 1 / QMAX (what
    torch computes on CUDA). ``[absmax, v, 0, ...]``: native's inverse (``qmax / absmax``,
    a reciprocal times qmax) and the correctly rounded one differ, and ``v`` times either
    lands on different sides of a half step (random blocks meet one once in thousands)."""
    q, n = QMAX[dtype], 1 << 14
    a = (1 + torch.rand(n, generator=gen)) * torch.exp2(
        torch.randint(-30, 30, (n,), generator=gen).float())
    by_reciprocal = a * torch.tensor(1 / q, dtype=torch.float32)
    scales = [[float(x)] + [0.0] * 15 for x in a[a / q != by_reciprocal][:count]]
    native, exact = q / a, torch.full_like(a, q) / a
    a, native, exact = (t[native != exact] for t in (a, native, exact))
    if dtype.is_floating_point:  # midpoints of neighbouring positive e4m3 values
        grid = torch.arange(1, 127, dtype=torch.uint8).view(dtype).float()
        ties = (grid[:-1] + grid[1:]) / 2
        tie = ties[torch.randint(0, len(ties), a.shape, generator=gen)]
    else:
        tie = torch.randint(0, int(q), a.shape, generator=gen).float() + 0.5
    v = tie / native
    for _ in range(2):  # the neighbours of the value that lands on the tie
        v = torch.cat([v, torch.nextafter(v, v * 2), torch.nextafter(v, v * 0)])
    a, native, exact = (t.repeat(9) for t in (a, native, exact))

    def stored(inverse: torch.Tensor) -> torch.Tensor:
        w = v * inverse
        return w.to(dtype).float() if dtype.is_floating_point else w.round()

    pick = (stored(native) != stored(exact)) & (v <= a)
    assert int(pick.sum()) >= count, "too few deciding values: widen the search"
    values = [[float(x), float(y)] + [0.0] * 14
              for x, y in zip(a[pick][:count], v[pick][:count], strict=True)]
    return scales + values


def crafted_call(dtype: torch.dtype, device: str = "cpu") -> tuple[dict, torch.Tensor]:
    """A one-token call from zero states (pad sources) with dt = 1 and no bias, so each
    new state is exactly ``x * B``; and that state. Heads have their own group, so every
    (sequence, head) has its own block of B; headdim rows scale it by 1 (ties stay
    ties), -0.7, 0.3 and 0 (one float32 rounding, as the kernel's)."""
    blocks = _crafted_blocks(dtype)
    nheads, dim, dstate = 4, 4, 16
    nseq = -(-len(blocks) // nheads)
    blocks += [[1.0] * dstate] * (nseq * nheads - len(blocks))
    B = torch.tensor(blocks, dtype=torch.float32).view(nseq, nheads, dstate)
    x = torch.tensor([1.0, -0.7, 0.3, 0.0]).expand(nseq, nheads, dim)
    h = x[..., None] * B[:, :, None, :] + 0.0  # 0 * decay + dt * x * B, in float32
    state, scale = quantize(torch.zeros(nseq + 1, nheads, dim, dstate), dtype)
    call = dict(state=state, x=x.contiguous(), dt=torch.ones(nseq, nheads, 1).expand(x.shape),
                A=-torch.ones(nheads, 1, 1).expand(nheads, dim, dstate), B=B,
                C=torch.randn(nseq, nheads, dstate, generator=torch.Generator().manual_seed(4)),
                state_batch_indices=torch.full((nseq,), -1),
                dst_state_batch_indices=torch.arange(1, nseq + 1), state_scale=scale,
                out=torch.empty(x.shape))
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    return OP.bind(**call), h


def assert_quantized_exactly(dtype: torch.dtype, device: str, provider: str) -> None:
    """``provider`` stores the crafted states as ``quantize`` on the CPU does, bit for bit
    (scales: NaN where it is NaN)."""
    call, h = crafted_call(dtype, device)
    want_q, want_scale = quantize(h, dtype)
    got = _clone(call)
    OP.impls[provider].fn(**got)
    q, scale = got["state"][1:].cpu(), got["state_scale"][1:].cpu()
    assert torch.equal(_bits(q), _bits(want_q)), (
        f"{provider}: {int((_bits(q) != _bits(want_q)).sum())} values differ")
    same = (scale.view(torch.int32) == want_scale.view(torch.int32)) | (
        scale.isnan() & want_scale.isnan())
    assert same.all(), f"{provider}: scales differ at {same.logical_not().nonzero()[:4]}"


@pytest.mark.parametrize("provider", ["native", "triton"])
@pytest.mark.parametrize("dtype", QUANTIZED, ids=str)
def test_quantization_bit_for_bit(dtype: torch.dtype, provider: str) -> None:
    assert_quantized_exactly(dtype, "cpu", provider)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", QUANTIZED, ids=str)
def test_quantization_bit_for_bit_gpu(dtype: torch.dtype) -> None:
    """The compiled kernel: correctly rounded divisions, the rounding add not fused with
    the product, the GPU's own float8 conversion; against the definition on the CPU."""
    assert_quantized_exactly(dtype, "cuda", "triton")


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="torch on CUDA divides by a Python scalar as a "
                   "multiply by its rounded reciprocal: native's absmax / qmax is not "
                   "correctly rounded there (mamba_ir/ops/_quant.py)")
@pytest.mark.parametrize("dtype", QUANTIZED, ids=str)
def test_native_quantization_on_cuda_is_the_cpus(dtype: torch.dtype) -> None:
    assert_quantized_exactly(dtype, "cuda", "native")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", QUANTIZED, ids=str)
@pytest.mark.parametrize("redirect", [False, True], ids=["in-place", "redirect"])
def test_full_size_quantized_gpu(dtype: torch.dtype, redirect: bool) -> None:
    """Mamba2 decode at full size, batch 256, against native."""
    check(build(Case(**{**FULL, "state_dtype": dtype}, nseq=256, redirect=redirect,
                     scale_view=redirect, seed=2), device="cuda"))


@pytest.mark.gpu
def test_check_impl_gpu() -> None:
    from mamba_ir.testing import check_impl

    check_impl("selective_state_update", "triton", device="cuda", max_examples=100)


@pytest.mark.gpu
def test_check_impl_gpu_quantized() -> None:
    quantized = calls("selective_state_update", device="cuda").filter(
        lambda c: c["state_scale"] is not None)
    check_impl("selective_state_update", "triton", device="cuda", strategy=quantized,
               max_examples=20, min_accepted=20)


@pytest.mark.gpu
def test_check_impl_gpu_large() -> None:
    """The harness on shapes drawn up to Mamba2 size (128 heads, headdim 64, dstate 128)."""
    from mamba_ir.testing import Sizes, check_impl

    sizes = Sizes(max_seqs=8, max_tokens=4, max_heads=128, max_dim=64, dstates=(16, 64, 128))
    check_impl("selective_state_update", "triton", device="cuda", sizes=sizes, max_examples=20)


def test_quantized_variants_compile_for_sm90() -> None:
    """What the bit-exact quantization needs of the compiler, in each quantized variant's
    PTX: correctly rounded divisions (no approximate one beyond the bf16 state kernel's,
    the z gate's sigmoid), no rounding add fused into an FMA with the product before it,
    float8 written by the round-to-nearest-even conversion; and no register spills (the
    Mamba2 decode launch of a float8 state with stochastic rounding uses about 250)."""
    from compile_sm90 import run

    report = run("compile_ssu_quant.py")
    forms = ("decode", "speculative", "sr")
    assert sorted(report) == sorted([f"{str(d).removeprefix('torch.')}-{f}"
                                     for d in (torch.bfloat16, *QUANTIZED) for f in forms]
                                    + ["bfloat16-stream", "int8-stream"])
    for variant, ptx in report.items():
        float_state = report[f"bfloat16-{variant.split('-')[1]}"]
        assert ptx["approx_div"] == float_state["approx_div"], (variant, ptx)
        if not variant.startswith("bfloat16"):
            assert ptx["div_rn"] > float_state["div_rn"], (variant, ptx)
        assert ptx["fused_rounding"] == 0, (variant, ptx)
        assert (ptx["e4m3_rn"] > 0) == variant.startswith("float8"), (variant, ptx)
        assert ptx["spill_bytes"] == 0, (variant, ptx)
