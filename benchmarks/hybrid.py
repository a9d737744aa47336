"""The benchmark hybrid shared by ``mamba-ir bench`` (benchmarks/e2e.py) and
``mamba-ir bench --prefill`` (benchmarks/prefill.py): the model the command line asks
for, a decode batch, and the bytes roof of one decode step."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks import common
from mamba_ir.models import HybridModel, StateCache, bench_config, random_model
from mamba_ir.models.cache import RESERVED_SLOTS, RING
from mamba_ir.ops._quant import quantize


def model_from_args(args: argparse.Namespace) -> HybridModel:
    """The random-init bench hybrid (``bench_config()``), cut to ``--layers`` when given,
    on ``--device`` (default cuda) in ``--dtype`` (default bfloat16)."""
    device = torch.device(args.device or "cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16
    config = bench_config()
    if args.layers:
        config = config.with_(num_layers=args.layers,
                              attn_layer_indices=tuple(i for i in config.attn_layer_indices
                                                       if i < args.layers))
    return random_model(config, device=device, dtype=dtype)


def random_states(cache: StateCache, std: float = 0.1) -> None:
    """Fill every state and KV row with N(0, std) values (a quantized SSM state as
    ``quantize`` stores them, with its scales), so no kernel meets an all-zero state."""
    with torch.no_grad():
        for layer in cache.attention_layers:
            for kv in cache.kv(layer):
                kv.normal_(0, std)
        for layer in cache.mamba_layers:
            conv, ssm = cache.states(layer)
            conv.normal_(0, std)
            h = torch.empty(ssm.shape, device=ssm.device).normal_(0, std)
            scale = cache.ssm_scale(layer)
            if scale is None:
                ssm.copy_(h)
            else:
                q, s = quantize(h, ssm.dtype)
                ssm.copy_(q)
                scale.copy_(s)


def decode_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's ``decode`` and ``ring`` from ``--decode`` and ``--ring`` (standard when
    the namespace has neither)."""
    return {"decode": getattr(args, "decode", "standard"),
            "ring": getattr(args, "ring", None) or RING}


def decode_name(cache: StateCache) -> str:
    """``standard``, or ``replay, ring N``."""
    return cache.decode if cache.decode != "replay" else f"replay, ring {cache.ring_length}"


def state_dtype_name(cache: StateCache) -> str:
    return str(cache.state_dtype).removeprefix("torch.")


def dtype_name(model: HybridModel) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def decode_batch(model: HybridModel, batch: int, context: int) -> tuple[torch.Tensor, ...]:
    """Inputs of one decode step (:meth:`Engine.decode_step`): ``batch`` sequences of
    ``context`` tokens each, random next tokens (seeded by the batch size), KV rows from 0
    and the running state slots after the reserved ones."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(batch)
    return (
        torch.randint(0, model.config.vocab_size, (batch,), generator=g).to(device),
        torch.full((batch,), context, dtype=torch.int64, device=device),
        torch.arange(batch, device=device),
        torch.arange(RESERVED_SLOTS, RESERVED_SLOTS + batch, dtype=torch.int32, device=device),
    )


def _row_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t[0].numel() * t.element_size()


def state_traffic(cache: StateCache) -> float:
    """State bytes one sequence's decode step moves, averaged over a replay ring's cycle.

    Standard decode reads and writes every row member. Replay decode reads and writes the
    conv state and the ring's length, reads the checkpoint every step and writes it at the
    flush, once in ``L + 1`` steps; it reads the ring's filled entries (0 to ``L``, ``L / 2``
    on average) and writes one entry on each of the ``L`` appends."""
    if cache.ring_length == 0:
        return 2 * cache.state_bytes_per_slot()
    steps = cache.ring_length + 1
    total = 0.0
    for layer in cache.mamba_layers:
        conv, ssm = cache.states(layer)
        ring_x, ring_dt, ring_B, ring_len = cache.ring(layer)
        entry = sum(_row_bytes(t) for t in (ring_x, ring_dt, ring_B)) / cache.ring_length
        total += 2 * (_row_bytes(conv) + _row_bytes(ring_len))
        total += _row_bytes(ssm) * (1 + 1 / steps)
        total += entry * (cache.ring_length / 2 + cache.ring_length / steps)
    return total


def step_bytes(model: torch.nn.Module, cache: StateCache, batch: int, context: int) -> int:
    """Bytes one decode step must move at least (reads + writes; a replay step's averaged
    over its ring's cycle, :func:`state_traffic`)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}
                  .values())
    states = round(batch * state_traffic(cache))
    kv = 0
    for layer in cache.attention_layers:
        k, v = cache.kv(layer)
        per_token = k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size()
        kv += batch * per_token * (context + 1)  # read the context, write one token
    return weights + states + kv


def decode_roof(model: HybridModel, cache: StateCache, batch: int, context: int) -> dict[str, Any]:
    """The bytes a decode step moves and how long the better copy roof, measured now on
    this GPU, takes to move them."""
    nbytes = step_bytes(model, cache, batch, context)
    rates = common.roof_rate(nbytes)
    return {"bytes_per_step": nbytes, "roof_us": nbytes / rates["roof"] * 1e6,
            "copy_rate_GBps": {k: v / 1e9 for k, v in rates.items()}}
