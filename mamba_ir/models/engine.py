"""A small serving loop: token-budget prefill with align-mode checkpoints, batched greedy
decode, prefix reuse.

Each step is one call of a (compiled) step function over flat tokens. A prefill step takes
up to ``prefill_tokens`` tokens of one or many prompts (the next part of each, in
admission order) and checkpoints the state at every block boundary it crosses, inside the
step; a new request starts from its longest cached prefix. Every prefill batch carries one
pad sequence, checkpoint lists are padded to at least two entries (scratch slot or pad
slot), and decode batches are padded to a bucket size, so the compiled step sees every
dynamic size >= 2 and compiles once for all of them.

Requests are validated before anything runs; if a step fails, every request of the call
gives its KV row and state slot back and the step's reserved checkpoint slots are
returned, so the engine is left as it was: the checkpoints evicted for those slots are
evicted only once a step writing them succeeds, and stay as they were if the failed step
never started (one that started may have written part of them: they are dropped).
"""

from __future__ import annotations

import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cache import RESERVED_SLOTS, RING, SCRATCH_SLOT, PrefixCache, StateCache, chain_digest
from .decoder import HybridModel

logger = logging.getLogger("mamba_ir")

DECODE_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256)
# tokens per prefill step: an 8k-token prompt in one step (TTFT), a 32k one in four;
# docs/prefill_bench.json has the per-length figures
PREFILL_TOKENS = 8192
_I64, _I32 = torch.int64, torch.int32
# tokens, positions, cu_seqlens, kv_rows, context_lens, slots, src_slots, num_computed,
# checkpoint columns, window slots, window inputs
_PREFILL_DTYPES = (_I64, _I64, _I32, _I64, _I64, _I32, _I32, _I32, _I32, _I64, _I64)


@dataclass(frozen=True)
class _Shape:
    """The fixed sizes of a captured prefill step."""

    tokens: int
    seqs: int  # including the pad sequence
    columns: int  # checkpoint columns per sequence
    windows: int  # conv windows written


