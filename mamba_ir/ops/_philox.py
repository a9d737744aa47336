"""Philox4x32-10, the counter-based generator behind stochastic rounding.

A stochastic round needs random bits that every provider can reproduce from a seed alone,
in any order and on any device: Philox maps a 128-bit counter and a 64-bit key to 128
random bits by ten rounds of 32-bit multiplies (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011). Each evaluation's four output words serve four consecutive
elements of a state row, so a kernel runs one Philox per four stored values. Values are
uint32 held in int64 tensors; products of two 32-bit values are split into 16-bit halves
so that no intermediate leaves int64.
"""

from __future__ import annotations

import math

import torch

MASK = 0xFFFFFFFF
MUL_A, MUL_B = 0xD2511F53, 0xCD9E8D57  # round multipliers
WEYL_A, WEYL_B = 0x9E3779B9, 0xBB67AE85  # key increments
ROUNDS = 10


def _mul(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * b`` for ``a`` (int64 holding uint32) and a
    32-bit constant ``b``."""
    lo16, hi16 = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * lo16, a * hi16  # each < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK
    return high, low


def philox(
    key: tuple[torch.Tensor, torch.Tensor], counter: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words of Philox4x32-10 for ``counter`` (four broadcastable int64
    tensors holding uint32) under ``key`` (two)."""
    k0, k1 = (k & MASK for k in key)
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK for c in counter)
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul(c2, MUL_B)
        hi_a, lo_a = _mul(c0, MUL_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + WEYL_A) & MASK, (k1 + WEYL_B) & MASK
    return c0, c1, c2, c3


def state_bits(seed: torch.Tensor, rows: torch.Tensor, row_shape: tuple[int, ...],
               column: int) -> torch.Tensor:
    """The random bits of stochastically rounding whole state rows: element ``e`` (its
    flat index within the row) of row ``rows[i]``, written for token column ``column``,
    uses word ``e % 4`` of counter ``(e // 4, rows[i], column, 0)`` under key ``(seed low
    word, seed high word)``. Shape ``(len(rows), *row_shape)``, uint32 values in int64."""
    seed = seed.reshape(()).to(torch.int64)
    n = math.prod(row_shape)
    quad = torch.arange(-(-n // 4), device=rows.device).view(1, -1)
    row = rows.to(torch.int64).view(-1, 1)
    words = philox((seed, seed >> 32), (quad, row, torch.tensor(column), torch.tensor(0)))
    # (rows, quads, 4) flattened: element e is word e % 4 of quad e // 4
    bits = torch.stack(words, -1).flatten(1)[:, :n]
    return bits.reshape(-1, *row_shape)
