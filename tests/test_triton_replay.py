"""Triton replay_state_update against the native op.

On CPU the kernel runs in Triton's interpreter on small shapes: drawn calls through
``check_impl`` (rings empty, partly filled and full, pads, redirect, views into larger
caches), and streams of calls in which the rows carry over, so that the ring fills,
flushes and refills under both providers alike. The ``gpu`` tests repeat single calls at
Mamba2 decode size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_ir import get_op
from mamba_ir.testing import assert_matches_native, check_impl, tolerance

pytest.importorskip("triton")

from mamba_ir.impls.triton.replay_state_update import (  # noqa: E402
    replay_state_update as triton_replay,
)
from mamba_ir.impls.triton.replay_state_update import supports  # noqa: E402
from mamba_ir.impls.triton.selective_state_update import Config  # noqa: E402

OP = get_op("replay_state_update")


def test_check_impl_interpreter() -> None:
    assert check_impl("replay_state_update", "triton", device="cpu", max_examples=20) == 20


def rows(nslots: int, ring: int, nheads: int, dim: int, ngroups: int, dstate: int, *,
         state_dtype: torch.dtype, in_dtype: torch.dtype, device: str = "cpu",
         fill: torch.Tensor | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Replay rows whose rings hold ``fill`` entries each (random lengths when None);
    entries past a ring's length are NaN, as they are not part of the row."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    lengths = torch.randint(0, ring + 1, (nslots,), generator=gen) if fill is None else fill
    past = torch.arange(ring)[None, :] >= lengths[:, None]
    ring_x, ring_dt, ring_B = (randn(nslots, ring, nheads, dim), randn(nslots, ring, nheads),
                               randn(nslots, ring, ngroups, dstate))
    for t in (ring_x, ring_dt, ring_B):
        t[past] = float("nan")
    return {
        "state": (randn(nslots, nheads, dim, dstate) * 0.5).to(state_dtype).to(device),
        "ring_x": ring_x.to(in_dtype).to(device),
        "ring_dt": F.softplus(ring_dt).to(device) * 0.2,
        "ring_B": ring_B.to(in_dtype).to(device),
        "ring_len": lengths.to(torch.int32).to(device),
    }


def token(batch: int, nheads: int, dim: int, ngroups: int, dstate: int, *,
          in_dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """One token per sequence with Mamba2's parameters: A, D, dt_bias tied over headdim."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def randn(*shape: int, dtype: torch.dtype = in_dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return {
        "x": randn(batch, nheads, dim),
        "dt": randn(batch, nheads, 1).expand(batch, nheads, dim),
        # tied over headdim and dstate (stride 0), as Mamba2 passes A: the direct route
        "A": (-torch.rand(nheads, 1, 1, generator=gen).add(0.5)).to(device).expand(
            nheads, dim, dstate),
        "B": randn(batch, ngroups, dstate), "C": randn(batch, ngroups, dstate),
        "D": randn(nheads, 1, dtype=torch.float32).expand(nheads, dim),
        "z": randn(batch, nheads, dim),
        "dt_bias": randn(nheads, 1, dtype=torch.float32).expand(nheads, dim),
        "dt_softplus": True,
    }


def _clone(d: dict) -> dict:
    return {k: v.clone() for k, v in d.items()}


