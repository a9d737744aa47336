"""FlashInfer selective_state_update (``flashinfer.mamba.selective_state_update``, 0.7.2).

FlashInfer ships two CUDA kernels behind one function: a one-token kernel (x of shape
(batch, nheads, dim)) and a multi-token kernel (x of shape (batch, T, nheads, dim), or
packed tokens with ``cu_seqlens``). Both are compiled on first use for each (dtypes, dim,
dstate, tokens) and both assume the Mamba2 layout: dt, A, D and dt_bias hold one value
per head. :func:`plan` says which kernel serves a call, or why none can; it reads only
shapes, strides, dtypes and devices, so it answers the same for fake tensors. docs/flashinfer.md
lists every rule with the source line or experiment behind it. ``one_token=False`` (to
:func:`plan` and :func:`selective_state_update`) keeps every call off the one-token
kernel: the path of one-token calls that kernel cannot take, for tests and benchmarks.

Where FlashInfer's meaning differs from the op's, the call is rewritten before launch:

- a source pad with a real destination starts from zero state and still writes (the op),
  whereas FlashInfer writes nothing for a pad source. :func:`_prepare` (Triton)
  zeroes that sequence's first destination row and points its source there;
- FlashInfer's one-token kernel writes a pad destination row, so calls with destination
  indices take the multi-token kernel (T=1), which skips pad destinations;
- without speculative decoding only the final state is written: destination indices are
  passed as one column, so every step rewrites the same row and the last one stays;
- D may be absent (FlashInfer needs it: zeros), dt/D/dt_bias may differ in dtype
  (widened to float32 together, exactly), and per-head vectors are made head-contiguous;
- index tensors longer than the sequences are cut to them, index tensors in any layout
  (a column of a 2-D tensor, a stride) are passed as contiguous copies, and values an
  unchecked call may hold are bounded (FlashInfer checks none): all in one launch,
  :func:`_prepare`.

``dt_limit`` is refused: FlashInfer 0.7.2 has no clamp of dt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from mamba_ir.ops.selective_state_update import selective_state_update as _op

try:
    import triton
    import triton.language as tl

    from mamba_ir.impls.triton._common import call_kernel, index_strides
except ImportError:  # only the index preparation needs it; calls with indices are refused
    triton = None
    tl = None

PROVIDER = "flashinfer"
HEADDIMS = (64, 128)  # multiples of 64 compile; these are checked against native on a GPU
MIN_DSTATE, MAX_DSTATE = 64, 256
MAX_TOKENS = 128  # the multi-token kernel stages per-token values with one thread each
HEAD_RATIOS = (1, 2, 4, 8, 16, 32, 64)  # nheads / ngroups instantiated by the multi-token kernel
INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Device:
    """What the predicate needs to know about the GPU a call runs on."""

    capability: tuple[int, int]
    smem_per_block: int  # bytes of shared memory one block may opt into


@dataclass(frozen=True)
class Plan:
    """How a call reaches FlashInfer."""

    kernel: str  # "one-token", "multi-token", or "none" (no tokens: nothing to launch)
    ntokens: int = 1  # tokens per sequence the multi-token kernel is compiled for
    fix_pad_sources: bool = False  # rewrite pad sources that have a real destination


# -- availability ---------------------------------------------------------------------


@functools.cache
def load_flashinfer() -> Callable[..., Any] | str:
    """FlashInfer's function, or why it cannot be imported (importing it is slow: once)."""
    try:
        from flashinfer.mamba import selective_state_update as fi
    except Exception as exc:  # missing, or built for another torch / CUDA
        return (
            f"flashinfer is not importable ({type(exc).__name__}: {exc}); "
            "pip install mamba-ir[flashinfer]"
        )
    return fi


