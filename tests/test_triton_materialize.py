"""Triton replay_materialize against the native op: drawn calls through ``check_impl`` in
the interpreter (rings empty, partly filled and full, pads, in place and redirected, row
members views of larger caches), the lengths written after every program read them, and
at Mamba2 decode size on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_ir import get_op
from mamba_ir.testing import assert_matches_native, check_impl

pytest.importorskip("triton")

from mamba_ir.impls.triton.replay_materialize import (  # noqa: E402
    replay_materialize as triton_materialize,
)
from mamba_ir.impls.triton.replay_materialize import supports  # noqa: E402

OP = get_op("replay_materialize")


def test_check_impl_interpreter() -> None:
    assert check_impl("replay_materialize", "triton", device="cpu", max_examples=15) == 15


def _rows(nslots: int, ring: int, nheads: int, dim: int, ngroups: int, dstate: int,
          fill: torch.Tensor, dtype: torch.dtype = torch.float32, device: str = "cpu",
          seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    A = -torch.rand(nheads, 1, 1, generator=gen).exp()
    return {
        "state": (randn(nslots, nheads, dim, dstate) * 0.5).to(dtype).to(device),
        "ring_x": randn(nslots, ring, nheads, dim).to(dtype).to(device),
        "ring_dt": (F.softplus(randn(nslots, ring, nheads)) * 0.2).to(device),
        "ring_B": randn(nslots, ring, ngroups, dstate).to(dtype).to(device),
        "ring_len": fill.to(torch.int32).to(device),
        "A": A.expand(nheads, dim, dstate).to(device),
    }


def _clone(d: dict) -> dict:
    return {k: v.clone() for k, v in d.items()}


@pytest.mark.parametrize("redirect", [False, True])
def test_lengths_are_emptied_after_every_program_read_them(redirect: bool) -> None:
    """Many programs per entry (four heads x four blocks of headdim), in place: each reads
    the length its row had before the row's ring is emptied."""
    nheads, dim, ngroups, dstate, ring, count = 4, 16, 2, 8, 4, 4
    start = _rows(2 * count, ring, nheads, dim, ngroups, dstate,
                  fill=torch.tensor([1, 2, 3, 4] * 2))
    src = torch.arange(count, dtype=torch.int32)
    dst = src + count if redirect else src
    want, got = _clone(start), _clone(start)
    OP.native(**want, src=src, dst=dst)
    triton_materialize(**got, src=src, dst=dst, block_d=4)
    torch.testing.assert_close(got["state"], want["state"], atol=1e-5, rtol=1e-5)
    assert got["ring_len"].tolist() == want["ring_len"].tolist()
    assert got["ring_len"][dst.long()].tolist() == [0] * count


def test_refusals_name_the_limit() -> None:
    call = OP.bind(**_rows(2, 1, 1, 1, 1, 2048, fill=torch.zeros(2)),
                   src=torch.tensor([0]), dst=torch.tensor([1]))
    assert "dstate=2048" in supports(**call)


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [8, 16, 32])
def test_mamba2_decode_size_gpu(ring: int) -> None:
    """64 rows of every fill, bf16, materialised into fresh rows (a few pads)."""
    count, nslots = 64, 129
    fill = torch.arange(nslots) % (ring + 1)
    rows = _rows(nslots, ring, 128, 64, 8, 128, fill=fill, dtype=torch.bfloat16,
                 device="cuda", seed=ring)
    perm = torch.randperm(nslots, generator=torch.Generator().manual_seed(ring))
    src, dst = perm[:count].to(torch.int32), perm[count:2 * count].to(torch.int32)
    src[::7], dst[3::11] = -1, -1
    assert_matches_native(OP, "triton", OP.bind(**rows, src=src.cuda(), dst=dst.cuda()))


@pytest.mark.gpu
def test_check_impl_gpu() -> None:
    check_impl("replay_materialize", "triton", device="cuda", max_examples=100)
