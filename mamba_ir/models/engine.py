"""A small serving loop: block-aligned chunked prefill, batched greedy decode, prefix reuse.

Each step is one call of a (compiled) step function over flat tokens. Prefill chunks end
on block boundaries (align mode), so after a chunk that ends on one, the running state is
checkpointed; a new request starts from its longest cached prefix. Every prefill batch
carries one pad sequence and decode batches are padded to a bucket size, so the compiled
step sees batch and token counts >= 2 and compiles once for all of them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cache import PrefixCache, StateCache
from .decoder import HybridModel

logger = logging.getLogger("mamba_ir")

DECODE_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Completion:
    """One finished request: its greedy tokens and the logits each was chosen from."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    cached_tokens: int = 0


@dataclass
class _Live:
    done: Completion
    max_new: int
    slot: int = -1
    row: int = -1
    processed: int = 0  # tokens whose effect is in the running state
    started: bool = False

    @property
    def sequence(self) -> list[int]:
        return self.done.prompt + self.done.tokens


class _Steps(nn.Module):
    """The two step functions bound to one model and one cache (what gets compiled)."""

    def __init__(self, model: HybridModel, cache: StateCache) -> None:
        super().__init__()
        self.model, self.cache = model, cache

    def prefill(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(self.cache, *args)

    def decode(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.cache, *args)


def compile_step(fn: Callable[..., Any], priority: Any = None, **kwargs: Any) -> Callable:
    """Compile a step with the IR's lowering and fusion passes."""
    from .. import passes

    return passes.compile(fn, priority=priority, **kwargs)


def _dynamic(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Mark the token and batch dims dynamic, so one compiled graph serves every size."""
    for t in args:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return args


@dataclass
class EngineStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    step_seconds: float = 0.0


class Engine:
    """Greedy generation over a :class:`HybridModel` with the align-mode state cache.

    ``compile=True`` compiles both step functions with :func:`mamba_ir.compile`
    (``compile_kwargs`` go to ``torch.compile``); otherwise every op dispatches eagerly.
    """

    def __init__(
        self,
        model: HybridModel,
        *,
        block_size: int = 16,
        max_requests: int = 8,
        max_len: int = 512,
        num_slots: int | None = None,
        prefix_cache: bool = True,
        compile: bool = False,
        priority: Any = None,
        compile_kwargs: dict[str, Any] | None = None,
        record_logits: bool = True,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.block_size, self.max_requests = block_size, max_requests
        self.record_logits = record_logits
        slots = num_slots or 1 + max_requests + 4 * max_requests * max_len // block_size
        self.cache = StateCache(
            model.config, num_slots=slots, max_requests=max_requests, max_len=max_len,
            device=param.device, dtype=param.dtype, state_dtype=state_dtype,
        )
        self.prefix = PrefixCache(self.cache, block_size, enabled=prefix_cache)
        self.steps = _Steps(model, self.cache)
        self._prefill: Callable[..., torch.Tensor] = self.steps.prefill
        self._decode: Callable[..., torch.Tensor] = self.steps.decode
        if compile:
            kwargs = dict(compile_kwargs or {})
            self._prefill = compile_step(self.steps.prefill, priority, **kwargs)
            self._decode = compile_step(self.steps.decode, priority, **kwargs)
        self.stats = EngineStats()

    # -- public --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every checkpoint and counter (the compiled steps are kept)."""
        self.prefix = PrefixCache(self.cache, self.block_size, enabled=self.prefix.enabled)
        self.stats = EngineStats()

    def lowering_report(self) -> list[Any]:
        """The call sites of the compiled steps (prefill first), empty when not compiled."""
        sites: list[Any] = []
        for step in (self._prefill, self._decode):
            sites.extend(getattr(step, "lowering_report", ()))
        return sites

    @torch.inference_mode()
    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        max_new_tokens: int,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Greedy completions of ``prompts``, served ``max_requests`` at a time.

        ``on_step(new_tokens)`` is called after every step (for progress bars).
        """
        waiting = deque(_Live(Completion(list(p)), max_new_tokens) for p in prompts)
        results = [live.done for live in waiting]
        for live in waiting:
            if len(live.done.prompt) < 1:
                raise ValueError("empty prompt")
            if len(live.done.prompt) + max_new_tokens > self.cache.max_len:
                raise ValueError(f"prompt + max_new_tokens exceeds max_len {self.cache.max_len}")
        active: list[_Live] = []
        while waiting or active:
            while waiting and len(active) < self.max_requests:
                live = waiting.popleft()
                live.slot, live.row = self.prefix.admit()
                active.append(live)
            prefilling = [r for r in active if r.processed < len(r.done.prompt)]
            start = time.perf_counter()
            if prefilling:
                new = self._prefill_step(prefilling)
            else:
                new = self._decode_step(active)
            self.stats.step_seconds += time.perf_counter() - start
            for r in [r for r in active if len(r.done.tokens) >= r.max_new]:
                self.prefix.release(r.slot, r.row)
                active.remove(r)
            if on_step is not None:
                on_step(new)
        return results

    # -- steps ---------------------------------------------------------------------------

    def _tensor(self, values: Sequence[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _prefill_step(self, batch: list[_Live]) -> int:
        bs, pad = self.block_size, self.cache.pad_slot_id
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        cu, slots, src = [0], [], []
        ends = []
        for r in batch:
            prompt = r.done.prompt
            origin = r.slot
            if not r.started:
                r.started = True
                covered, origin = self.prefix.lookup(prompt)
                if covered:
                    self.prefix.restore_kv(prompt, covered, r.row)
                r.processed = r.done.cached_tokens = covered
            end = min(len(prompt), (r.processed // bs + 1) * bs)
            tokens += prompt[r.processed : end]
            positions += range(r.processed, end)
            rows += [r.row] * (end - r.processed)
            cu.append(len(tokens))
            slots.append(r.slot)
            src.append(origin)
            ends.append(end)
        # one pad sequence keeps every dynamic size >= 2 (no 0/1 specialisation)
        tokens.append(0)
        positions.append(0)
        rows.append(self.cache.scratch_row)
        cu.append(len(tokens))
        slots.append(pad)
        src.append(pad)
        args = (
            self._tensor(tokens), self._tensor(positions), self._tensor(rows),
            self._tensor(cu, torch.int32), self._tensor(slots, torch.int32),
            self._tensor(src, torch.int32),
        )
        logits = self._prefill(*_dynamic(args))
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += len(tokens) - 1
        new = 0
        choice = logits.argmax(-1).tolist()
        for i, (r, end) in enumerate(zip(batch, ends, strict=True)):
            r.processed = end
            if end % bs == 0:
                self.prefix.save(r.done.prompt[:end], r.slot, r.row)
            if end == len(r.done.prompt):
                self._emit(r, choice[i], logits[i])
                new += 1
        return new

    def _decode_step(self, batch: list[_Live]) -> int:
        n = len(batch)
        size = next((b for b in DECODE_BUCKETS if b >= n), n)
        pad = size - n
        seqs = [r.sequence for r in batch]
        args = (
            self._tensor([s[-1] for s in seqs] + [0] * pad),
            self._tensor([len(s) - 1 for s in seqs] + [0] * pad),
            self._tensor([r.row for r in batch] + [self.cache.scratch_row] * pad),
            self._tensor([r.slot for r in batch] + [self.cache.pad_slot_id] * pad, torch.int32),
        )
        logits = self._decode(*_dynamic(args))
        self.stats.decode_steps += 1
        self.stats.decode_tokens += n
        choice = logits.argmax(-1).tolist()
        for i, (r, seq) in enumerate(zip(batch, seqs, strict=True)):
            r.processed = len(seq)
            if r.processed % self.block_size == 0:
                self.prefix.save(seq, r.slot, r.row)
            self._emit(r, choice[i], logits[i])
        return n

    def _emit(self, r: _Live, token: int, logits: torch.Tensor) -> None:
        r.done.tokens.append(token)
        if self.record_logits:
            r.done.logits.append(logits.detach().float().cpu())