@functools.cache
def device_info(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    return Device((props.major, props.minor), int(smem))


def runnable(call: dict[str, Any]) -> bool | str:
    """True when FlashInfer can run at all on the call's tensors, else why not."""
    fi = load_flashinfer()
    if isinstance(fi, str):
        return fi
    devices = {v.device.type for v in call.values() if isinstance(v, torch.Tensor)}
    if devices != {"cuda"}:
        return f"tensors on {sorted(devices - {'cuda'})}: FlashInfer needs CUDA tensors"
    return True


# -- the predicate ----------------------------------------------------------------------


def supports(**call: Any) -> bool | str:
    ok = runnable(call)
    if ok is not True:
        return ok
    found = plan(call, device_info(call["state"].device.index or 0), triton is not None)
    return found if isinstance(found, str) else True


def plan(
    call: dict[str, Any], device: Device, can_index: bool, *, one_token: bool = True
) -> Plan | str:
    """Which FlashInfer kernel serves ``call``, or why neither can. ``one_token=False``
    plans one-token calls on the multi-token kernel (T=1), as for those the one-token
    kernel cannot take."""
    state, x = call["state"], call["x"]
    if device.capability[0] not in (8, 9):
        major, minor = device.capability
        return (
            f"compute capability {major}.{minor}: FlashInfer picks other kernels there, "
            "and this provider's rules were established for sm_80 to sm_90"
        )
    if state.dim() != 4:
        return (
            "Mamba1 layout (3-D state): FlashInfer holds dt, A and D as one value per head; "
            "pass the Mamba2 layout (nheads, headdim, dstate)"
        )
    if call.get("dt_limit") is not None:
        return "dt_limit: FlashInfer 0.7.2's selective_state_update has no clamp of dt"
    if call.get("state_scale") is not None:
        return ("quantized state (state_scale): FlashInfer's int16 scales are not yet "
                "checked against the op's quantization (mamba_ir/ops/_quant.py)")
    if call.get("rand_seed") is not None:
        return ("stochastic rounding (rand_seed): FlashInfer draws other random bits than "
                "the op's Philox counters (mamba_ir/ops/_quant.py), so results would differ")
    if x.numel() == 0:
        return Plan("none")  # no tokens: nothing to read or write
    _, nheads, dim, dstate = state.shape
    ngroups = call["B"].shape[-2]
    varlen = call["cu_seqlens"] is not None
    spec = call["num_accepted_tokens"] is not None
    lead = tuple(x.shape[:-2])

    why = _dtypes(call) or _ties(call) or _sizes(dim, dstate) or _layouts(call)
    if why:
        return why
    indexed = any(call[n] is not None for n in ("state_batch_indices", "dst_state_batch_indices",
                                                "cu_seqlens", "num_accepted_tokens"))
    if indexed and not can_index:
        return ("triton is not installed: FlashInfer checks no index, and the provider bounds "
                "the index tensors with a Triton launch before it (pip install triton)")
    nseq = call["cu_seqlens"].shape[0] - 1 if varlen else lead[0]
    if nseq > state.shape[0]:
        return (
            f"{nseq} sequences but {state.shape[0]} state rows: FlashInfer requires at least "
            "as many state rows as sequences, pads included"
        )
    pad = call["pad_slot_id"]
    if not INT32[0] <= pad <= INT32[1]:
        return f"pad_slot_id={pad}: FlashInfer holds it as a 32-bit integer"

    dst = call["dst_state_batch_indices"]
    single = not varlen and len(lead) == 1 and not spec and dst is None
    if single and one_token and _one_token_ok(call):
        return Plan("one-token")
    if nheads // ngroups not in HEAD_RATIOS:
        return (
            f"nheads/ngroups={nheads // ngroups}: FlashInfer's multi-token kernel (used with "
            f"destination indices, several tokens or unaligned inputs) needs one of {HEAD_RATIOS}"
        )
    if varlen and not spec:
        return (
            "cu_seqlens without num_accepted_tokens: FlashInfer compiles for a maximum number "
            "of tokens per sequence, which only the speculative index width bounds; pass "
            "(batch, T) tokens instead"
        )
    if varlen:
        widths = [t.shape[1] for t in (call["state_batch_indices"], dst) if t is not None]
        ntokens = min(widths)
    else:
        ntokens = lead[1] if len(lead) == 2 else 1
    if ntokens > MAX_TOKENS:
        return (
            f"{ntokens} tokens per sequence: FlashInfer's multi-token kernel handles "
            f"at most {MAX_TOKENS}"
        )
    smem = multi_token_smem(x.dtype, state.dtype, ntokens, dim, dstate)
    if smem > device.smem_per_block:
        return (
            f"{ntokens} tokens per sequence need {smem} bytes of shared memory in FlashInfer's "
            f"multi-token kernel; this GPU allows {device.smem_per_block}"
        )
    return Plan("multi-token", ntokens, dst is not None or spec)


def _dtypes(call: dict[str, Any]) -> str | None:
    x = call["x"]
    for name in ("B", "C", "z", "out"):
        t = call[name]
        if t is not None and t.dtype != x.dtype:
            return (
                f"{name} is {_name(t.dtype)} but x is {_name(x.dtype)}: FlashInfer takes "
                "x, B, C, z and out in one dtype"
            )
    return None


def _ties(call: dict[str, Any]) -> str | None:
    """dt, A, D and dt_bias must be one value per head (stride 0 over headdim, dstate)."""
    checks = (("dt", (-1,)), ("A", (-1, -2)), ("D", (-1,)), ("dt_bias", (-1,)))
    for name, dims in checks:
        t = call[name]
        if t is not None and not all(t.stride(d) == 0 or t.shape[d] == 1 for d in dims):
            return (
                f"{name} has strides {tuple(t.stride())}: FlashInfer takes one value per head, "
                f"broadcast with stride 0 (e.g. {name}[..., :1].expand_as({name}))"
            )
    return None


def _sizes(dim: int, dstate: int) -> str | None:
    if dim not in HEADDIMS:
        return (
            f"headdim={dim}: FlashInfer's kernels build for multiples of 64, and "
            f"{HEADDIMS} are the ones checked against native on a GPU"
        )
    if dstate % 32 or not MIN_DSTATE <= dstate <= MAX_DSTATE:
        return (
            f"dstate={dstate}: FlashInfer's kernels build for multiples of 32 "
            f"from {MIN_DSTATE} to {MAX_DSTATE}"
        )
    return None


def _layouts(call: dict[str, Any]) -> str | None:
    state = call["state"]
    _, _, dim, dstate = state.shape
    if state.stride()[1:] != (dim * dstate, dstate, 1):
        return (
            f"state has strides {tuple(state.stride())}: FlashInfer needs each row's "
            "(nheads, headdim, dstate) block contiguous"
        )
    if not _aligned(state, 16) or (state.stride(0) * state.element_size()) % 16:
        return "state rows must start on 16-byte boundaries for FlashInfer's vector loads"
    for name in ("x", "z", "out", "B", "C"):
        t = call[name]
        if t is None:
            continue
        inner = t.shape[-1]
        if t.stride(-1) != 1 or t.stride(-2) != inner:
            return (
                f"{name} has strides {tuple(t.stride())}: FlashInfer needs its last two "
                f"dimensions contiguous ({name}.contiguous())"
            )
        lead_bytes = [s * t.element_size() for s in t.stride()[:-2]]
        if not _aligned(t, 16) or any(b % 16 for b in lead_bytes):
            return (
                f"{name} must start on and step by 16-byte boundaries for FlashInfer's vector loads"
            )
    return None


def _one_token_ok(call: dict[str, Any]) -> bool:
    """FlashInfer's one-token kernel also needs a contiguous out and, as the Hopper
    variant loads with TMA, 128-byte aligned inputs; it writes at most 128 rows of output
    per head. Calls that miss any of these take the multi-token kernel instead."""
    if not call["out"].is_contiguous() or call["state"].shape[2] > 128:
        return False
    tensors = [call[n] for n in ("state", "x", "B", "C", "z") if call[n] is not None]
    return all(_aligned(t, 128) for t in tensors)


def multi_token_smem(
    in_dtype: torch.dtype, state_dtype: torch.dtype, ntokens: int, dim: int, dstate: int
) -> int:
    """Bytes of shared memory FlashInfer's multi-token kernel requests (its largest
    variant, one block per head row), mirroring the layout of its staging buffers."""
    isz = torch.empty((), dtype=in_dtype).element_size()
    ssz = torch.empty((), dtype=state_dtype).element_size()
    padded = -(-dstate * isz // 128) * 128 // isz  # dstate rounded up to 128 bytes
    rows_per_pass = 16
    stages = 1 if dim == rows_per_pass else 2
    size = 0
    for align, nbytes in (
        (128, ntokens * padded * isz),  # B
        (128, ntokens * padded * isz),  # C
        (128, ntokens * dim * isz),  # x
        (4, ntokens * 4),  # dt
        (4, ntokens * dim * 4),  # out
        (8, ntokens * 8),  # destination slot per step
        (128, stages * rows_per_pass * padded * ssz),  # state prefetch
    ):
        size = -(-size // align) * align + nbytes
    return -(-size // 128) * 128


def _aligned(t: torch.Tensor, nbytes: int) -> bool:
    """Whether ``t`` starts on an ``nbytes`` boundary; for tensors without an address
    (fake, meta), assuming like PyTorch's allocators that their storage does."""
    if t.device.type == "meta" or is_fake(t):
        address = t.storage_offset() * t.element_size()
    else:
        address = t.data_ptr()
    return address % nbytes == 0


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the implementation -----------------------------------------------------------------


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] | None = None,
    state_batch_indices: torch.Tensor | None = None,
    dst_state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = -1,
    cu_seqlens: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    state_scale: torch.Tensor | None = None,
    rand_seed: torch.Tensor | None = None,
    *,
    one_token: bool = True,
) -> None:
    """The op on FlashInfer, for calls :func:`plan` accepts; ``one_token`` as :func:`plan`
    takes it."""
    call = dict(locals())
    del call["one_token"]  # not an argument of the op
    how = plan(call, device_info(state.device.index or 0), triton is not None,
               one_token=one_token)
    if isinstance(how, str):
        raise ValueError(f"flashinfer cannot run this call: {how}")
    if how.kernel == "none":
        return
    fi = load_flashinfer()
    assert not isinstance(fi, str), fi
    dt, D, dt_bias = _weights(dt, D, dt_bias, state.shape[1])
    A = _per_head(A)
    if how.kernel == "multi-token" and cu_seqlens is None and x.dim() == 3:
        x, dt, B, C, z, out = (t if t is None else t.unsqueeze(1) for t in (x, dt, B, C, z, out))
    cu_seqlens, sbi, dst, nacc = _prepare(
        state, x, state_batch_indices, dst_state_batch_indices, num_accepted_tokens,
        cu_seqlens, pad_slot_id, how.fix_pad_sources,
    )
    varlen = cu_seqlens is not None
    fi(
        state, x, dt, A, B, C, D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=bool(dt_softplus),
        state_batch_indices=sbi,
        dst_state_batch_indices=dst,
        pad_slot_id=pad_slot_id,
        out=out,
        cache_steps=how.ntokens if varlen else 0,
        cu_seqlens=cu_seqlens if varlen else None,
        num_accepted_tokens=nacc,
    )  # fmt: skip


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """A tied parameter as FlashInfer reads it: a contiguous per-head vector, broadcast."""
    if t.stride(0) == 1:
        return t
    vec = t[(slice(None),) + (0,) * (t.dim() - 1)].contiguous()
    return vec[(slice(None),) + (None,) * (t.dim() - 1)].expand(t.shape)


def _weights(
    dt: torch.Tensor, D: torch.Tensor | None, dt_bias: torch.Tensor | None, nheads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dt, D and dt_bias in one dtype (float32 unless they share one: exact), per head
    contiguous, and a zero D where there is none."""
    dtypes = {t.dtype for t in (dt, D, dt_bias) if t is not None}
    wdtype = dt.dtype if len(dtypes) == 1 else torch.float32
    if D is None:
        D = torch.zeros(nheads, 1, dtype=wdtype, device=dt.device).expand(nheads, dt.shape[-1])
    if dt.dtype != wdtype or dt.stride(-2) != 1:
        dt = dt[..., :1].to(wdtype, memory_format=torch.contiguous_format).expand(dt.shape)
    D = _per_head(D.to(wdtype))
    dt_bias = None if dt_bias is None else _per_head(dt_bias.to(wdtype))
    return dt, D, dt_bias


# -- index tensors as FlashInfer reads them, in one launch ---------------------------------


def _prepare(
    state: torch.Tensor,
    x: torch.Tensor,
    sbi: torch.Tensor | None,
    dst: torch.Tensor | None,
    nacc: torch.Tensor | None,
    cu: torch.Tensor | None,
    pad: int,
    fix_pad_sources: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(cu_seqlens, state_batch_indices, dst_state_batch_indices, num_accepted_tokens)``
    as FlashInfer takes them, written by one Triton launch (none without index tensors).

    - **Bounded.** FlashInfer checks no index, and a compiled call has no value checks:
      rows outside ``[0, slots)`` become pads, accepted counts name an existing column,
      offsets stay in ``[0, tokens]`` and never decrease. Valid values are unchanged.
    - **Contiguous**, cut to the sequences, the destinations in the sources' dtype.
    - **Columns.** Speculative decoding writes every token's state: 2-D destinations, the
      sources themselves when none are given. Otherwise only the final state is written,
      so one column suffices (FlashInfer rewrites it at every step; the last one stays).
    - **Pad sources** with a real destination (``fix_pad_sources``): the first destination
      row such a sequence writes is zeroed and becomes its source, so FlashInfer reads
      zeros and writes it, as the op does.

    One launch because each torch operation is a kernel of its own: bounding four index
    tensors that way cost more than FlashInfer's one-token kernel at small batch.
    """
    spec, varlen = nacc is not None, cu is not None
    nseq = cu.shape[0] - 1 if varlen else x.shape[0]
    if sbi is None and dst is None and not spec and not varlen:
        return None, None, None, None
    dev = state.device
    s_2d = sbi is not None and sbi.dim() == 2
    d_2d = dst is not None and dst.dim() == 2
    src_cols = sbi.shape[1] if spec and s_2d else 1
    if dst is not None:
        dst_cols, dst_2d = (dst.shape[1], True) if spec and d_2d else (1, False)
    else:
        dst_cols, dst_2d = src_cols, spec and s_2d  # speculative: the sources are written
    fix = fix_pad_sources and (sbi is not None or dst is not None)
    dtype = next((t.dtype for t in (sbi, dst) if t is not None), torch.int32)

    def empty(cols: int, two_d: bool, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty((nseq, cols) if two_d else (nseq,), dtype=dt, device=dev)

    new_sbi = empty(src_cols, spec and s_2d) if sbi is not None or fix else None
    if dst is not None or (spec and fix):
        new_dst = empty(dst_cols, dst_2d)
    else:  # speculative without destinations and nothing to fix: FlashInfer's own choice
        new_dst = new_sbi if spec else None
    new_nacc = empty(1, False, nacc.dtype) if spec else None
    new_cu = torch.empty(nseq + 1, dtype=cu.dtype, device=dev) if varlen else None
    if nseq == 0:
        if varlen:
            new_cu.copy_(cu[:1].clamp(0, x.shape[0]))
        return new_cu, new_sbi, new_dst, new_nacc
    row = state[0].numel()
    block = 1024
    # Few programs per sequence: most sequences only read their indices and stop.
    grid = (nseq, min(triton.cdiv(row, block), 8) if fix else 1)
    dummy = next(t for t in (new_sbi, new_dst, new_nacc, new_cu) if t is not None)

    (sbi_s0, sbi_s1), (dst_s0, dst_s1) = index_strides(sbi), index_strides(dst)
    call_kernel(
        _prepare_kernel, grid,
        state_ptr=state, row_numel=row, row_stride=state.stride(0), nslots=state.shape[0],
        pad=pad, sbi_ptr=dummy if sbi is None else sbi, sbi_s0=sbi_s0, sbi_s1=sbi_s1,
        src_cols=src_cols,
        dst_ptr=dummy if dst is None else dst, dst_s0=dst_s0, dst_s1=dst_s1,
        dst_cols=dst_cols, nacc_ptr=dummy if nacc is None else nacc,
        nacc_s0=nacc.stride(0) if spec else 0, nacc_max=sbi.shape[1] if s_2d else 2**31 - 1,
        cu_ptr=dummy if cu is None else cu, cu_s0=cu.stride(0) if varlen else 0,
        ntokens=x.shape[0], new_sbi_ptr=dummy if new_sbi is None else new_sbi,
        new_dst_ptr=dummy if new_dst is None or new_dst is new_sbi else new_dst,
        new_nacc_ptr=dummy if new_nacc is None else new_nacc,
        new_cu_ptr=dummy if new_cu is None else new_cu,
        fixed_limit=_written_columns(x, spec, dst_cols) if not varlen else 0,
        HAS_SBI=sbi is not None, HAS_DST=dst is not None, S_2D=s_2d,
        WRITE_SBI=new_sbi is not None,
        WRITE_DST=new_dst is not None and new_dst is not new_sbi,
        SPEC=spec, VARLEN=varlen, FIX=fix,
        NCOLS=triton.next_power_of_2(max(src_cols, dst_cols)),
        NCU=triton.next_power_of_2(nseq + 1) if varlen else 1,
        BLOCK=block,
    )  # fmt: skip
    return new_cu, new_sbi, new_dst, new_nacc


def _written_columns(x: torch.Tensor, spec: bool, ncols: int) -> int:
    """Destination columns each sequence of a (batch, T) call writes."""
    return min(x.shape[1], ncols) if spec else min(x.shape[1], 1)


if triton is not None:

    @triton.jit
    def _bound_rows(rows, nslots, pad):
        return tl.where((rows >= 0) & (rows < nslots), rows, pad)

    @triton.jit
    def _prepare_kernel(
        state_ptr, row_numel, row_stride, nslots, pad,
        sbi_ptr, sbi_s0, sbi_s1, src_cols,
        dst_ptr, dst_s0, dst_s1, dst_cols,
        nacc_ptr, nacc_s0, nacc_max, cu_ptr, cu_s0, ntokens,
        new_sbi_ptr, new_dst_ptr, new_nacc_ptr, new_cu_ptr,
        fixed_limit,
        HAS_SBI: tl.constexpr, HAS_DST: tl.constexpr, S_2D: tl.constexpr,
        WRITE_SBI: tl.constexpr, WRITE_DST: tl.constexpr,
        SPEC: tl.constexpr, VARLEN: tl.constexpr, FIX: tl.constexpr,
        NCOLS: tl.constexpr, NCU: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        part = tl.program_id(1)
        cols = tl.arange(0, NCOLS)
        length = 0
        if VARLEN:  # the running maximum of the clamped offsets, up to this sequence's end
            j = tl.arange(0, NCU)
            offs = tl.load(cu_ptr + j * cu_s0, mask=j <= seq + 1, other=0)
            offs = tl.minimum(tl.maximum(offs, 0), ntokens)
            end = tl.max(tl.where(j <= seq + 1, offs, 0), axis=0)
            start = tl.max(tl.where(j <= seq, offs, 0), axis=0)
            length = end - start
            if part == 0:
                tl.store(new_cu_ptr + seq + 1, end.to(new_cu_ptr.dtype.element_ty))
                if seq == 0:
                    tl.store(new_cu_ptr, start.to(new_cu_ptr.dtype.element_ty))
        accepted = 0
        if SPEC:
            accepted = tl.load(nacc_ptr + seq * nacc_s0)
            if S_2D:
                accepted = tl.minimum(tl.maximum(accepted, 0), nacc_max)
            if part == 0:
                tl.store(new_nacc_ptr + seq, accepted.to(new_nacc_ptr.dtype.element_ty))
        if HAS_SBI:
            src_row = tl.load(sbi_ptr + seq * sbi_s0 + cols * sbi_s1, mask=cols < src_cols,
                              other=pad).to(tl.int64)
            src_row = tl.where((src_row >= 0) & (src_row < nslots), src_row, pad)
        else:
            src_row = tl.where(cols == 0, seq, pad).to(tl.int64)
        if HAS_DST:
            dst_row = tl.load(dst_ptr + seq * dst_s0 + cols * dst_s1, mask=cols < dst_cols,
                              other=pad).to(tl.int64)
            dst_row = tl.where((dst_row >= 0) & (dst_row < nslots), dst_row, pad)
        else:
            dst_row = src_row
        if FIX:  # a pad source with a real destination: zero that row and read it instead
            col = 0
            if SPEC and S_2D:
                col = tl.maximum(accepted.to(tl.int64) - 1, 0)
            src = tl.sum(tl.where(cols == col, src_row, 0), axis=0)
            if VARLEN:  # the columns the op writes: one per token when speculative, else one
                limit = tl.minimum(length, dst_cols) if SPEC else tl.minimum(length, 1)
            else:
                limit = fixed_limit
            real = (cols < limit) & (cols < dst_cols) & (dst_row != pad)
            first = tl.min(tl.where(real, cols, NCOLS), axis=0)
            target = tl.sum(tl.where(cols == first, dst_row, 0), axis=0)
            if (src == pad) & (first < NCOLS):
                zeros = tl.zeros([BLOCK], dtype=state_ptr.dtype.element_ty)
                base = state_ptr + target * row_stride
                for begin in range(part * BLOCK, row_numel, tl.num_programs(1) * BLOCK):
                    offs_r = begin + tl.arange(0, BLOCK)
                    tl.store(base + offs_r, zeros, mask=offs_r < row_numel)
                src_row = tl.where(cols == col, target, src_row)
        if part == 0:
            if WRITE_SBI:
                tl.store(new_sbi_ptr + seq * src_cols + cols,
                         src_row.to(new_sbi_ptr.dtype.element_ty), mask=cols < src_cols)
            if WRITE_DST:
                tl.store(new_dst_ptr + seq * dst_cols + cols,
                         dst_row.to(new_dst_ptr.dtype.element_ty), mask=cols < dst_cols)


_op.register_impl(PROVIDER, selective_state_update, supports=supports)
