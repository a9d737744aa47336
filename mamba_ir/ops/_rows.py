"""State rows: writing a native op's carried states into them (final rows, align-mode
checkpoints), and the row facts the ops declare (checkpoint rows, whole conv windows)."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import checks
from ..op import Rows
from ._philox import state_bits
from ._quant import quantize, round_stochastic, values


def store(
    state: torch.Tensor,
    rows: torch.Tensor,
    h: torch.Tensor,
    live: torch.Tensor,
    pad: int,
    scale: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    column: int = 0,
):
    """``state[rows[i]] = h[i]`` where ``live[i]`` and ``rows[i]`` names a row of the state
    (pads and out-of-range rows of an unchecked call write nothing); a quantized state
    stores values and ``scale`` (``_quant``). With ``seed`` values round stochastically,
    by the bits of their destination row and token ``column`` (``_philox.state_bits``)."""
    keep = live & checks.real_rows(rows, state.shape[0], pad)
    bits = None
    if seed is not None:
        bits = state_bits(seed, rows[keep], tuple(state.shape[1:]), column)
    if scale is not None:
        state[rows[keep]], scale[rows[keep]] = quantize(h[keep], state.dtype, bits)
    elif bits is not None:
        state[rows[keep]] = round_stochastic(h[keep], state.dtype, bits)
    else:
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
    sequences (a longer tensor's tail is ignored); an unchecked negative count is 0, as in
    every provider."""
    if num_computed_tokens is None:
        return torch.zeros(count, dtype=torch.long, device=device)
    return num_computed_tokens[:count].long().clamp(min=0)


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
) -> None:
    """Eager value checks of ``num_computed_tokens`` and the checkpoint rows."""
    if done is not None and bool((done < 0).any()):
        checks.fail("num_computed_tokens", "values >= 0", done.tolist())
    if not block_size:
        return
    checks.rows_in_range(CHECKPOINTS, ckpt, nslots, pad)
    used = checkpoint_columns(lengths, done, block_size)
    if used.numel() and int(used.max()) > ckpt.shape[1]:
        want = f"at least {int(used.max())} columns (block boundaries of the longest run)"
        checks.fail(CHECKPOINTS, want, tuple(ckpt.shape))


def assert_checkpoints(
    ckpt: torch.Tensor | None,
    lengths: torch.Tensor,
    done: torch.Tensor | None,
    block_size: int,
    nslots: int,
    pad: int,
) -> None:
    """:func:`check_checkpoints` on the device."""
    if done is not None:
        top = torch.iinfo(done.dtype).max
        checks.assert_within("num_computed_tokens", done, 0, top, "values >= 0")
    if not block_size:
        return
    checks.assert_rows_in_range(CHECKPOINTS, ckpt, nslots, pad)
    used = checkpoint_columns(lengths.long(), done, block_size)
    ncols = ckpt.shape[1]
    checks.assert_within(
        CHECKPOINTS, used, 0, ncols, f"at most {ncols} block boundaries per sequence (its columns)"
    )


def check_checkpoint_args(call: dict, nseq: int) -> None:
    """The align-mode arguments of a prefill op: ``block_size`` >= 0, and
    ``checkpoint_state_indices`` (nseq, ncols) given exactly when it is positive."""
    bs = call["block_size"]
    if not isinstance(bs, (int, torch.SymInt)) or bs < 0:
        checks.fail("block_size", "an int >= 0 (0: no checkpoints)", repr(bs))
    ckpt = checks.index(call, CHECKPOINTS, ndim=2, rows=nseq, padded=True)
    if bs and ckpt is None:
        checks.fail(CHECKPOINTS, "(nseq, ncols) slot indices with block_size", None)
    if not bs and ckpt is not None:
        checks.fail("block_size", "a positive block size with checkpoint_state_indices", bs)


def check_prefill_values(
    call: dict,
    offsets: str,
    ntokens: int,
    state: str,
    indices: tuple[str, ...],
    *,
    checkpoints: bool = False,
    on_device: bool = False,
) -> None:
    """The value checks the prefill ops share, eagerly or on the device (``on_device``):
    sequence offsets over the ``ntokens`` tokens, each sequence's ``indices`` in range,
    and with ``checkpoints`` the computed-token counts and checkpoint rows."""
    qsl = call[offsets]
    (checks.assert_cumulative if on_device else checks.cumulative)(offsets, qsl, ntokens)
    nseq, nslots, pad = qsl.shape[0] - 1, call[state].shape[0], call["pad_slot_id"]
    checks.indices_in_range(call, indices, nseq, nslots, on_device=on_device)
    if checkpoints:
        ckpt, done = (checks.sequences(call[k], nseq) for k in (CHECKPOINTS, "num_computed_tokens"))
        check = assert_checkpoints if on_device else check_checkpoints
        check(ckpt, (qsl[1:] - qsl[:-1]).long(), done, call["block_size"], nslots, pad)


def with_checkpoints(
    rows: Rows,
    ckpt: torch.Tensor | None,
    lengths: torch.Tensor,
    done: torch.Tensor | None,
    block_size: int,
) -> Rows:
    """``rows`` with the checkpoint columns each sequence uses added to its destinations:
    they are written too."""
    if not block_size:
        return rows
    used = checkpoint_columns(lengths.long(), done, block_size)
    cols = torch.arange(ckpt.shape[1], device=ckpt.device)[None, :]
    dst = rows.destinations
    return Rows(
        rows.sources, rows.reads,
        torch.cat([dst, ckpt.to(dst.dtype)], dim=1),
        torch.cat([rows.written, cols < used[:, None]], dim=1),
    )


def initial(
    state: torch.Tensor,
    src: torch.Tensor,
    pad: int,
    read: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
):
    """Each sequence's starting state in float32: its source row (dequantized by ``scale``
    where the state is quantized), zeros for a pad source (or where ``read`` is False);
    rows outside the state are never read."""
    h = torch.zeros((src.shape[0], *state.shape[1:]), dtype=torch.float32, device=state.device)
    has_src = checks.real_rows(src, state.shape[0], pad)
    if read is not None:
        has_src &= read
    rows = src[has_src]
    h[has_src] = values(state[rows], None if scale is None else scale[rows])
    return h


def whole_window(conv_state: torch.Tensor, weight: torch.Tensor) -> str | None:
    """``None`` when a conv op rewrites every column of a destination row (the row holds
    exactly the width-1 window), else why not: align fusion needs whole rows."""
    state_len, width = conv_state.shape[2], weight.shape[1]
    if not statically_known_true(state_len == width - 1):
        return f"conv state holds {state_len} columns, the op writes width-1 = {width - 1}"
    return None


def per_sequence_rows(call: dict, dst: str, src: str, lengths: torch.Tensor) -> Rows:
    """The rows of a prefill op: sequence b reads ``call[src][b]`` (when it has an initial
    state) and writes ``call[dst][b]`` (when it has a token); missing indices mean row b."""
    n = lengths.shape[0]
    dst_rows = checks.sequences(call[dst], n)
    if dst_rows is None:
        dst_rows = torch.arange(n, device=lengths.device)
    src_rows = dst_rows if call[src] is None else checks.sequences(call[src], n)
    init = checks.sequences(call["has_initial_state"], n)
    reads = torch.zeros(n, dtype=torch.bool, device=lengths.device) if init is None else init
    return Rows(src_rows, reads, dst_rows[:, None], (lengths > 0)[:, None])