@pytest.mark.parametrize(("state_dtype", "in_dtype", "moves", "route"), [
    (torch.float32, torch.float32, False, {}),
    (torch.bfloat16, torch.float16, True, {}),
    (torch.float32, torch.bfloat16, True, {"direct": False}),
    (torch.float32, torch.float32, True, {"prefetch": True}),
    (torch.bfloat16, torch.bfloat16, False, {"prefetch": True}),
])
def test_streams_match_native_call_by_call(state_dtype, in_dtype, moves, route) -> None:
    """Three sequences step from empty rings through two flushes, rows carried over from
    call to call under each provider; one sequence is padded on one step, and with
    ``moves`` every sequence moves to a fresh row on each step (the source rows are
    left as they were). Appends take the output from the checkpoint and the ring directly
    (the default), or, ``direct=False``, from the state replayed as a flush builds it, or,
    ``prefetch=True``, from entries taken in order, the first chunk loaded before the
    ring's length (entries past the length are NaN here: they must be selected away)."""
    nheads, dim, ngroups, dstate, ring, batch = 4, 8, 2, 8, 2, 3
    nslots = 2 * batch + 1
    start = rows(nslots, ring, nheads, dim, ngroups, dstate, state_dtype=state_dtype,
                 in_dtype=in_dtype, fill=torch.zeros(nslots, dtype=torch.long))
    want, got = _clone(start), _clone(start)
    where = list(range(batch))
    atol, rtol = tolerance(state_dtype, in_dtype)
    flushes = 0
    for step in range(2 * (ring + 1) + 1):
        src = list(where)
        dst = [(r + batch) % (2 * batch) for r in src] if moves else list(src)
        if step == 2:
            src[1] = dst[1] = -1  # a padded entry: its row stays as it is
        call = {**token(batch, nheads, dim, ngroups, dstate, in_dtype=in_dtype, seed=step),
                "state_batch_indices": torch.tensor(src, dtype=torch.int32),
                "dst_state_batch_indices": torch.tensor(dst, dtype=torch.int32)}
        out_want, out_got = torch.empty_like(call["x"]), torch.empty_like(call["x"])
        OP.native(**want, **call, out=out_want)
        triton_replay(**got, **call, out=out_got, **route)
        torch.testing.assert_close(out_got, out_want, atol=atol, rtol=rtol)
        assert torch.equal(got["ring_len"], want["ring_len"]), step
        (value_want, spacing), (value_got, _) = OP.rows.value(want), OP.rows.value(got)
        gap = (value_got - value_want).abs() - rtol * value_want.abs() - spacing
        assert float(gap.max()) <= atol, f"step {step}: rows differ by {float(gap.max())}"
        flushes += sum(d != -1 and int(got["ring_len"][d]) == 0 for d in dst)
        where = [w if d == -1 else d for w, d in zip(where, dst, strict=True)]
    assert flushes >= 2 * batch - 1, "every sequence's ring should flush twice"


def _one_call(sizes: tuple[int, ...], fill: list[int], redirect: bool, **knobs) -> tuple:
    """One call of ``batch`` sequences from rows 0.. (filled ``fill``, one per row of
    ``2 x batch``), in place or into rows ``batch``..: native's rows and output, then
    Triton's (with the launcher's ``knobs``)."""
    nheads, dim, ngroups, dstate, ring, batch = sizes
    start = rows(2 * batch, ring, nheads, dim, ngroups, dstate, state_dtype=torch.float32,
                 in_dtype=torch.float32, fill=torch.tensor(fill))
    src = torch.arange(batch, dtype=torch.int32)
    call = {**token(batch, nheads, dim, ngroups, dstate, in_dtype=torch.float32),
            "state_batch_indices": src,
            "dst_state_batch_indices": src + batch if redirect else None}
    want, got = _clone(start), _clone(start)
    out_want, out_got = torch.empty_like(call["x"]), torch.empty_like(call["x"])
    OP.native(**want, **call, out=out_want)
    triton_replay(**got, **call, out=out_got, **knobs)
    return want, out_want, got, out_got


