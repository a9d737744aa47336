"""Stochastic rounding of stored states (``rand_seed``): the Philox bits, the rounding
rule against all of a dtype's values, its statistics, and every provider against native."""

import pytest
import torch

from mamba_ir import get_op, ops
from mamba_ir.ops._philox import philox, state_bits
from mamba_ir.ops._quant import FLOAT_GRIDS, QMAX, QUANTIZED, ROUNDED, quantize, round_stochastic
from mamba_ir.priority import set_priority
from mamba_ir.testing import calls, check_impl

OP = get_op("selective_state_update")
T = torch.tensor


@pytest.mark.parametrize(("key", "counter", "want"), [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4,
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(key, counter, want):
    """Random123's known-answer vectors for Philox4x32-10 (all four output words)."""
    assert tuple(map(int, philox(tuple(map(T, key)), tuple(map(T, counter))))) == want


from mamba_ir.impls.triton._common import tl, triton  # noqa: E402

if triton is not None:
    from mamba_ir.impls.triton._jit import philox as philox_jit
    from mamba_ir.impls.triton._jit import round_stochastic as round_jit

    @triton.jit
    def bits_kernel(seed_ptr, c0_ptr, c1_ptr, c2_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(c0_ptr + i).to(tl.uint32)
        c1 = tl.load(c1_ptr + i).to(tl.uint32)
        c2 = tl.load(c2_ptr + i).to(tl.uint32)
        w0, w1, w2, w3 = philox_jit(tl.load(seed_ptr), c0, c1, c2)
        tl.store(out_ptr + i, w0.to(tl.int64))
        tl.store(out_ptr + N + i, w1.to(tl.int64))
        tl.store(out_ptr + 2 * N + i, w2.to(tl.int64))
        tl.store(out_ptr + 3 * N + i, w3.to(tl.int64))

    @triton.jit
    def round_kernel(v_ptr, bits_ptr, out_ptr, N: tl.constexpr, MBITS: tl.constexpr,
                     EMIN: tl.constexpr, FMAX: tl.constexpr):
        i = tl.arange(0, N)
        bits = tl.load(bits_ptr + i).to(tl.uint32)
        tl.store(out_ptr + i, round_jit(tl.load(v_ptr + i), bits, MBITS, EMIN, FMAX))


def _triton_kernels():
    if triton is None:
        pytest.skip("needs triton")
    return bits_kernel, round_kernel


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**40) + 12345])
def test_triton_bits_are_natives(seed, device):
    bits_kernel, _ = _triton_kernels()
    g = torch.Generator().manual_seed(1)
    c = [torch.randint(0, 2**32, (256,), generator=g) for _ in range(3)]
    want = torch.stack(philox((T(seed), T(seed) >> 32), (*c, T(0))))
    got = torch.empty(4, 256, dtype=torch.int64, device=device)
    bits_kernel[(1,)](T([seed], device=device), *(x.to(device) for x in c), got, N=256)
    assert torch.equal(got.cpu() & 0xFFFFFFFF, want)