def graph_sizes(limit: int, smallest: int = 16) -> list[int]:
    """Token counts a prefill graph is captured for: powers of two and 1.5x powers of two
    up to ``limit`` (a step runs in the smallest that holds it: at most 1.5x padding),
    and ``limit`` itself."""
    sizes, size = set(), smallest
    while size < limit:
        sizes.update(s for s in (size, size * 3 // 2) if s < limit)
        size *= 2
    return sorted(sizes | {limit})


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
    written: bool = False  # a step that may write the running slot has started
    digests: list[bytes] = field(default_factory=list)  # of the sequence's complete blocks

    @property
    def sequence(self) -> list[int]:
        return self.done.prompt + self.done.tokens

    def block_digests(self, blocks: int, block_size: int) -> list[bytes]:
        """Chained digests of the sequence's first ``blocks`` blocks (computed once)."""
        seq = self.sequence
        while len(self.digests) < blocks:
            k = len(self.digests)
            prev = self.digests[-1] if k else b""
            self.digests.append(chain_digest(prev, seq[k * block_size:(k + 1) * block_size]))
        return self.digests


class Steps(nn.Module):
    """The two step functions bound to one model and one cache: what :class:`Engine`
    compiles, and, uncompiled, what it runs without ``compile`` (``Engine.steps``)."""

    def __init__(self, model: HybridModel, cache: StateCache, block_size: int = 16) -> None:
        super().__init__()
        self.model, self.cache, self.block_size = model, cache, block_size

    def prefill(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(self.cache, self.block_size, *args)

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
    ``state_dtype`` (a name or torch dtype: float32, bfloat16, float16, int16, int8,
    float8_e4m3fn; default the model's dtype) is the dtype of the Mamba states; a quantized
    one applies to the SSM state, with float32 block scales (:class:`StateCache`).
    ``state_rounding`` ("nearest" or "stochastic") is how decode rounds the stored SSM
    state (stochastic: 16-bit float and quantized states; docs/model.md).
    ``decode="replay"`` decodes with ``replay_state_update``: each SSM row is a checkpoint
    and a ring of the last ``ring`` tokens' inputs (default 16), flushed into a new
    checkpoint when full; float states rounded to nearest only. Block checkpoints taken
    during decode hold the materialised state.

    A tensor-parallel shard (``HybridModel(config, tp)``) gets a cache of its rank's rows;
    every rank runs its own engine on the same requests, and since every rank computes
    the same logits, every engine makes the same choices (slots, checkpoints, tokens).
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
        state_dtype: torch.dtype | str | None = None,
        state_rounding: str = "nearest",
        prefill_tokens: int = PREFILL_TOKENS,
        prefill_graphs: bool = False,
        decode: str = "standard",
        ring: int = RING,
    ) -> None:
        for name, value in (("block_size", block_size), ("max_requests", max_requests),
                            ("max_len", max_len), ("prefill_tokens", prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.block_size, self.max_requests = block_size, max_requests
        self.prefill_tokens = prefill_tokens
        self.record_logits = record_logits
        checkpoints = 4 * max_requests * max_len // block_size
        slots = num_slots or RESERVED_SLOTS + max_requests + checkpoints
        self.cache = StateCache(
            model.config, num_slots=slots, max_requests=max_requests, max_len=max_len,
            device=param.device, dtype=param.dtype, state_dtype=state_dtype,
            state_rounding=state_rounding, tp=model.plan.tp, decode=decode, ring=ring,
        )
        self.prefix = self._prefix_cache(prefix_cache)
        self.steps = Steps(model, self.cache, block_size)
        self._prefill: Callable[..., torch.Tensor] = self.steps.prefill
        self._decode: Callable[..., torch.Tensor] = self.steps.decode
        if compile:
            kwargs = dict(compile_kwargs or {})
            self._prefill = compile_step(self.steps.prefill, priority, **kwargs)
            self._decode = compile_step(self.steps.decode, priority, **kwargs)
        self.stats = EngineStats()
        # prefill steps padded to fixed sizes, replayed from CUDA graphs on a GPU (of the
        # compiled step: eager native ops sync with the host); elsewhere the padded step runs
        if prefill_graphs and self.device.type == "cuda" and not compile:
            raise ValueError("prefill_graphs: needs compile=True on CUDA (graphs of the "
                             "compiled step)")
        self.prefill_graphs = prefill_graphs
        self._buckets = graph_sizes(min(prefill_tokens, max_len))
        self._graphs: dict[_Shape, tuple[Any, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._pool: Any = None

    # -- public --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every checkpoint and counter (the compiled steps are kept)."""
        self.prefix = self._prefix_cache(self.prefix.enabled)
        self.stats = EngineStats()

    def _prefix_cache(self, enabled: bool) -> PrefixCache:
        # decode checkpoints a block through the model: under replay decode the state is
        # computed from checkpoint and ring, at each layer's decay rates
        return PrefixCache(self.cache, self.block_size, enabled=enabled,
                           copy=lambda src, dst: self.model.save_slots(self.cache, src, dst))

    def lowering_report(self) -> Any:
        """The call sites of the compiled steps (prefill first; a ``LoweringReport``, empty
        when not compiled); ``print`` shows one line per site."""
        from ..passes.report import LoweringReport  # the passes import Inductor: load late

        steps = (self._prefill, self._decode)
        return LoweringReport.merged(
            s.lowering_report for s in steps if hasattr(s, "lowering_report"))

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv_rows: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step as :meth:`generate` runs it (compiled when the engine is), on a
        batch given directly: each sequence's last token, its position, its KV row and its
        state slot (int32). Returns the next-token logits. For driving or capturing the
        step outside :meth:`generate` (benchmarks, CUDA graphs); the rows and slots are the
        caller's to keep apart."""
        return self._decode(*_dynamic((tokens, positions, kv_rows, slots)))

    @torch.inference_mode()
    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        max_new_tokens: int,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Greedy completions of ``prompts``, served ``max_requests`` at a time.

        ``on_step(new_tokens)`` is called after every step (for progress bars). Bad
        requests raise ValueError before any step runs; if a step raises, the requests of
        this call give back their KV rows and state slots before the error propagates.
        """
        waiting = deque(_Live(Completion(p), max_new_tokens)
                        for p in self._validate(prompts, max_new_tokens))
        results = [live.done for live in waiting]
        active: list[_Live] = []
        try:
            while waiting or active:
                while waiting and len(active) < self.max_requests:
                    live = waiting[0]
                    live.slot, live.row = self.prefix.admit()
                    active.append(waiting.popleft())
                prefilling = [r for r in active if r.processed < len(r.done.prompt)]
                start = time.perf_counter()
                if prefilling:
                    new = self._prefill_step(prefilling)
                else:
                    new = self._decode_step(active)
                self.stats.step_seconds += time.perf_counter() - start
                for r in [r for r in active if len(r.done.tokens) >= r.max_new]:
                    active.remove(r)
                    self.prefix.release(r.slot, r.row)
                if on_step is not None:
                    on_step(new)
        except BaseException:
            for r in active:
                self.prefix.release(r.slot, r.row, started=r.written)
            raise
        return results

    def _validate(self, prompts: Iterable[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        vocab, max_len = self.model.config.vocab_size, self.cache.max_len
        out = []
        for i, prompt in enumerate(prompts):
            try:
                tokens = [operator.index(t) for t in prompt]
            except TypeError as exc:
                raise ValueError(f"prompts[{i}]: expected a sequence of int token ids "
                                 f"({exc})") from None
            if not tokens:
                raise ValueError(f"prompts[{i}]: expected at least one token, got none")
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompts[{i}]: token id {bad} outside the vocabulary "
                                 f"[0, {vocab})")
            if len(tokens) + max_new_tokens > max_len:
                raise ValueError(f"prompts[{i}]: {len(tokens)} prompt tokens + max_new_tokens "
                                 f"{max_new_tokens} exceed max_len {max_len}")
            out.append(tokens)
        return out

    # -- steps ---------------------------------------------------------------------------

    def _tensor(self, values: Sequence[Any], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _prefill_step(self, batch: list[_Live]) -> int:
        bs = self.block_size
        budget = self.prefill_tokens
        plan: list[tuple[_Live, int, int, int]] = []  # request, source slot, start, end
        for r in batch:
            if budget == 0:
                break
            prompt, origin = r.done.prompt, r.slot
            if not r.started:
                r.started = True
                digests = r.block_digests((len(prompt) - 1) // bs, bs)
                covered, origin = self.prefix.lookup(prompt, digests)
                if covered:
                    self.prefix.restore_kv(digests, covered, r.row)
                r.processed = r.done.cached_tokens = covered
            end = min(len(prompt), r.processed + budget)
            budget -= end - r.processed
            plan.append((r, origin, r.processed, end))

        # the checkpoint slots this step writes: never a row some sequence reads
        pinned = frozenset(origin for _, origin, _, _ in plan)
        reserved: list[tuple[bytes, int]] = []
        done = 0
        started = False

        def starting() -> None:  # from here on the step may write its requests' slots
            nonlocal started
            started = True
            for r, _, _, _ in plan:
                r.written = True

        try:
            n = sum(end - start for _, _, start, end in plan)
            shape = self._graph_shape(n) if self.prefill_graphs else None
            host, commits = self._prefill_args(plan, pinned, reserved, shape)
            logits = self._run_prefill(host, shape, starting)
            for (digest, slot), (r, boundary) in zip(reserved, commits, strict=True):
                self.prefix.commit(digest, slot, r.row, boundary)
                done += 1
        except BaseException:
            self.prefix.cancel(reserved[done:], started=started)
            raise
        self.prefix.settle(r.slot for r, _, _, _ in plan)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(end - start for _, _, start, end in plan)
        new = 0
        choice = logits.argmax(-1).tolist()
        for i, (r, _, _, end) in enumerate(plan):
            r.processed = end
            if end == len(r.done.prompt):
                self._emit(r, choice[i], logits[i])
                new += 1
        return new

    def _prefill_args(
        self,
        plan: list[tuple[_Live, int, int, int]],
        pinned: frozenset[int],
        reserved: list[tuple[bytes, int]],
        shape: _Shape | None = None,
    ) -> tuple[list[list[Any]], list[tuple[_Live, int]]]:
        """The step's arguments as lists; fills ``reserved`` with the checkpoint slots it
        writes. With ``shape`` every size is padded to it (empty sequences, a longer pad
        sequence, pad checkpoint entries)."""
        bs, pad = self.block_size, self.cache.pad_slot_id
        width = self.model.config.mamba_d_conv - 1
        tokens: list[int] = []
        positions: list[int] = []
        cu, rows, lens, slots, src, computed = [0], [], [], [], [], []
        columns: list[list[int]] = []
        window_slots: list[int] = []
        window_index: list[list[int]] = []
        commits: list[tuple[_Live, int]] = []
        for b, (r, origin, start, end) in enumerate(plan):
            first = len(tokens)
            tokens += r.done.prompt[start:end]
            positions += range(start, end)
            cu.append(len(tokens))
            rows.append(r.row)
            lens.append(end)
            slots.append(r.slot)
            src.append(origin)
            computed.append(start)
            digests = r.block_digests(end // bs, bs)
            cols = []
            for boundary in range(start // bs * bs + bs, end + 1, bs):
                slot = self.prefix.reserve(digests[boundary // bs - 1], pinned)
                cols.append(pad if slot is None else slot)
                if slot is None:
                    continue
                reserved.append((digests[boundary // bs - 1], slot))
                commits.append((r, boundary))
                # conv inputs before the boundary: this step's tokens, else the initial window
                window_slots.append(slot)
                window_index.append([first + q - start if q >= start
                                     else -1 - (b * width + width - (start - q))
                                     for q in range(boundary - width, boundary)])
            columns.append(cols)
        # one pad sequence keeps every dynamic size >= 2 (no 0/1 specialisation); with a
        # fixed shape, empty sequences and the pad sequence's tokens fill it
        n_pad = 1 if shape is None else shape.tokens - len(tokens)
        seqs = len(cu) if shape is None else shape.seqs
        while len(cu) < seqs + 1:
            last = len(cu) == seqs
            cu.append(len(tokens) + (n_pad if last else 0))
            rows.append(self.cache.scratch_row)
            lens.append(n_pad if last else 0)
            slots.append(pad)
            src.append(pad)
            computed.append(0)
            columns.append([])
        tokens += [0] * n_pad
        positions += range(n_pad)
        ncols = max(2, *(len(c) for c in columns)) if shape is None else shape.columns
        columns = [c + [pad] * (ncols - len(c)) for c in columns]
        while len(window_slots) < (2 if shape is None else shape.windows):
            window_slots.append(SCRATCH_SLOT)
            window_index.append([0] * width)
        host = [tokens, positions, cu, rows, lens, slots, src, computed, columns, window_slots,
                window_index]
        return host, commits

    def _run_prefill(self, host: list[list[Any]], shape: _Shape | None,
                     starting: Callable[[], None]) -> torch.Tensor:
        """One prefill step: the compiled step on these sizes, or the replay of the CUDA
        graph captured for ``shape`` (its input buffers refilled). ``starting()`` is called
        just before what may write state runs (a capture's all-pad step writes none)."""
        if shape is None or self.device.type != "cuda":
            args = tuple(self._tensor(v, dt) for v, dt in zip(host, _PREFILL_DTYPES, strict=True))
            torch._dynamo.maybe_mark_dynamic(args[8], 1)  # checkpoint columns
            starting()
            return self._prefill(*_dynamic(args))
        graph, static, out = self._graphs.get(shape) or self._capture(shape)
        for buffer, values in zip(static, host, strict=True):
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)
        starting()
        graph.replay()
        return out

    def _graph_shape(self, tokens: int) -> _Shape | None:
        """The smallest captured size holding ``tokens`` (None: larger than any)."""
        size = next((b for b in self._buckets if b >= tokens), None)
        if size is None:
            return None
        seqs = self.max_requests + 1
        return _Shape(size, seqs, size // self.block_size + 2,
                      size // self.block_size + seqs)

    def _capture(self, shape: _Shape) -> tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]:
        """Capture the compiled prefill for ``shape``; its first inputs are an all-pad
        step (every sequence empty but the pad one), which writes no state."""
        host, _ = self._prefill_args([], frozenset(), [], shape)
        static = tuple(self._tensor(v, dt) for v, dt in zip(host, _PREFILL_DTYPES, strict=True))
        _dynamic(static)
        torch._dynamo.maybe_mark_dynamic(static[8], 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and warm up outside the capture
            self._prefill(*static)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # one pool: replays never overlap
            out = self._prefill(*static)
        self._graphs[shape] = (graph, static, out)
        return graph, static, out

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
        logits = self.decode_step(*args)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += n
        choice = logits.argmax(-1).tolist()
        for i, (r, seq) in enumerate(zip(batch, seqs, strict=True)):
            r.processed = len(seq)
            if r.processed % self.block_size == 0:
                blocks = r.processed // self.block_size
                digest = r.block_digests(blocks, self.block_size)[blocks - 1]
                self.prefix.save(digest, r.slot, r.row, r.processed)
            self._emit(r, choice[i], logits[i])
        return n

    def _emit(self, r: _Live, token: int, logits: torch.Tensor) -> None:
        r.done.tokens.append(token)
        if self.record_logits:
            r.done.logits.append(logits.detach().float().cpu())