@pytest.mark.parametrize("redirect", [False, True])
def test_prefetch_takes_rings_longer_than_a_chunk(redirect: bool) -> None:
    """A ring of 11 (two chunks of 8), filled 0, 1, 7, 8, 9 and 11 entries (a flush): the
    in-order route with its first chunk prefetched gives native's outputs and rows, in
    place and moved (the entries carried along)."""
    want, out_want, got, out_got = _one_call((2, 4, 1, 8, 11, 6), [0, 1, 7, 8, 9, 11] * 2,
                                             redirect, prefetch=True)
    torch.testing.assert_close(out_got, out_want, atol=1e-5, rtol=1e-5)
    assert got["ring_len"].tolist() == want["ring_len"].tolist()
    (value_want, _), (value_got, _) = OP.rows.value(want), OP.rows.value(got)
    torch.testing.assert_close(value_got, value_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("redirect", [False, True])
def test_in_place_lengths_wait_for_every_program(redirect: bool) -> None:
    """Many programs per sequence (four heads x four blocks of headdim): each of them
    reads the length its row had, whichever program writes the new one."""
    batch = 4
    want, out_want, got, out_got = _one_call((4, 16, 2, 8, 4, batch), [0, 2, 3, 4] * 2,
                                             redirect, config=Config(block_d=4, num_warps=1))
    torch.testing.assert_close(out_got, out_want, atol=1e-5, rtol=1e-5)
    assert got["ring_len"].tolist() == want["ring_len"].tolist()
    written = slice(batch, None) if redirect else slice(0, batch)
    assert got["ring_len"][written].tolist() == [1, 3, 4, 0]


@pytest.mark.parametrize("direct", [None, False])
def test_a_rate_of_minus_inf_with_steps_of_zero_keeps_the_state(direct) -> None:
    """A = -inf on one head and steps of exactly 0 on some tokens (A * dt is 0, not NaN,
    as native takes it): Triton agrees with native through appends and a flush, and
    stays finite."""
    nheads, dim, ngroups, dstate, ring, batch = 2, 4, 1, 8, 2, 2
    start = rows(2 * batch, ring, nheads, dim, ngroups, dstate, state_dtype=torch.float32,
                 in_dtype=torch.float32, fill=torch.zeros(2 * batch, dtype=torch.long))
    want, got = _clone(start), _clone(start)
    for step in range(ring + 2):
        call = token(batch, nheads, dim, ngroups, dstate, in_dtype=torch.float32, seed=step)
        call["A"] = torch.tensor([-float("inf"), -1.0])[:, None, None].expand(
            nheads, dim, dstate)
        steps = torch.rand(batch, nheads, 1) + 0.05
        if step % 2 == 0:
            steps[:, 0] = 0.0  # a step of exactly 0 on the -inf head
        call.update(dt=steps.expand(batch, nheads, dim), dt_bias=None, dt_softplus=False,
                    state_batch_indices=torch.arange(batch, dtype=torch.int32))
        out_want, out_got = torch.empty_like(call["x"]), torch.empty_like(call["x"])
        OP.native(**want, **call, out=out_want)
        triton_replay(**got, **call, out=out_got, direct=direct)
        assert bool(out_got.isfinite().all()), step
        torch.testing.assert_close(out_got, out_want, atol=1e-5, rtol=1e-5)
    assert got["ring_len"].tolist() == want["ring_len"].tolist()
    torch.testing.assert_close(got["state"], want["state"], atol=1e-5, rtol=1e-5)


def test_refusals_name_the_limit() -> None:
    call = OP.bind(**rows(2, 1, 1, 1, 1, 2048, state_dtype=torch.float32,
                          in_dtype=torch.float32, fill=torch.zeros(2, dtype=torch.long)),
                   **token(1, 1, 1, 1, 2048, in_dtype=torch.float32))
    assert "dstate=2048" in supports(**call)
    call = OP.bind(**rows(2, 1 << 15, 1, 1, 1, 4, state_dtype=torch.float32,
                          in_dtype=torch.float32, fill=torch.zeros(2, dtype=torch.long)),
                   **token(1, 1, 1, 1, 4, in_dtype=torch.float32))
    assert "15 bits" in supports(**call)


# -- Mamba2 decode size on a GPU ----------------------------------------------------------

NHEADS, HEADDIM, DSTATE, NGROUPS = 128, 64, 128, 8


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [8, 16, 32])
@pytest.mark.parametrize("form", ["in_place", "redirect", "pads"])
def test_mamba2_decode_size_gpu(ring: int, form: str) -> None:
    """One call of 64 sequences, rings of every length from empty to full (flushes)."""
    batch = 64
    nslots = 2 * batch + 1
    fill = torch.arange(nslots) % (ring + 1)
    row_set = rows(nslots, ring, NHEADS, HEADDIM, NGROUPS, DSTATE, state_dtype=torch.bfloat16,
                   in_dtype=torch.bfloat16, device="cuda", fill=fill, seed=ring)
    perm = torch.randperm(nslots, generator=torch.Generator().manual_seed(ring))
    src = perm[:batch].to(torch.int32)
    dst = perm[batch:2 * batch].to(torch.int32) if form != "in_place" else None
    if form == "pads":
        src[::7] = -1
        dst[3::11] = -1
    call = OP.bind(**row_set, **token(batch, NHEADS, HEADDIM, NGROUPS, DSTATE,
                                      in_dtype=torch.bfloat16, device="cuda", seed=ring),
                   state_batch_indices=src.cuda(),
                   dst_state_batch_indices=None if dst is None else dst.cuda(),
                   out=torch.empty(batch, NHEADS, HEADDIM, dtype=torch.bfloat16, device="cuda"))
    assert_matches_native(OP, "triton", call)


