"""What the ops' example calls (``mamba-ir ops``) share: the sizes of a small hybrid-model
batch and seeded values, so each op's example reads like the model's call; and the lazy
link from an op to its strategy in ``mamba_ir.testing``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sizes:
    batch: int = 4
    heads: int = 8
    head_dim: int = 64
    d_state: int = 128
    mamba1_d_state: int = 16
    groups: int = 1
    width: int = 4
    slots: int = 9
    tokens_per_seq: int = 4  # prefill examples
    chunk: int = 4

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: x, B and C of a Mamba2 layer."""
        return self.heads * self.head_dim + 2 * self.groups * self.d_state


SIZES = Sizes()

def randn(device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``randn(*shape, dt=dtype)`` from a generator seeded 0: the same values every run."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def draw(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    return draw


def rows(device: torch.device) -> torch.Tensor:
    """Each sequence's own state row: 1..batch (row 0 is the model's empty-prefix row)."""
    return torch.arange(1, SIZES.batch + 1, dtype=torch.int32, device=device)


def offsets(device: torch.device) -> torch.Tensor:
    """``query_start_loc`` / ``cu_seqlens`` of ``batch`` prompts of ``tokens_per_seq``."""
    n = SIZES.batch * SIZES.tokens_per_seq
    return torch.arange(0, n + 1, SIZES.tokens_per_seq, dtype=torch.int32, device=device)


def testing_strategy(name: str) -> Callable[[str, Any], Any]:
    """``mamba_ir.testing.strategies.<name>`` as an op's strategy (``register_strategy``),
    imported when first drawn: hypothesis comes with the ``testing`` extra only."""

    def strategy(device: str, sizes: Any) -> Any:
        from ..testing import strategies

        return getattr(strategies, name)(device=device, sizes=sizes)

    return strategy
