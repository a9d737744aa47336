"""Triton mamba_chunk_scan against the native op.

Each comparison runs through ``assert_matches_native``: outputs and written rows agree
within the dtype tolerance, rows the call does not write stay bit-identical, rows it does
not address are NaN-poisoned, outputs start as NaN. On CPU the kernels run in Triton's
interpreter on small shapes; the ``gpu`` tests repeat at Mamba2 size and check the fp32
carry against float64.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

from mamba_ir import get_op
from mamba_ir.testing import assert_matches_native, touched_rows

pytest.importorskip("triton")

from mamba_ir.impls.triton.mamba_chunk_scan import (  # noqa: E402
    Config,
    chunk_bound,
)

OP = get_op("mamba_chunk_scan")
PAD = -1


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...] = (9, 0, 1, 8, 5)
    done: tuple[int, ...] | None = (2, 0, 3, 0, 4)  # num_computed_tokens (cut to lengths)
    chunk: int = 4
    block: int = 0  # block_size (checkpoints)
    nheads: int = 2
    ngroups: int = 1
    dim: int = 8
    dstate: int = 16
    redirect: bool = False  # distinct source and destination rows
    pads: bool = False  # a pad source (zero state) and a pad destination
    in_dtype: torch.dtype = torch.float32
    state_dtype: torch.dtype = torch.float32
    sliced: bool = False  # x, B, C, z, dt, out, state, indices as views with gaps
    d_shape: str | None = "head"  # None, "head", "channel"
    z: bool = True
    bias: bool = True
    softplus: bool = True
    limit: tuple[float, float] | None = None
    seed: int = 0


def _columns(lengths, done, block) -> list[int]:
    pairs = zip(done, lengths, strict=True)
    return [(d + n) // block - d // block if block else 0 for d, n in pairs]


def build(case: Case, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    rng = random.Random(case.seed)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    nseq, ntok = len(case.lengths), sum(case.lengths)
    h, p, n, g = case.nheads, case.dim, case.dstate, case.ngroups
    done = ([*case.done, *[0] * nseq] if case.done is not None else [0] * nseq)[:nseq]
    cols = _columns(case.lengths, done, case.block)
    ncols = max(cols, default=0) + 1  # one spare column: unused columns are ignored
    nslots = nseq * (2 + ncols) + 3
    pool = list(range(nslots))
    rng.shuffle(pool)
    dst = [pool.pop() for _ in range(nseq)]
    src = [pool.pop() for _ in range(nseq)] if case.redirect else list(dst)
    ckpt = [[pool.pop() if rng.random() < 0.8 else PAD for _ in range(ncols)] for _ in range(nseq)]
    if case.pads:
        src[0] = PAD
        dst[-1] = PAD
        if not case.redirect:
            src[-1] = PAD

    if case.sliced:  # the model's layout: column slices of one projection, a larger cache
        width = h * p + 2 * g * n
        zxbc = rand(ntok, h * p + width + h + 3, dtype=case.in_dtype)
        z, xbc, dt = zxbc[:, 1:-2].split([h * p, width, h], dim=-1)
        x, B, C = xbc.split([h * p, g * n, g * n], dim=-1)
        x, z = x.unflatten(-1, (h, p)), z.unflatten(-1, (h, p))
        B, C = B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
        dt = dt * 0.5
        cache = rand(nslots + 3, h, p, 2 * n, dtype=case.state_dtype)
        state = cache[2 : nslots + 2, :, :, ::2]
        out = torch.full((ntok, h, 2 * p), float("nan"), dtype=case.in_dtype,
                         device=device)[:, :, 1::2]
    else:
        x, z = rand(ntok, h, p, dtype=case.in_dtype), rand(ntok, h, p, dtype=case.in_dtype)
        B, C = rand(ntok, g, n, dtype=case.in_dtype), rand(ntok, g, n, dtype=case.in_dtype)
        dt = rand(ntok, h, dtype=case.in_dtype, scale=0.5)
        state = rand(nslots, h, p, n, dtype=case.state_dtype)
        out = None

    def index(rows):
        t = torch.tensor(rows, dtype=torch.int32, device=device)
        if case.sliced:  # a column of a wider 2-D tensor
            wide = torch.full((t.shape[0], 3, *t.shape[1:]), 99, dtype=t.dtype, device=device)
            wide[:, 1] = t
            t = wide[:, 1]
        return t

    cu = torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], device=device)
    D = {None: None, "head": rand(h), "channel": rand(h, p)}[case.d_shape]
    bias = rand(h, scale=0.5)
    if not case.softplus:
        dt, bias = dt.abs(), bias.abs()
    return OP.bind(
        state, x, dt, -rand(h).exp(), B, C, case.chunk, cu,
        D=D, z=z if case.z else None, dt_bias=bias if case.bias else None,
        dt_softplus=case.softplus, dt_limit=case.limit,
        state_batch_indices=index(src),
        dst_state_batch_indices=index(dst) if case.redirect else None,
        pad_slot_id=PAD, block_size=case.block,
        num_computed_tokens=index(done) if case.done is not None else None,
        checkpoint_state_indices=index(ckpt).reshape(nseq, ncols) if case.block else None,
        out=out,
    )


def native_and_copy(call: dict) -> tuple[dict, dict]:
    """Two copies of ``call``: native run on the first, the second left for a provider."""
    ref, got = ({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
                for _ in range(2))
    OP.native(**ref)
    return ref, got


def check(call: dict) -> None:
    assert OP.impls["triton"].refusal(call) is None, OP.impls["triton"].refusal(call)
    assert_matches_native(OP, "triton", call)


CASES = {
    # chunk boundaries inside sequences and at both ends, a 1-token and an empty sequence
    "boundaries": Case(),
    "from-zero": Case(done=None, lengths=(5, 4)),
    "checkpoints": Case(block=4, redirect=True),
    "checkpoints-two-chunks-per-block": Case(block=8, lengths=(17, 3, 0, 8), done=(5, 6, 0, 0)),
    "checkpoint-at-sequence-end": Case(block=4, lengths=(6, 4), done=(2, 4)),
    "in-place-checkpoints-pads": Case(block=4, pads=True),
    "odd-chunk": Case(chunk=6, block=12, lengths=(13, 2, 8), done=(1, 11, 0)),
    "chunk-1": Case(chunk=1, block=2, lengths=(3, 1, 0), done=(0, 1, 0)),
    "strided-views": Case(sliced=True, redirect=True, block=4, pads=True),
    "strided-in-place": Case(sliced=True, d_shape="channel", lengths=(6, 0, 5)),
    "no-extras": Case(d_shape=None, z=False, bias=False, softplus=False, lengths=(5, 3)),
    "dt-limit-redirect-pads": Case(limit=(0.05, 0.3), d_shape="channel", redirect=True,
                                   pads=True),
    "fp16": Case(in_dtype=torch.float16, state_dtype=torch.float16, block=4),
    "bf16-state-fp32-inputs": Case(state_dtype=torch.bfloat16, lengths=(3, 6)),
    "bf16": Case(in_dtype=torch.bfloat16, state_dtype=torch.bfloat16, sliced=True,
                 lengths=(5, 1, 0)),
    "groups": Case(nheads=4, ngroups=2, lengths=(6, 3)),
    "odd-sizes": Case(nheads=3, ngroups=1, dim=5, dstate=3, lengths=(7, 2)),
    "one-group-per-head": Case(nheads=2, ngroups=2, dim=1, dstate=1, lengths=(6, 1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_native(name: str) -> None:
    check(build(CASES[name]))


SMALL = Config(dt_block_h=2, state_block_p=16, state_block_n=16, state_block_t=16,
               state_warps=1, pass_block_p=16, cb_block=16, scan_block_m=16,
               scan_block_k=16, scan_block_p=16, scan_warps=1)


# chunks of several token blocks under SMALL: every kernel loop runs more than once
SEVERAL_BLOCKS = Case(chunk=32, block=32, lengths=(40, 9, 1), done=(20, 0, 31), dim=20,
                      dstate=32, nheads=4, ngroups=2, redirect=True)


@pytest.mark.parametrize(
    "variant",
    [{}, dict(scan_block_m=32, scan_block_k=32, scan_diag_k=16, single_chunk_pass=False,
          scan_d_diag=False)],
    ids=["row-blocks", "cb-blocks-under-row-blocks-diagonal-steps-no-single-d-epilogue"],
)
def test_loops_over_blocks(variant: dict) -> None:
    """Chunks of several token blocks, headdim and dstate over several programs, several
    output blocks per chunk, heads over several step-size programs: every loop runs more
    than once."""
    from mamba_ir.impls.triton.mamba_chunk_scan import mamba_chunk_scan as scan

    small = replace(SMALL, **variant)
    call = build(SEVERAL_BLOCKS)
    call["out"] = torch.empty_like(call["x"])
    ref, got = native_and_copy(call)
    scan(**got, config=small)
    torch.testing.assert_close(got["out"], ref["out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["state"], ref["state"], atol=1e-4, rtol=1e-4)


def test_unwritten_scratch_never_reaches_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels load scratch without masks: the scan its decay sums, step sizes and C B^T
    blocks past a chunk's end and above the diagonal (C B^T blocks smaller than the scan's
    row blocks), the chunk states their token weights past a chunk's end. With every float
    of scratch starting as NaN, outputs and states still match native."""
    from mamba_ir.impls.triton.mamba_chunk_scan import mamba_chunk_scan as scan

    call = build(SEVERAL_BLOCKS)
    call["out"] = torch.empty_like(call["x"])
    ref, got = native_and_copy(call)
    empty = torch.empty

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    scan(**got, config=replace(SMALL, scan_block_m=32, scan_block_k=32, scan_diag_k=16))
    monkeypatch.undo()
    torch.testing.assert_close(got["out"], ref["out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["state"], ref["state"], atol=1e-4, rtol=1e-4)


def test_half_contributions_fp16() -> None:
    """Chunk contributions stored in fp16 (the carried state stays fp32): within fp16
    rounding of the native result, on a case of several chunks per sequence."""
    from mamba_ir.impls.triton.mamba_chunk_scan import mamba_chunk_scan as scan

    call = build(Case(in_dtype=torch.float16, chunk=4, lengths=(13, 6), done=(1, 0),
                      block=4, redirect=True))
    call["out"] = torch.empty_like(call["x"])
    ref, got = native_and_copy(call)
    scan(**got, config=replace(SMALL, contrib_half=True))
    for a, b in ((got["out"], ref["out"]), (got["state"], ref["state"])):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 1e-2 * b.float().abs().max().item(), err


def test_empty_calls_write_nothing() -> None:
    for lengths in ((0, 0), ()):
        call = build(Case(lengths=lengths, done=None, redirect=True))
        before = call["state"].clone()
        OP.impls["triton"].fn(**{**call, "out": torch.empty_like(call["x"])})
        assert torch.equal(call["state"], before)


def test_chunk_bound_covers_every_split() -> None:
    rng = random.Random(0)
    for _ in range(500):
        chunk = rng.choice([1, 3, 4, 16, 256])
        lengths = [rng.choice([0, 1, rng.randint(0, 3 * chunk)]) for _ in range(rng.randint(1, 6))]
        done = [rng.randint(0, 4 * chunk) for _ in lengths]
        count = sum(-(-(d % chunk + n) // chunk) for d, n in zip(done, lengths, strict=True) if n)
        assert count <= chunk_bound(sum(lengths), len(lengths), chunk)


def test_refusals() -> None:
    refuse = OP.impls["triton"].refusal
    assert "multiple of chunk_size" in refuse(build(Case(chunk=4, block=6, done=None)))
    assert "chunk_size=512" in refuse(build(Case(chunk=512)))
    call = build(Case())
    call["state"] = torch.empty(*call["state"].shape[:-1], 512)
    assert "dstate" in refuse(call)


def test_check_impl_interpreter() -> None:
    from mamba_ir.testing import check_impl

    check_impl("mamba_chunk_scan", "triton", device="cpu", max_examples=10)


FULL = dict(nheads=128, ngroups=8, dim=64, dstate=128, chunk=256,
            in_dtype=torch.bfloat16, state_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        Case(**FULL, lengths=(700, 1, 0, 300, 1100), done=(100, 0, 0, 256, 37), block=512,
             redirect=True, pads=True, sliced=True),
        Case(**FULL, lengths=(2048,), done=None, sliced=True),
        Case(**{**FULL, "state_dtype": torch.float32}, lengths=(257, 255, 256, 1),
             done=(255, 1, 0, 0), block=256),
        Case(**{**FULL, "in_dtype": torch.float16}, lengths=(600, 90), done=(5, 0),
             d_shape="channel", limit=(0.0, 0.5)),
    ],
    ids=["mixed-ckpt-redirect", "one-2k", "fp32-state-ckpt", "fp16"],
)
def test_full_size_gpu(case: Case) -> None:
    """At Mamba2 size the chunked products round their operands to the 16-bit input dtype
    (as every chunked scan does), so results are compared against the scale of the native
    result rather than element by element; unwritten rows must still be bit-identical."""
    _full_size(case)


# launch variants the benchmark sweeps (benchmarks/chunk_scan.py), checked at full size
VARIANTS = {
    "fp32-contributions": dict(contrib_half=False),
    "no-register-cap": dict(scan_maxnreg=0),
    "previous-default": dict(scan_block_k=32, state_maxnreg=0),
    "rows-128": dict(scan_block_m=128, scan_warps=8),
    "diagonal-steps-64": dict(scan_diag_k=64),
    "no-single-chunk-pass": dict(single_chunk_pass=False),
    "d-in-epilogue": dict(scan_d_diag=False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_full_size_gpu(variant: str) -> None:
    case = Case(**FULL, lengths=(700, 1, 0, 300, 1100), done=(100, 0, 0, 256, 37),
                block=512, redirect=True, pads=True, sliced=True)
    _full_size(case, replace(Config(), **VARIANTS[variant]))


def _full_size(case: Case, config: Config | None = None) -> None:
    call = build(replace(case, seed=1), device="cuda")
    call["out"] = torch.full_like(call["x"], float("nan"))
    assert OP.impls["triton"].refusal(call) is None
    OP.check(call)
    ref, got = native_and_copy(call)
    OP.impls["triton"].fn(**got, config=config)
    written = sorted(touched_rows(OP, call)[1])
    keep = sorted(set(range(call["state"].shape[0])) - set(written))
    assert torch.equal(got["state"][keep], call["state"][keep]), "rows not written changed"
    assert not got["out"].isnan().any(), "an output element was not written"
    for name, a, b in (("out", got["out"], ref["out"]),
                       ("state", got["state"][written], ref["state"][written])):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 1e-2 * b.float().abs().max().item() + 1e-3, (name, err)


@pytest.mark.gpu
def test_check_impl_gpu() -> None:
    from mamba_ir.testing import check_impl

    check_impl("mamba_chunk_scan", "triton", device="cuda", max_examples=25)


def _float64_final_state(call: dict) -> torch.Tensor:
    """One sequence from zero state, in float64, vectorised over heads."""
    x, B, C = (call[k].double() for k in ("x", "B", "C"))
    dt = torch.nn.functional.softplus(call["dt"].double() + call["dt_bias"].double())
    A = call["A"].double()
    rep = x.shape[1] // B.shape[1]
    h = torch.zeros(*call["state"].shape[1:], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        b = B[t].repeat_interleave(rep, 0)
        step = (dt[t, :, None] * x[t])[..., None] * b[:, None]
        h = h * torch.exp(A * dt[t])[:, None, None] + step
    return h


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("in_dtype", "variant"),
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, dict(contrib_half=False))],
    ids=["fp32", "bf16", "bf16-fp32-contributions"],
)
def test_state_carried_in_fp32_gpu(in_dtype: torch.dtype, variant: dict) -> None:
    """16 chunks of one sequence into an fp32 state: with fp32 inputs the result is as
    close to float64 as the fp32 native op (no rounding between chunks); with bf16 inputs
    the error stays at the bf16 rounding of one chunk's products, also when each chunk's
    contribution is stored in bf16 before it joins the fp32 carry."""
    case = Case(lengths=(4096,), done=None, chunk=256, nheads=8, ngroups=2, dim=64,
                dstate=128, in_dtype=in_dtype, d_shape=None, z=False)
    call = build(case, device="cuda")
    call["state_batch_indices"] = torch.tensor([PAD], device="cuda")
    call["dst_state_batch_indices"] = torch.tensor([1], device="cuda")
    call["out"] = torch.empty_like(call["x"])
    exact = _float64_final_state(call)
    scale = exact.abs().max()
    got, ref = dict(call), {**call, "state": call["state"].clone(), "out": call["out"].clone()}
    OP.impls["triton"].fn(**got, config=replace(Config(), **variant))
    OP.native(**ref)
    err = (got["state"][1].double() - exact).abs().max() / scale
    native_err = (ref["state"][1].double() - exact).abs().max() / scale
    if in_dtype == torch.float32:
        assert err <= max(4 * native_err, 1e-5), (err, native_err)
    else:
        assert err <= 4e-3, err
