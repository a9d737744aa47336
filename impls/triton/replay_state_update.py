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
    from ._replay_kernel import replay_kernel

# Ring entries an append's output takes in at once (the direct route): a chunk of B is
# CHUNK x dstate values in registers beside the checkpoint tile.
CHUNK = 8


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    _, nheads, _, dstate = call["state"].shape
    ring = call["ring_x"].shape[1]
    if call.get("num_accepted_tokens") is not None:
        return "speculative calls (num_accepted_tokens) are not supported yet"
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
           direct: bool | None = None, maxnreg: int | None = None) -> None:
    """Run the kernel on a bound call; ``config`` overrides the tuned tile height and warps
    (``stream`` is not used). ``direct`` picks how an append computes its output: from the
    checkpoint and the ring without building the state (the default where A is tied), or,
    ``False``, by replaying the ring into the state as a flush does (always, for an A
    that is not tied: its decay differs within a tile). ``maxnreg`` caps the registers
    per thread (ptxas, sm_90, the Mamba2 benchmark call: 168 with ``direct``, 128
    without; capped at 128, ``direct`` spills 56 bytes)."""
    state, x, dt, A, B, C, D, z, dt_bias, out = (call[k] for k in (
        "state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "out"))
    src, dst, dt_limit = (call[k] for k in (
        "state_batch_indices", "dst_state_batch_indices", "dt_limit"))
    batch = x.shape[0]
    _, nheads, dim, dstate = state.shape
    if batch == 0:  # no sequence: nothing is read or written
        return
    block_n = triton.next_power_of_2(dstate)
    cfg = config or default_config(dim, block_n, state.element_size(), batch * nheads)
    block_d = _block_d(cfg, dim, nheads)
    a_tied = _tied(A, (-1, -2))
    call_kernel(replay_kernel, (batch * nheads * triton.cdiv(dim, block_d),),
        state_ptr=state, rx_ptr=call["ring_x"], rdt_ptr=call["ring_dt"], rB_ptr=call["ring_B"],
        len_ptr=call["ring_len"], x_ptr=x, dt_ptr=dt, bias_ptr=dt_bias, A_ptr=A, B_ptr=B,
        C_ptr=C, D_ptr=D, z_ptr=z, out_ptr=out, src_ptr=src, dst_ptr=dst,
        pad_slot_id=call["pad_slot_id"], nheads=nheads, dim=dim, dstate=dstate,
        heads_per_group=nheads // B.shape[1], nslots=state.shape[0],
        ring=call["ring_x"].shape[1],
        dt_lo=None if dt_limit is None else float(dt_limit[0]),
        dt_hi=None if dt_limit is None else float(dt_limit[1]),
        s_state=state.stride(), s_rx=call["ring_x"].stride(), s_rdt=call["ring_dt"].stride(),
        s_rB=call["ring_B"].stride(), s_len=stride0(call["ring_len"]),
        s_x=x.stride(), s_dt=dt.stride()[:2], s_bias=stride0(dt_bias), s_A=A.stride(),
        s_B=B.stride(), s_C=C.stride(), s_D=strides(D, 2), s_z=strides(z, 3),
        s_out=out.stride(), s_src=stride0(src), s_dst=stride0(dst),
        SOFTPLUS=bool(call["dt_softplus"]),
        A_TIED=a_tied,
        D_TIED=D is not None and _tied(D, (-1,)),
        DIRECT=a_tied and direct is not False,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        CHUNK=CHUNK,
        num_warps=cfg.num_warps,
        num_stages=1,
        maxnreg=maxnreg,
    )


replay_state_update = register(_op, launch, supports)