@pytest.mark.gpu
def test_check_impl_gpu() -> None:
    check_impl("replay_state_update", "triton", device="cuda", max_examples=100)


# registers a thread on sm_90 as the kernel compiles today: more cost programs per SM (a
# first version of the direct route held the checkpoint tile across both routes: 222)
REGISTERS = {"direct": 168, "rebuild": 128, "prefetch": 167, "spec direct": 220,
             "spec rebuild": 157}


def test_no_spills_at_mamba2_size() -> None:
    """Both append routes, one token and speculative (4 tokens), compile for sm_90 at
    Mamba2 decode size without spilling and within their register counts (only ptxas
    sees either; the GPU run is the final word on speed)."""
    from compile_sm90 import run

    usage = run("registers_replay_sm90.py")
    assert set(usage) == set(REGISTERS)
    for route, (registers, spill_stores, spill_loads) in usage.items():
        assert spill_stores == spill_loads == 0, (route, registers, spill_stores, spill_loads)
        assert registers <= REGISTERS[route], (route, registers)


# -- speculative decoding -------------------------------------------------------------------


def spec_tokens(batch: int, tokens: int, nheads: int, dim: int, ngroups: int, dstate: int, *,
                in_dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """``tokens`` tokens per sequence with :func:`token`'s parameters."""
    call = token(batch, nheads, dim, ngroups, dstate, in_dtype=in_dtype, device=device,
                 seed=seed)
    gen = torch.Generator().manual_seed(2000 + seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(in_dtype).to(device)

    return {**call, "x": randn(batch, tokens, nheads, dim),
            "dt": randn(batch, tokens, nheads, 1).expand(batch, tokens, nheads, dim),
            "B": randn(batch, tokens, ngroups, dstate), "C": randn(batch, tokens, ngroups, dstate),
            "z": randn(batch, tokens, nheads, dim)}


@pytest.mark.parametrize(("state_dtype", "in_dtype", "moves", "direct"), [
    (torch.float32, torch.float32, False, None),
    (torch.bfloat16, torch.float16, True, None),
    (torch.float32, torch.bfloat16, True, False),
])
def test_speculative_streams_match_native_call_by_call(state_dtype, in_dtype, moves,
                                                       direct) -> None:
    """Three sequences verify 3 tokens a call and accept a random number of the previous
    call's (0 to 3), rows carried over under each provider: rollbacks, flushes in place
    (the tokens overwrite entries the committed state was built from) and, with
    ``moves``, every sequence to a fresh row each call; one sequence padded on one call.
    Many programs per sequence (blocks of 4 headdim rows), so that in place every one of
    them reads the ring before the tokens land."""
    nheads, dim, ngroups, dstate, ring, batch, T = 4, 8, 2, 8, 5, 3, 3
    nslots = 2 * batch + 1
    start = rows(nslots, ring, nheads, dim, ngroups, dstate, state_dtype=state_dtype,
                 in_dtype=in_dtype, fill=torch.zeros(nslots, dtype=torch.long))
    want, got = _clone(start), _clone(start)
    where = list(range(batch))
    accepted = [T] * batch
    atol, rtol = tolerance(state_dtype, in_dtype)
    gen = torch.Generator().manual_seed(5)
    flushes = 0
    for step in range(8):
        src = list(where)
        dst = [(r + batch) % (2 * batch) for r in src] if moves else list(src)
        if step == 2:
            src[1] = dst[1] = -1
        call = {**spec_tokens(batch, T, nheads, dim, ngroups, dstate, in_dtype=in_dtype,
                              seed=step),
                "state_batch_indices": torch.tensor(src, dtype=torch.int32),
                "dst_state_batch_indices": torch.tensor(dst, dtype=torch.int32),
                "num_accepted_tokens": torch.tensor(accepted, dtype=torch.int32)}
        flushes += sum(s != -1 and int(want["ring_len"][s]) + accepted[b] > ring
                       for b, s in enumerate(src))
        out_want, out_got = torch.empty_like(call["x"]), torch.empty_like(call["x"])
        OP.native(**want, **call, out=out_want)
        triton_replay(**got, **call, out=out_got, direct=direct,
                      config=Config(block_d=4, num_warps=1))
        torch.testing.assert_close(out_got, out_want, atol=atol, rtol=rtol)
        assert torch.equal(got["ring_len"], want["ring_len"]), step
        (value_want, spacing), (value_got, _) = OP.rows.value(want), OP.rows.value(got)
        gap = (value_got - value_want).abs() - rtol * value_want.abs() - spacing
        assert float(gap.max()) <= atol, f"step {step}: rows differ by {float(gap.max())}"
        where = [w if d == -1 else d for w, d in zip(where, dst, strict=True)]
        accepted = [int(a) if d == -1 else int(torch.randint(0, T + 1, (), generator=gen))
                    for a, d in zip(accepted, dst, strict=True)]
    assert flushes >= batch, "the stream should flush rings"


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [8, 16])
@pytest.mark.parametrize("form", ["in_place", "redirect", "pads"])
def test_speculative_mamba2_decode_size_gpu(ring: int, form: str) -> None:
    """One speculative call of 64 sequences, 4 tokens each, at Mamba2 decode size: rings
    of every length that can hold the previous call's tokens, random accepted counts
    (rollbacks, appends and flushes)."""
    batch, T = 64, 4
    nslots = 2 * batch + 1
    fill = T + torch.arange(nslots) % (ring - T + 1)
    row_set = rows(nslots, ring, NHEADS, HEADDIM, NGROUPS, DSTATE, state_dtype=torch.bfloat16,
                   in_dtype=torch.bfloat16, device="cuda", fill=fill, seed=ring)
    gen = torch.Generator().manual_seed(ring)
    perm = torch.randperm(nslots, generator=gen)
    src = perm[:batch].to(torch.int32)
    dst = perm[batch:2 * batch].to(torch.int32) if form != "in_place" else None
    if form == "pads":
        src[::7] = -1
        dst[3::11] = -1
    call = OP.bind(**row_set, **spec_tokens(batch, T, NHEADS, HEADDIM, NGROUPS, DSTATE,
                                            in_dtype=torch.bfloat16, device="cuda", seed=ring),
                   state_batch_indices=src.cuda(),
                   dst_state_batch_indices=None if dst is None else dst.cuda(),
                   num_accepted_tokens=torch.randint(0, T + 1, (batch,), generator=gen).to(
                       torch.int32).cuda(),
                   out=torch.empty(batch, T, NHEADS, HEADDIM, dtype=torch.bfloat16,
                                   device="cuda"))
    assert_matches_native(OP, "triton", call)
