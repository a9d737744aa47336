"""Block-based state cache with align mode.

State slots (rows of every Mamba layer's conv and SSM state tensors) are of four kinds:

* slot 0 holds the all-zero state: the checkpoint of the empty prefix, never written;
* slot 1 is scratch: padding entries of a step's checkpoint lists write there, so every
  list keeps a size the compiled step need not specialise on; never read;
* *running* slots: one per live request, read and written by every step;
* *checkpoint* slots: immutable copies of a running state at a multiple of ``block_size``
  tokens (align mode), shared by every request whose prompt starts with the same blocks,
  keyed by a chained hash of the token blocks. A prefill step reserves one per block
  boundary it crosses and the step writes them (the scan and the conv windows); decode
  copies the running slot when a generated token completes a block.

A request starts from its longest cached block-aligned prefix (at least the empty one):
prefill issues ``copy_state_blocks(checkpoint -> running)`` before each layer's conv/scan
call, which the compiler may fold into those calls. Attention KV of a checkpointed block
is stored with the block and copied back into the request's KV row on a hit (no recompute).
Pad rows of a padded batch use ``pad_slot_id`` for state and a scratch KV row.

SSM states may be quantized (``state_dtype`` int16, int8 or float8_e4m3fn): each Mamba
layer then has ``ssm_scale{i}`` beside ``ssm{i}``, one float32 scale per block of
``d_state`` values (``mamba_ir/ops/_quant.py``), moved with its row by every copy.

Replay decode (``decode="replay"``) keeps, beside each Mamba layer's SSM state (then the
rows' checkpoints), a ring of the last ``ring`` tokens' inputs: ``ring_x{i}``,
``ring_dt{i}``, ``ring_B{i}`` and ``ring_len{i}`` (``replay_state_update``'s row). Every
row but a decoding request's running row holds an empty ring: prefill leaves its rows so
and a block checkpoint is the materialised state (``replay_materialize``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ..ops._quant import QUANTIZED, ROUNDED
from .config import ATTENTION, HybridConfig
from .tp import TensorParallel, plan_of

ZERO_SLOT = 0
SCRATCH_SLOT = 1
RESERVED_SLOTS = 2  # zero and scratch

STATE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int16": torch.int16,
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def resolve_state_dtype(value: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    """``state_dtype`` as a torch dtype: one of ``STATE_DTYPES`` by name or dtype, ``None``
    for ``default`` (the activation dtype)."""
    if value is None:
        return default
    dtype = STATE_DTYPES.get(value) if isinstance(value, str) else value
    if dtype not in STATE_DTYPES.values():
        raise ValueError(f"state_dtype: expected one of {', '.join(STATE_DTYPES)} (a name or "
                         f"a torch dtype), got {value!r}")
    return dtype


ROUNDINGS = ("nearest", "stochastic")
DECODES = ("standard", "replay")
RING = 16  # replay decode's default ring: a checkpoint written every 17th step


class StateCache(nn.Module):
    """Per-layer state tensors: conv ``(slots, conv_dim, d_conv-1)``, SSM ``(slots, heads,
    head_dim, d_state)`` (with float32 scales ``(slots, heads, head_dim)`` when quantized);
    per attention layer K and V ``(rows+1, max_len, kv_heads, head_dim)`` whose last row is
    scratch for pad tokens. With ``tp``, the sizes of that rank's shard: its conv channels,
    SSM heads and KV heads (slots and rows are the same on every rank).

    ``state_dtype`` (default ``dtype``) is the states' dtype. A quantized one applies to the
    SSM state only: the conv state, a window of a few activations, stays in ``dtype``.

    ``state_rounding="stochastic"`` rounds each decode step's SSM state stores
    stochastically (``rand_seed``) for 16-bit float and quantized states: ``seeds`` holds
    one int64 per layer, advanced on the device once per decode step (CUDA-graph safe),
    apart by layer so that layers draw different bits.

    ``decode="replay"`` adds each Mamba layer's ring of ``ring`` entries (float SSM states
    only, rounded to nearest: the checkpoint is rounded once per flush)."""

    def __init__(
        self,
        config: HybridConfig,
        *,
        num_slots: int,
        max_requests: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        state_dtype: torch.dtype | str | None = None,
        state_rounding: str = "nearest",
        pad_slot_id: int = -1,
        tp: TensorParallel | None = None,
        decode: str = "standard",
        ring: int = RING,
    ) -> None:
        super().__init__()
        c, plan = config, plan_of(config, tp)
        sdt = resolve_state_dtype(state_dtype, dtype)
        if state_rounding not in ROUNDINGS:
            raise ValueError(f"state_rounding: expected one of {', '.join(ROUNDINGS)}, "
                             f"got {state_rounding!r}")
        if state_rounding == "stochastic" and sdt not in ROUNDED:
            raise ValueError(
                f"state_rounding: 'stochastic' rounds float16, bfloat16 and quantized states; "
                f"the state is {str(sdt).removeprefix('torch.')}")
        _check_decode(decode, ring, sdt, state_rounding)
        if num_slots < RESERVED_SLOTS + max_requests:
            raise ValueError(
                f"num_slots: expected at least {RESERVED_SLOTS + max_requests} (the zero and "
                f"scratch slots and one running slot per request), got {num_slots}"
            )
        self.num_slots, self.max_requests, self.max_len = num_slots, max_requests, max_len
        self.pad_slot_id = pad_slot_id
        self.scratch_row = max_requests
        self.state_dtype = sdt
        # a quantized dtype is the SSM state's; the conv window stays in the activations'
        conv_dtype = dtype if sdt in QUANTIZED else sdt
        for i, kind in enumerate(c.layer_types):
            if kind == ATTENTION:
                shape = (max_requests + 1, max_len, plan.kv_heads, c.attention_head_dim)
                self.register_buffer(f"k{i}", torch.zeros(shape, device=device, dtype=dtype))
                self.register_buffer(f"v{i}", torch.zeros(shape, device=device, dtype=dtype))
            else:
                conv = (num_slots, plan.conv_dim, c.mamba_d_conv - 1)
                ssm = (num_slots, plan.mamba_heads, c.mamba_d_head, c.mamba_d_state)
                self.register_buffer(f"conv{i}", torch.zeros(conv, device=device,
                                                             dtype=conv_dtype))
                self.register_buffer(f"ssm{i}", torch.zeros(ssm, device=device, dtype=sdt))
                if sdt in QUANTIZED:  # all-zero scales: every slot, the zero slot too, reads 0
                    self.register_buffer(f"ssm_scale{i}", torch.zeros(
                        ssm[:-1], device=device, dtype=torch.float32))
                if decode == "replay":  # x and B as the mixer computes them, steps in float32
                    for name, shape, dt in (
                        ("ring_x", (plan.mamba_heads, c.mamba_d_head), dtype),
                        ("ring_dt", (plan.mamba_heads,), torch.float32),
                        ("ring_B", (plan.mamba_groups, c.mamba_d_state), dtype),
                    ):
                        self.register_buffer(f"{name}{i}", torch.zeros(
                            (num_slots, ring, *shape), device=device, dtype=dt))
                    self.register_buffer(f"ring_len{i}", torch.zeros(
                        num_slots, device=device, dtype=torch.int32))
        self.decode, self.ring_length = decode, ring if decode == "replay" else 0
        self.mamba_layers = c.mamba_layers
        self.attention_layers = c.attention_layers
        self.state_rounding = state_rounding
        if state_rounding == "stochastic":
            self.register_buffer("seeds", torch.arange(len(c.layer_types), device=device,
                                                       dtype=torch.int64) << 40)

    def states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"conv{layer}"), getattr(self, f"ssm{layer}")

    def rand_seed(self, layer: int) -> torch.Tensor | None:
        """The layer's stochastic rounding seed (``rand_seed``), None when rounding to
        nearest."""
        seeds = getattr(self, "seeds", None)
        return None if seeds is None else seeds[layer]

    def advance_seeds(self) -> None:
        """A new seed for every layer: once per decode step, on the device."""
        seeds = getattr(self, "seeds", None)
        if seeds is not None:
            seeds.add_(1)

    def ssm_scale(self, layer: int) -> torch.Tensor | None:
        """The SSM state's block scales (``state_scale``); None for a float state."""
        return getattr(self, f"ssm_scale{layer}", None)

    def ring(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """The layer's replay ring: ``ring_x``, ``ring_dt``, ``ring_B``, ``ring_len`` (the
        members of ``replay_state_update``'s row after the state); None for standard
        decode."""
        if self.decode != "replay":
            return None
        return tuple(getattr(self, f"{name}{layer}")
                     for name in ("ring_x", "ring_dt", "ring_B", "ring_len"))

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{layer}"), getattr(self, f"v{layer}")

    def copy_slots(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """``state[dst] = state[src]`` in every Mamba layer (through the IR copy op). Under
        replay decode it copies each row whole, ring included (a checkpoint of a running
        row is :meth:`HybridModel.save_slots`, which materialises the state)."""
        device = self.conv_device
        s = torch.tensor(src, dtype=torch.int32, device=device)
        d = torch.tensor(dst, dtype=torch.int32, device=device)
        for layer in self.mamba_layers:
            conv, ssm = self.states(layer)
            ops.copy_state_blocks(conv, s, d, self.pad_slot_id)
            ops.copy_state_blocks(ssm, s, d, self.pad_slot_id, state_scale=self.ssm_scale(layer))
            for ring in self.ring(layer) or ():  # ring_len as a column: rows of >= 2 dims
                ops.copy_state_blocks(ring.view(ring.shape[0], -1), s, d, self.pad_slot_id)

    @property
    def conv_device(self) -> torch.device:
        return next(self.buffers()).device

    def state_bytes_per_slot(self) -> int:
        """Bytes of one slot over every Mamba layer: conv and SSM state, scales and the
        replay ring."""
        total = 0
        for layer in self.mamba_layers:
            for state in (*self.states(layer), self.ssm_scale(layer), *(self.ring(layer) or ())):
                if state is not None:
                    total += state[0].numel() * state.element_size()
        return total


def _check_decode(decode: str, ring: int, state_dtype: torch.dtype, rounding: str) -> None:
    """``decode`` and ``ring``, and the state options replay decode does not take (yet)."""
    if decode not in DECODES:
        raise ValueError(f"decode: expected one of {', '.join(DECODES)}, got {decode!r}")
    if decode != "replay":
        return
    if isinstance(ring, bool) or not isinstance(ring, int) or ring < 1:
        raise ValueError(f"ring: expected an int >= 1 (ring entries per row), got {ring!r}")
    if state_dtype in QUANTIZED:
        raise ValueError(f"decode: 'replay' keeps a float32, float16 or bfloat16 checkpoint; "
                         f"state_dtype {str(state_dtype).removeprefix('torch.')} is quantized")
    if rounding != "nearest":
        raise ValueError(f"decode: 'replay' rounds its checkpoint to nearest once per flush; "
                         f"state_rounding {rounding!r} is not supported with it")


def chain_digest(previous: bytes, block: Sequence[int]) -> bytes:
    """The digest of a block following the prefix whose digest is ``previous``."""
    return hashlib.sha256(previous + b"|" + ",".join(map(str, block)).encode()).digest()


def block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained digests of each complete block: ``h[k]`` identifies ``tokens[: (k+1)*bs]``."""
    out, prev = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = chain_digest(prev, tokens[start : start + block_size])
        out.append(prev)
    return out


@dataclass
class Checkpoint:
    slot: int
    kv: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    saved: int = 0
    evicted: int = 0
    skipped: int = 0  # boundaries not checkpointed: no slot could be freed


class PrefixCache:
    """Slot allocator and the index of immutable block checkpoints (LRU eviction).

    Running slots always exist (``StateCache`` holds one per request, and checkpoints are
    evicted to make room); a checkpoint that finds no slot (all held by running requests
    or by checkpoints the current step reads) is skipped, never an error.

    Evicting is two-phase. A slot taken from a checkpoint (for a running request or a
    checkpoint a step writes) is *claimed*: the checkpoint stays indexed but is neither
    found by lookups nor claimed twice. The step that writes the slot settles the claim
    (:meth:`settle`, :meth:`commit`: the checkpoint is evicted for good) or, failing,
    gives it back (:meth:`give_back`): a step that never started leaves the checkpoint as
    it was; one that started may have written part of its slot, so it is dropped.
    """

    def __init__(
        self,
        cache: StateCache,
        block_size: int,
        enabled: bool = True,
        copy: Callable[[Sequence[int], Sequence[int]], None] | None = None,
    ) -> None:
        self.cache, self.block_size, self.enabled = cache, block_size, enabled
        # how :meth:`save` checkpoints a running slot: a plain copy, unless the state a row
        # stands for must be computed (replay decode: HybridModel.save_slots)
        self.copy = cache.copy_slots if copy is None else copy
        self.free = list(range(cache.num_slots - 1, RESERVED_SLOTS - 1, -1))
        self.free_rows = list(range(cache.max_requests - 1, -1, -1))
        self.entries: OrderedDict[bytes, Checkpoint] = OrderedDict()
        self.pending: set[bytes] = set()
        self.claimed: dict[int, bytes] = {}  # slot -> the checkpoint it still holds
        self.stats = PrefixStats()

    # -- slots ---------------------------------------------------------------------------

    def _take_slot(self, pinned: frozenset[int] = frozenset()) -> int | None:
        """A free slot, else the claimed slot of the least recently used checkpoint that
        is not ``pinned`` (read by the step) nor claimed already; None when none is left."""
        if self.free:
            return self.free.pop()
        victim = next(((d, e.slot) for d, e in self.entries.items()
                       if e.slot not in pinned and e.slot not in self.claimed), None)
        if victim is None:
            return None
        digest, slot = victim
        self.claimed[slot] = digest
        return slot

    def settle(self, slots: Iterable[int]) -> None:
        """A step that wrote ``slots`` succeeded: the checkpoints they were taken from are
        evicted for good."""
        for slot in slots:
            digest = self.claimed.pop(slot, None)
            if digest is not None:
                del self.entries[digest]
                self.stats.evicted += 1

    def give_back(self, slots: Iterable[int], *, started: bool) -> None:
        """Slots a failed step (or request) took: a free one goes back to the free list; one
        taken from a checkpoint goes back to it, unless the step ``started`` and so may have
        written part of it: then that checkpoint is dropped and the slot freed."""
        for slot in slots:
            digest = self.claimed.pop(slot, None)
            if digest is None:
                self.free.append(slot)
            elif started:
                del self.entries[digest]
                self.stats.evicted += 1
                self.free.append(slot)

    def admit(self) -> tuple[int, int]:
        """A running state slot and a KV row for a new request (both or neither)."""
        if not self.free_rows:
            raise RuntimeError(f"no free KV row: all {self.cache.max_requests} rows are held "
                               "by live requests (raise max_requests)")
        slot = self._take_slot()
        if slot is None:
            raise RuntimeError(f"no free state slot: all {self.cache.num_slots} slots are "
                               "held by live requests (raise num_slots)")
        return slot, self.free_rows.pop()

    def release(self, slot: int, row: int, *, started: bool = True) -> None:
        """A request's running slot and KV row, when it is done or failed (``started``:
        a step that may have written its slot ran, see :meth:`give_back`)."""
        self.give_back([slot], started=started)
        self.free_rows.append(row)

    # -- checkpoints ---------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int], digests: Sequence[bytes]) -> tuple[int, int]:
        """The longest cached block-aligned prefix that leaves at least one prompt token to
        run: ``(tokens covered, checkpoint slot)``; ``(0, ZERO_SLOT)`` when none.
        ``digests`` are the prompt's chained block digests (at least its complete blocks
        before the last token)."""
        self.stats.lookups += 1
        if not self.enabled:
            return 0, ZERO_SLOT
        covered, slot = 0, ZERO_SLOT
        for k in range((len(prompt) - 1) // self.block_size):
            entry = self.entries.get(digests[k])
            if entry is None or entry.slot in self.claimed:  # claimed: being overwritten
                break
            self.entries.move_to_end(digests[k])
            covered, slot = (k + 1) * self.block_size, entry.slot
        if covered:
            self.stats.hits += 1
            self.stats.hit_tokens += covered
        return covered, slot

    def restore_kv(self, digests: Sequence[bytes], covered: int, row: int) -> None:
        """Copy the cached blocks' attention KV into the request's row."""
        for k in range(covered // self.block_size):
            entry = self.entries[digests[k]]
            span = slice(k * self.block_size, (k + 1) * self.block_size)
            for layer, (key, value) in zip(self.cache.attention_layers, entry.kv, strict=True):
                k_cache, v_cache = self.cache.kv(layer)
                k_cache[row, span] = key
                v_cache[row, span] = value

    def reserve(self, digest: bytes, pinned: frozenset[int]) -> int | None:
        """A slot for the checkpoint ``digest`` that a step is about to write, or None when
        it is cached already, reserved by this step, disabled, or no slot can be freed
        without evicting one of ``pinned`` (the rows the step reads)."""
        if not self.enabled or digest in self.entries or digest in self.pending:
            return None
        slot = self._take_slot(pinned)
        if slot is None:
            self.stats.skipped += 1
            return None
        self.pending.add(digest)
        return slot

    def commit(self, digest: bytes, slot: int, row: int, end: int) -> None:
        """Index the checkpoint a step wrote into ``slot``; ``end`` is the boundary's token
        count (the block's KV is taken from ``row``)."""
        self.settle([slot])
        self.pending.discard(digest)
        span = slice(end - self.block_size, end)
        kv = [tuple(t[row, span].clone() for t in self.cache.kv(layer))
              for layer in self.cache.attention_layers]
        self.entries[digest] = Checkpoint(slot, kv)
        self.stats.saved += 1

    def cancel(self, reserved: Sequence[tuple[bytes, int]], *, started: bool) -> None:
        """Give back the reservations of a failed step (``started``: see :meth:`give_back`)."""
        for digest, _ in reserved:
            self.pending.discard(digest)
        self.give_back([slot for _, slot in reserved], started=started)

    def save(self, digest: bytes, slot: int, row: int, end: int) -> None:
        """Checkpoint the running state after ``end`` (a block multiple) tokens by copying
        the running slot (decode: one token completed the block)."""
        new = self.reserve(digest, frozenset())
        if new is None:
            return
        try:
            self.copy([slot], [new])
        except BaseException:
            self.cancel([(digest, new)], started=True)
            raise
        self.commit(digest, new, row, end)
