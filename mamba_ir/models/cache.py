"""Block-based state cache with align mode.

State slots (rows of every Mamba layer's conv and SSM state tensors) are of three kinds:

* slot 0 holds the all-zero state: the checkpoint of the empty prefix, never written;
* *running* slots: one per live request, read and written by every step;
* *checkpoint* slots: immutable copies of a running slot taken when a request's processed
  token count reaches a multiple of ``block_size`` (align mode: prefill chunks end on block
  boundaries, so the state at every boundary exists). They are shared by every request
  whose prompt starts with the same blocks, keyed by a chained hash of the token blocks.

A request starts from its longest cached block-aligned prefix (at least the empty one):
prefill issues ``copy_state_blocks(checkpoint -> running)`` before each layer's conv/SSU
call, which the compiler may fold into those calls. Attention KV of a checkpointed block
is stored with the block and copied back into the request's KV row on a hit (no recompute).
Pad rows of a padded decode batch use ``pad_slot_id`` for state and a scratch KV row.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from .config import ATTENTION, HybridConfig

ZERO_SLOT = 0


class StateCache(nn.Module):
    """Per-layer state tensors: conv ``(slots, conv_dim, d_conv-1)``, SSM ``(slots, heads,
    head_dim, d_state)``; per attention layer K and V ``(rows+1, max_len, kv_heads, head_dim)``
    whose last row is scratch for pad tokens."""

    def __init__(
        self,
        config: HybridConfig,
        *,
        num_slots: int,
        max_requests: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        state_dtype: torch.dtype | None = None,
        pad_slot_id: int = -1,
    ) -> None:
        super().__init__()
        c = config
        self.num_slots, self.max_requests, self.max_len = num_slots, max_requests, max_len
        self.pad_slot_id = pad_slot_id
        self.scratch_row = max_requests
        sdt = state_dtype or dtype
        for i, kind in enumerate(c.layer_types):
            if kind == ATTENTION:
                shape = (max_requests + 1, max_len, c.num_key_value_heads, c.attention_head_dim)
                self.register_buffer(f"k{i}", torch.zeros(shape, device=device, dtype=dtype))
                self.register_buffer(f"v{i}", torch.zeros(shape, device=device, dtype=dtype))
            else:
                conv = (num_slots, c.conv_dim, c.mamba_d_conv - 1)
                ssm = (num_slots, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state)
                self.register_buffer(f"conv{i}", torch.zeros(conv, device=device, dtype=sdt))
                self.register_buffer(f"ssm{i}", torch.zeros(ssm, device=device, dtype=sdt))
        self.mamba_layers = c.mamba_layers
        self.attention_layers = c.attention_layers

    def states(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"conv{layer}"), getattr(self, f"ssm{layer}")

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{layer}"), getattr(self, f"v{layer}")

    def copy_slots(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """``state[dst] = state[src]`` in every Mamba layer (through the IR copy op)."""
        device = self.conv_device
        s = torch.tensor(src, dtype=torch.int32, device=device)
        d = torch.tensor(dst, dtype=torch.int32, device=device)
        for layer in self.mamba_layers:
            for state in self.states(layer):
                ops.copy_state_blocks(state, s, d, self.pad_slot_id)

    @property
    def conv_device(self) -> torch.device:
        return next(self.buffers()).device

    def state_bytes_per_slot(self) -> int:
        total = 0
        for layer in self.mamba_layers:
            for state in self.states(layer):
                total += state[0].numel() * state.element_size()
        return total


def block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained digests of each complete block: ``h[k]`` identifies ``tokens[: (k+1)*bs]``."""
    out, prev = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        prev = hashlib.sha256(prev + b"|" + ",".join(map(str, block)).encode()).digest()
        out.append(prev)
    return out


@dataclass
class Checkpoint:
    slot: int
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    saved: int = 0
    evicted: int = 0


class PrefixCache:
    """Slot allocator and the index of immutable block checkpoints (LRU eviction)."""

    def __init__(self, cache: StateCache, block_size: int, enabled: bool = True) -> None:
        self.cache, self.block_size, self.enabled = cache, block_size, enabled
        self.free = list(range(cache.num_slots - 1, ZERO_SLOT, -1))
        self.free_rows = list(range(cache.max_requests - 1, -1, -1))
        self.entries: OrderedDict[bytes, Checkpoint] = OrderedDict()
        self.stats = PrefixStats()

    # -- slots ---------------------------------------------------------------------------

    def _take_slot(self) -> int:
        if not self.free:
            if not self.entries:
                raise RuntimeError("no free state slot: raise num_slots")
            _, old = self.entries.popitem(last=False)
            self.free.append(old.slot)
            self.stats.evicted += 1
        return self.free.pop()

    def admit(self) -> tuple[int, int]:
        """A running state slot and a KV row for a new request."""
        if not self.free_rows:
            raise RuntimeError("no free KV row: raise max_requests")
        return self._take_slot(), self.free_rows.pop()

    def release(self, slot: int, row: int) -> None:
        self.free.append(slot)
        self.free_rows.append(row)

    # -- checkpoints ---------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int]) -> tuple[int, int]:
        """The longest cached block-aligned prefix that leaves at least one prompt token to
        run: ``(tokens covered, checkpoint slot)``; ``(0, ZERO_SLOT)`` when none."""
        self.stats.lookups += 1
        if not self.enabled:
            return 0, ZERO_SLOT
        covered, slot = 0, ZERO_SLOT
        for k, digest in enumerate(block_hashes(prompt[:-1], self.block_size)):
            entry = self.entries.get(digest)
            if entry is None:
                break
            self.entries.move_to_end(digest)
            covered, slot = (k + 1) * self.block_size, entry.slot
        if covered:
            self.stats.hits += 1
            self.stats.hit_tokens += covered
        return covered, slot

    def restore_kv(self, prompt: Sequence[int], covered: int, row: int) -> None:
        """Copy the cached blocks' attention KV into the request's row."""
        for k, digest in enumerate(block_hashes(prompt[:covered], self.block_size)):
            entry = self.entries[digest]
            span = slice(k * self.block_size, (k + 1) * self.block_size)
            for layer, (key, value) in zip(self.cache.attention_layers, entry.kv, strict=True):
                k_cache, v_cache = self.cache.kv(layer)
                k_cache[row, span] = key
                v_cache[row, span] = value

    def save(self, tokens: Sequence[int], slot: int, row: int) -> None:
        """Checkpoint the running state after ``len(tokens)`` (a block multiple) tokens."""
        if not self.enabled:
            return
        digest = block_hashes(tokens, self.block_size)[-1]
        if digest in self.entries:
            return
        new = self._take_slot()
        self.cache.copy_slots([slot], [new])
        span = slice(len(tokens) - self.block_size, len(tokens))
        kv = [tuple(t[row, span].clone() for t in self.cache.kv(layer))
              for layer in self.cache.attention_layers]
        self.entries[digest] = Checkpoint(new, kv)
        self.stats.saved += 1