def _crafted(dtype: torch.dtype) -> torch.Tensor:
    """Values on and between grid points: ties, binade edges, signed zeros, the smallest
    steps, the largest finite value and beyond, inf and NaN."""
    if dtype in (torch.int16, torch.int8):
        q = QMAX[dtype]
        v = [0.0, -0.0, 0.5, -0.5, 2.5, -3.25, q, -q, q - 0.5, 1e-7, 7.999999]
    else:
        fmax = torch.finfo(dtype).max
        v = [0.0, -0.0, 1.0, 1.0 + 2**-12, 0.999999, -1.5 + 2**-20, 3.0, 17.0, -19.5,
             2.0**-6 * 1.3, 2.0**-9, 2.0**-10, 1e-3, fmax, -fmax, fmax * 0.999,
             float("inf"), float("-inf"), float("nan")]
        if dtype == torch.float16:
            v += [65510.0, 65530.0, 2.0**-24 * 3.5]
        if dtype == torch.bfloat16:
            v += [2.0**-125, -(2.0**-130), 3.4e38]
    v = torch.tensor(v, dtype=torch.float32)
    return torch.cat([v, v * 1.0001, v / 3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ROUNDED, ids=str)
def test_triton_rounding_is_natives_bit_for_bit(dtype, device):
    _, round_kernel = _triton_kernels()
    v = _crafted(dtype)
    n = 1 << (v.numel() - 1).bit_length()
    v = torch.cat([v, torch.zeros(n - v.numel())])
    if dtype in QUANTIZED and not dtype.is_floating_point:
        v = v.clamp(-QMAX[dtype], QMAX[dtype])
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        bits = torch.randint(0, 2**32, (n,), generator=g)
        bits[:4] = torch.tensor([0, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF])
        want = round_stochastic(v, dtype, bits).float()
        mbits, emin = FLOAT_GRIDS.get(dtype, (0, 0))
        fmax = torch.finfo(dtype).max if dtype.is_floating_point else 0.0
        got = torch.empty(n, device=device)
        round_kernel[(1,)](v.to(device), bits.to(device), got, N=n, MBITS=mbits, EMIN=emin,
                           FMAX=fmax)
        got = got.cpu().to(dtype).float()  # exact: the kernel's value lies on the grid
        same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
        assert same.all(), (v[~same][:4], got[~same][:4], want[~same][:4])


def _grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of ``dtype``, sorted, in float64 (the independent oracle)."""
    if not dtype.is_floating_point:
        q = int(QMAX[dtype])
        return torch.arange(-q, q + 1, dtype=torch.float64)
    width = {1: torch.uint8, 2: torch.int16}[dtype.itemsize]
    every = torch.arange(2 ** (8 * dtype.itemsize)).to(width).view(dtype).double()
    return every[every.isfinite()].unique()


@pytest.mark.parametrize("dtype", ROUNDED, ids=str)
def test_each_result_is_a_neighbour_and_the_mean_is_the_value(dtype):
    """Over 4,096 draws per value: only the two grid neighbours come out, and their mean
    is the value within 5 standard errors (unbiased)."""
    grid = _grid(dtype)
    g = torch.Generator().manual_seed(3)
    top = 100.0 if dtype == torch.bfloat16 else float(grid.max())
    v = (torch.rand(48, generator=g, dtype=torch.float64) * 2 - 1) * top
    v = torch.cat([v, torch.tensor([0.3, -2.7, 1e-3 if dtype != torch.int8 else 0.1])]).float()
    draws = 4096
    bits = philox((T(7), T(0)), (torch.arange(draws)[:, None], torch.arange(v.numel()), T(0),
                                 T(0)))[0]
    got = round_stochastic(v.expand(draws, -1), dtype, bits).double()
    hi_i = torch.searchsorted(grid, v.double(), right=False)
    lo = grid[(hi_i - 1).clamp(min=0)]
    hi = grid[hi_i.clamp(max=grid.numel() - 1)]
    on_grid = grid[hi_i.clamp(max=grid.numel() - 1)] == v.double()
    lo = torch.where(on_grid, v.double(), lo)
    hi = torch.where(on_grid, v.double(), hi)
    assert ((got == lo) | (got == hi)).all()
    p = (v.double() - lo) / (hi - lo).clamp(min=1e-300)
    sigma = (hi - lo) * (p * (1 - p) / draws).sqrt()
    assert ((got.mean(0) - v.double()).abs() <= 5 * sigma + 1e-12 * v.double().abs()).all()


def _call(state_dtype: torch.dtype, seed: int | None) -> dict:
    call = OP.bind(**OP.example(torch.device("cpu"), torch.float32))
    h = call["state"].float()
    call["state"], call["state_scale"] = (
        quantize(h, state_dtype) if state_dtype in QUANTIZED else (h.to(state_dtype), None))
    call["rand_seed"] = None if seed is None else T(seed)
    return call


def _stored(call: dict, provider: str = "native") -> torch.Tensor:
    call = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with set_priority([provider]):
        ops.selective_state_update(**call)
    s = call["state"].float()
    return s if call["state_scale"] is None else s * call["state_scale"][..., None]


@pytest.mark.parametrize("dtype", ROUNDED, ids=str)
def test_a_seed_decides_the_rounding(dtype):
    """The same seed stores the same state; another seed another one; each differs from
    round-to-nearest by at most one step of the grid (scales are the same)."""
    nearest, a, again, b = (_stored(_call(dtype, s)) for s in (None, 1, 1, 2))
    assert torch.equal(a, again) and not torch.equal(a, b)
    step = (a - nearest).abs()
    assert step.max() > 0
    one = (nearest - _stored(_call(dtype, None))).abs().max()  # 0: a sanity check of the run
    assert one == 0


def test_seed_is_checked():
    with pytest.raises(ValueError, match=r"^rand_seed: expected None for a float32 state"):
        ops.selective_state_update(**{**_call(torch.float32, None), "rand_seed": T(1)})
    with pytest.raises(ValueError, match=r"^rand_seed: expected dtype in \(int64\)"):
        ops.selective_state_update(**{**_call(torch.int16, None), "rand_seed": T(1.0)})
    with pytest.raises(ValueError, match=r"^rand_seed: expected one int64 value"):
        ops.selective_state_update(**{**_call(torch.int16, None), "rand_seed": T([1, 2])})


def test_state_bits_name_the_row_and_column():
    """Bits of one element differ across rows, columns and seeds (counters and key)."""
    b = [state_bits(T(s), T([r]), (2, 3), c) for s, r, c in ((1, 0, 0), (1, 1, 0), (1, 0, 1),
                                                             (2, 0, 0))]
    assert len({tuple(x.flatten().tolist()) for x in b}) == 4


def _exact_call(dtype: torch.dtype, dstate: int) -> dict:
    """A speculative call (two tokens, each stored into its own row, so the token column
    counts) from zero states with dt = 1 and A = 0: every state is sums of ``x * B`` in
    float32, which native and the interpreter compute alike, so the stored states can
    differ only by the bits each value draws."""
    nseq, ntok, nheads, dim = 2, 2, 2, 3
    g = torch.Generator().manual_seed(5)
    h = torch.zeros(1 + nseq * ntok, nheads, dim, dstate)
    state, scale = quantize(h, dtype) if dtype in QUANTIZED else (h.to(dtype), None)
    x = torch.randn(nseq, ntok, nheads, dim, generator=g) * 40
    return dict(state=state, x=x, dt=torch.ones_like(x), A=torch.zeros(nheads, dim, dstate),
                B=torch.randn(nseq, ntok, 1, dstate, generator=g),
                C=torch.randn(nseq, ntok, 1, dstate, generator=g),
                state_batch_indices=torch.tensor([[4, 2], [1, 3]]),
                num_accepted_tokens=torch.ones(nseq, dtype=torch.int64),
                out=torch.empty_like(x), state_scale=scale, rand_seed=T(-(2**35) + 99))


# dstate 16: one Philox per four columns; 6: quads of elements straddle headdim rows
@pytest.mark.parametrize("dstate", [16, 6])
@pytest.mark.parametrize("dtype", ROUNDED, ids=str)
def test_triton_stores_natives_bits(dtype, dstate):
    """Triton's stochastically rounded states are native's bit for bit, in tiles of two
    headdim rows (a ragged last one), so that every tile's elements take their own words."""
    _triton_kernels()
    from mamba_ir.impls.triton.selective_state_update import Config
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as ssu

    call = _exact_call(dtype, dstate)
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    OP.native(**want)
    ssu(**call, config=Config(block_d=2, num_warps=1))
    width = torch.int16 if dtype.itemsize == 2 else torch.int8
    got, expected = call["state"][1:].view(width), want["state"][1:].view(width)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} values differ"
    nearest = _exact_call(dtype, dstate) | {"rand_seed": None}
    OP.native(**nearest)
    assert not torch.equal(nearest["state"][1:].view(width), expected)  # the bits did round
    if dtype in QUANTIZED:
        assert torch.equal(call["state_scale"], want["state_scale"])


def test_check_impl_interpreter_stochastic():
    seeded = calls("selective_state_update").filter(lambda c: c["rand_seed"] is not None)
    check_impl("selective_state_update", "triton", device="cpu", strategy=seeded,
               max_examples=12, min_accepted=12)


@pytest.mark.gpu
def test_check_impl_gpu_stochastic():
    seeded = calls("selective_state_update", device="cuda").filter(
        lambda c: c["rand_seed"] is not None)
    check_impl("selective_state_update", "triton", device="cuda", strategy=seeded,
               max_examples=30, min_accepted=30)
