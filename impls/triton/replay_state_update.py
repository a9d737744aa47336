"""Triton replay_state_update: one launch per call (``_replay_kernel``).

The tile of a program is the ``selective_state_update`` kernel's (headdim rows of one
head's state, all of dstate), chosen by the same rule: a decode step reads a checkpoint
tile as the standard step reads a state tile, and writes it only at a flush. Every tensor
is read through its strides (views into larger caches, strided index tensors); ties of A
and D (stride 0) become scalar loads, and dt and dt_bias are read at headdim 0, since the
op holds one step size per head.
"""

from __future__ import annotations

from typing import Any

import torch

from mamba_ir.ops.replay_state_update import replay_state_update as _op

from ._common import call_kernel, register, runnable, stride0, strides, triton
from ._replay_kernel import MAX_PROGRAMS_PER_SEQUENCE, MAX_RING
from .selective_state_update import MAX_DSTATE, Config, default_config

if triton is not None:
    from ._replay_kernel import replay_kernel, replay_tokens_kernel

# Ring entries an append's output takes in at once (the direct route): a chunk of B is
# CHUNK x dstate values in registers beside the checkpoint tile.
CHUNK = 8


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    _, nheads, _, dstate = call["state"].shape
    ring = call["ring_x"].shape[1]
    if dstate == 0:
        return "dstate=0: the kernel's state tile needs at least one column"
    if dstate > MAX_DSTATE:
        return f"dstate={dstate} > {MAX_DSTATE}: one head's state row must fit one block"
    if nheads == 0:
        return "nheads=0: no program would advance the rows' ring lengths"
    if nheads > MAX_PROGRAMS_PER_SEQUENCE:
        return (f"nheads={nheads} > {MAX_PROGRAMS_PER_SEQUENCE}: a sequence's programs "
                "count their reads of an in-place ring length in its upper bits")
    if ring > MAX_RING:
        return f"a ring of {ring} entries > {MAX_RING}: a length must fit 15 bits"
    return True


def _tied(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    return all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims)


def _block_d(cfg: Config, dim: int, nheads: int) -> int:
    """The tuned tile height, raised where a sequence would need too many programs."""
    block_d = min(cfg.block_d, triton.next_power_of_2(dim))
    fewest = triton.cdiv(dim, MAX_PROGRAMS_PER_SEQUENCE // nheads)
    return max(block_d, triton.next_power_of_2(fewest))


def launch(call: dict[str, Any], *, config: Config | None = None,
           direct: bool | None = None, maxnreg: int | None = None,
           prefetch: bool = False) -> None:
    """Run the kernel on a bound call; ``config`` overrides the tuned tile height and warps
    (``stream`` is not used). ``direct`` picks how an append computes its output: from the
    checkpoint and the ring without building the state (the default where A is tied), or,
    ``False``, by replaying the ring into the state as a flush does (always, for an A
    that is not tied: its decay differs within a tile). ``maxnreg`` caps the registers
    per thread (ptxas, sm_90, the Mamba2 benchmark call: 168 with ``direct``, 128
    without; capped at 128, ``direct`` spills 56 bytes). ``prefetch`` (one token, the
    direct route) loads the ring's first chunk of entries beside the ring's length
    instead of after it, and takes the entries in order: one round trip fewer per
    append, for up to ``CHUNK - 1`` entries read that the ring does not hold (a
    candidate for the default, not yet timed on a GPU: docs/bench-replay.md)."""
    state, x, dt, A, B, C, D, z, dt_bias, out = (call[k] for k in (
        "state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "out"))
    src, dst, dt_limit, nacc = (call[k] for k in (
        "state_batch_indices", "dst_state_batch_indices", "dt_limit", "num_accepted_tokens"))
    batch = x.shape[0]
    _, nheads, dim, dstate = state.shape
    if batch == 0:  # no sequence: nothing is read or written
        return
    # speculative: T tokens a sequence (T = 0 compiles the one-token kernel); a per-token
    # tensor's strides as (sequence, head or group, last), the token's apart
    tokens = 0 if nacc is None else x.shape[1]
    per_token = (x, dt, B, C, z, out)
    s_x, s_B, s_C, s_z, s_out = (
        (0, 0, 0) if t is None else (t.stride(0), *t.stride()[-2:]) for t in (x, B, C, z, out))
    s_dt = (dt.stride(0), dt.stride(-2))
    s_tok = tuple(0 if t is None or not tokens else t.stride(1) for t in per_token)
    block_n = triton.next_power_of_2(dstate)
    cfg = config or default_config(dim, block_n, state.element_size(), batch * nheads)
    block_d = _block_d(cfg, dim, nheads)
    a_tied = _tied(A, (-1, -2))
    grid = (batch * nheads * triton.cdiv(dim, block_d),)
    common = dict(
        pad_slot_id=call["pad_slot_id"], nheads=nheads, dim=dim, dstate=dstate,
        heads_per_group=nheads // B.shape[-2], nslots=state.shape[0],
        dt_lo=None if dt_limit is None else float(dt_limit[0]),
        dt_hi=None if dt_limit is None else float(dt_limit[1]),
        s_rx=call["ring_x"].stride(), s_rdt=call["ring_dt"].stride(),
        s_rB=call["ring_B"].stride(), s_len=stride0(call["ring_len"]), s_x=s_x, s_dt=s_dt,
        s_bias=stride0(dt_bias), s_B=s_B, s_src=stride0(src), s_dst=stride0(dst),
        SOFTPLUS=bool(call["dt_softplus"]), BLOCK_D=block_d, BLOCK_N=block_n,
        T=tokens, TP=triton.next_power_of_2(max(tokens, 1)),
    )
    call_kernel(replay_kernel, grid,
        state_ptr=state, rx_ptr=call["ring_x"], rdt_ptr=call["ring_dt"], rB_ptr=call["ring_B"],
        len_ptr=call["ring_len"], x_ptr=x, dt_ptr=dt, bias_ptr=dt_bias, A_ptr=A, B_ptr=B,
        C_ptr=C, D_ptr=D, z_ptr=z, out_ptr=out, src_ptr=src, dst_ptr=dst, nacc_ptr=nacc,
        ring=call["ring_x"].shape[1], s_state=state.stride(), s_A=A.stride(), s_C=s_C,
        s_D=strides(D, 2), s_z=s_z, s_out=s_out, s_nacc=stride0(nacc), s_tok=s_tok,
        A_TIED=a_tied,
        D_TIED=D is not None and _tied(D, (-1,)),
        DIRECT=a_tied and direct is not False,
        PREFETCH=bool(prefetch) and a_tied and direct is not False and not tokens,
        CHUNK=CHUNK,
        num_warps=cfg.num_warps,
        num_stages=1,
        maxnreg=maxnreg,
        **common,
    )
    if tokens:  # the tokens' entries, once every program of the first launch has read
        call_kernel(replay_tokens_kernel, grid,
            rx_ptr=call["ring_x"], rdt_ptr=call["ring_dt"], rB_ptr=call["ring_B"],
            len_ptr=call["ring_len"], x_ptr=x, dt_ptr=dt, bias_ptr=dt_bias, B_ptr=B,
            src_ptr=src, dst_ptr=dst, s_tok=s_tok[:3], num_warps=cfg.num_warps, num_stages=1,
            **common)


replay_state_update = register(_op, launch, supports)
