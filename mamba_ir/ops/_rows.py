"""Writing a native op's carried states into state rows: final rows and align-mode checkpoints."""

from __future__ import annotations

import torch

from .. import checks


def store(state: torch.Tensor, rows: torch.Tensor, h: torch.Tensor, live: torch.Tensor, pad: int):
    """``state[rows[i]] = h[i]`` where ``live[i]`` and ``rows[i]`` names a row of the state
    (pads and out-of-range rows of an unchecked call write nothing)."""
    keep = live & checks.real_rows(rows, state.shape[0], pad)
    state[rows[keep]] = h[keep].to(state.dtype)


class Checkpoints:
    """The state at every ``block_size`` boundary of each sequence, into its next column of
    ``rows`` (``(nseq, ncols)``). Position ``done[b] + t + 1`` is the request position after
    token ``t`` of sequence ``b``."""

    def __init__(self, rows: torch.Tensor | None, done: torch.Tensor, block_size: int, pad: int):
        self.rows, self.done, self.block_size, self.pad = rows, done, block_size, pad
        self.next = torch.zeros_like(done)

    def after(self, t: int, live: torch.Tensor, state: torch.Tensor, h: torch.Tensor) -> None:
        if not self.block_size:
            return
        ends = live & ((self.done + t + 1) % self.block_size == 0)
        # an unchecked call's boundaries past the index columns are not stored
        keep = ends & (self.next < self.rows.shape[1])
        if bool(keep.any()):
            col = self.next.clamp(max=self.rows.shape[1] - 1)[:, None]
            store(state, self.rows.long().gather(1, col)[:, 0], h, keep, self.pad)
        self.next += ends.long()


def computed(num_computed_tokens: torch.Tensor | None, count: int, device) -> torch.Tensor:
    """Tokens already in each sequence's source state (0 when not given), for ``count``
    sequences (a longer tensor's tail is ignored)."""
    if num_computed_tokens is None:
        return torch.zeros(count, dtype=torch.long, device=device)
    return num_computed_tokens[:count].long()


def checkpoint_columns(
    lengths: torch.Tensor, num_computed_tokens: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    """How many block boundaries each sequence crosses: the checkpoint columns it uses."""
    done = computed(num_computed_tokens, lengths.shape[0], lengths.device)
    if not block_size:
        return torch.zeros_like(done)
    return (done + lengths) // block_size - done // block_size


CHECKPOINTS = "checkpoint_state_indices"


def check_checkpoints(
    ckpt: torch.Tensor | None,
    lengths: torch.Tensor,
    done: torch.Tensor | None,
    block_size: int,
    nslots: int,
    pad: int,
    written: list[list[int]],
) -> None:
    """Eager value checks of ``num_computed_tokens`` and the checkpoint rows; adds the
    columns each sequence uses to its ``written`` rows (they count as destinations)."""
    if done is not None and bool((done < 0).any()):
        checks.fail("num_computed_tokens", "values >= 0", done.tolist())
    if not block_size:
        return
    checks.rows_in_range(CHECKPOINTS, ckpt, nslots, pad)
    used = checkpoint_columns(lengths, done, block_size)
    if used.numel() and int(used.max()) > ckpt.shape[1]:
        want = f"at least {int(used.max())} columns (block boundaries of the longest run)"
        checks.fail(CHECKPOINTS, want, tuple(ckpt.shape))
    for rows, k, cols in zip(written, used.tolist(), ckpt.tolist(), strict=True):
        rows.extend(cols[:k])


def assert_checkpoints(
    ckpt: torch.Tensor | None,
    lengths: torch.Tensor,
    done: torch.Tensor | None,
    block_size: int,
    nslots: int,
    pad: int,
    rows: torch.Tensor,
    written: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`check_checkpoints` on the device: returns ``rows`` (n, k) and ``written``
    (n, k) extended by the checkpoint columns, for ``checks.assert_row_rules``."""
    if done is not None:
        top = torch.iinfo(done.dtype).max
        checks.assert_within("num_computed_tokens", done, 0, top, "values >= 0")
    if not block_size:
        return rows, written
    checks.assert_rows_in_range(CHECKPOINTS, ckpt, nslots, pad)
    used = checkpoint_columns(lengths.long(), done, block_size)
    ncols = ckpt.shape[1]
    checks.assert_within(
        CHECKPOINTS, used, 0, ncols, f"at most {ncols} block boundaries per sequence (its columns)"
    )
    cols = torch.arange(ncols, device=rows.device)[None, :]
    return (
        torch.cat([rows, ckpt.to(rows.dtype)], dim=1),
        torch.cat([written, cols < used[:, None]], dim=1),
    )


def initial(state: torch.Tensor, src: torch.Tensor, pad: int, read: torch.Tensor | None = None):
    """Each sequence's starting state in float32: its source row, zeros for a pad source (or
    where ``read`` is False); rows outside the state are never read."""
    h = torch.zeros((src.shape[0], *state.shape[1:]), dtype=torch.float32, device=state.device)
    has_src = checks.real_rows(src, state.shape[0], pad)
    if read is not None:
        has_src &= read
    h[has_src] = state[src[has_src]].float()
    return h
