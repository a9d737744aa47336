"""Triton replay_materialize: two launches per call (``_materialize_kernel``).

The first replays each entry's ring into its checkpoint, one program per (entry, head,
``BLOCK_D`` rows of headdim) with the whole of dstate, as ``replay_state_update`` replays
at a flush, and stores the state once; the second sets the destinations' ``ring_len`` to 0
after every program has read the source lengths. Every tensor is read through its strides
(row members may be views of larger caches; index tensors strided); a stride-0 ``A`` is
read as a tile like any other.
"""

from __future__ import annotations

from typing import Any

from mamba_ir.ops.replay_materialize import replay_materialize as _op

from ._common import call_kernel, register, runnable, strides, triton
from .selective_state_update import MAX_DSTATE

if triton is not None:
    from ._materialize_kernel import empty_rings_kernel, materialize_kernel

BLOCK_D = 16  # headdim rows per program: 16 x dstate fp32 values in registers, as the SSU
BLOCK = 128  # destination rows per program of the length launch


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    dstate = call["state"].shape[-1]
    if dstate == 0:
        return "dstate=0: the kernel's state tile needs at least one column"
    if dstate > MAX_DSTATE:
        return f"dstate={dstate} > {MAX_DSTATE}: one head's state row must fit one block"
    return True


def launch(call: dict[str, Any], *, block_d: int = BLOCK_D, num_warps: int = 1) -> None:
    """Run the kernels on a bound call; ``block_d`` and ``num_warps`` are for tuning."""
    state, ring_x, ring_len, src, dst = (call[k] for k in (
        "state", "ring_x", "ring_len", "src", "dst"))
    count = src.shape[0]
    nslots, nheads, dim, dstate = state.shape
    if count == 0 or nheads == 0 or dim == 0:  # nothing to write but the lengths
        if count:
            _empty_rings(call)
        return
    ngroups = call["ring_B"].shape[2]
    block_d = min(block_d, triton.next_power_of_2(dim))
    call_kernel(materialize_kernel, (count, nheads, triton.cdiv(dim, block_d)),
        state_ptr=state, ring_x_ptr=ring_x, ring_dt_ptr=call["ring_dt"],
        ring_B_ptr=call["ring_B"], ring_len_ptr=ring_len, A_ptr=call["A"],
        src_ptr=src, dst_ptr=dst, pad_slot_id=call["pad_slot_id"], nslots=nslots,
        ring=ring_x.shape[1], dim=dim, dstate=dstate, heads_per_group=nheads // ngroups,
        s_state=strides(state, 4), s_rx=strides(ring_x, 4), s_rdt=strides(call["ring_dt"], 3),
        s_rb=strides(call["ring_B"], 4), s_len=ring_len.stride(0), s_A=strides(call["A"], 3),
        s_src=src.stride(0), s_dst=dst.stride(0),
        BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(dstate), num_warps=num_warps,
    )
    _empty_rings(call)


def _empty_rings(call: dict[str, Any]) -> None:
    ring_len, dst = call["ring_len"], call["dst"]
    count = dst.shape[0]
    call_kernel(empty_rings_kernel, (triton.cdiv(count, BLOCK),),
        ring_len_ptr=ring_len, dst_ptr=dst, pad_slot_id=call["pad_slot_id"],
        nslots=ring_len.shape[0], count=count, s_len=ring_len.stride(0), s_dst=dst.stride(0),
        BLOCK=BLOCK,
    )


replay_materialize = register(_op, launch, supports)
