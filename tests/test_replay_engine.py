"""Replay decode in the bundled hybrid (``Engine(decode="replay")``): the standard op's
greedy tokens, cold, after prefix hits on blocks checkpointed during decode, across
flushes, and on a slot another request left with a filled ring (CPU, float32, eager); and
the compiled decode step against eager on rings that append and flush."""

from __future__ import annotations

import pytest
import torch
from test_engine import CONFIG  # the small hybrid of the engine tests

from mamba_ir.models import Engine, StateCache, random_model

BLOCK, RING, NEW = 8, 3, 14  # 13 decode steps: three flushes and a filled ring left over


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model(CONFIG, seed=1, std=0.2)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 61, (21,), generator=g).tolist()
    return [base, base[:13], torch.randint(0, 61, (4,), generator=g).tolist()]


def _engine(model, decode: str, **kwargs) -> Engine:
    return Engine(model, block_size=BLOCK, max_requests=3, max_len=64, decode=decode,
                  ring=RING, **kwargs)


def _same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits),
                                   atol=1e-5, rtol=1e-5)


def _ring_lengths(engine: Engine) -> torch.Tensor:
    return torch.stack([engine.cache.ring(i)[-1] for i in engine.cache.mamba_layers])


@pytest.mark.parametrize("budget", [8192, 5])
def test_replay_gives_the_standard_tokens_cold_and_from_decode_checkpoints(model, budget):
    standard = _engine(model, "standard").generate(_prompts(), NEW)
    replay = _engine(model, "replay", prefill_tokens=budget)
    _same(replay.generate(_prompts(), NEW), standard)
    assert replay.stats.decode_steps == NEW - 1 and (_ring_lengths(replay) > 0).any()
    # the next turn extends each conversation: its prefix hits reach into the blocks that
    # decode completed, whose checkpoints hold the state materialised from the ring
    turn = [p + c.tokens + [7, 8] for p, c in zip(_prompts(), standard, strict=True)]
    saved = replay.prefix.stats.saved
    again = replay.generate(turn, NEW)
    assert [c.cached_tokens for c in again] == [(len(p) - 1) // BLOCK * BLOCK for p in turn]
    assert again[0].cached_tokens > len(_prompts()[0])  # past the prompt: a decode checkpoint
    assert saved > 0
    _same(again, _engine(model, "standard", prefix_cache=False).generate(turn, NEW))


def test_a_recycled_slot_starts_with_an_empty_ring(model):
    """One request at a time: the second runs on the slot the first left with a filled ring,
    and gives what it gives on a fresh engine."""
    first, second = _prompts()[0], _prompts()[2]
    engine = Engine(model, block_size=BLOCK, max_requests=1, max_len=64, decode="replay",
                    ring=RING, prefix_cache=False)
    engine.generate([first], NEW)
    left = _ring_lengths(engine)[:, engine.prefix.free[-1]]  # the slot admitted next
    assert (left > 0).all(), left
    got = engine.generate([second], NEW)
    fresh = Engine(model, block_size=BLOCK, max_requests=1, max_len=64, decode="replay",
                   ring=RING).generate([second], NEW)
    _same(got, fresh)
    _same(got, _engine(model, "standard").generate([second], NEW))


def test_the_cache_holds_a_ring_per_mamba_layer():
    cache = StateCache(CONFIG, num_slots=6, max_requests=2, max_len=8, decode="replay", ring=5)
    layer = CONFIG.mamba_layers[0]
    ring_x, ring_dt, ring_B, ring_len = cache.ring(layer)
    assert ring_x.shape == (6, 5, 4, 16) and ring_dt.shape == (6, 5, 4)
    assert ring_B.shape == (6, 5, 2, 8) and ring_len.shape == (6,)
    assert ring_dt.dtype == torch.float32 and ring_len.dtype == torch.int32
    plain = StateCache(CONFIG, num_slots=6, max_requests=2, max_len=8)
    assert plain.ring(layer) is None
    per_layer = (5 * (4 * 16 + 4 + 2 * 8)) * 4 + 4
    assert cache.state_bytes_per_slot() - plain.state_bytes_per_slot() == \
        per_layer * len(CONFIG.mamba_layers)
    ring_len[3] = 2
    cache.copy_slots([3], [4])  # a copy moves the whole row
    assert int(ring_len[4]) == 2


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"decode": "fast"}, "decode: expected one of standard, replay, got 'fast'"),
    ({"decode": "replay", "ring": 0}, "ring: expected an int >= 1"),
    ({"decode": "replay", "state_dtype": "int8"}, "decode: 'replay' keeps a float32"),
    ({"decode": "replay", "state_dtype": "bfloat16", "state_rounding": "stochastic"},
     "decode: 'replay' rounds its checkpoint to nearest"),
])
def test_unsupported_combinations_are_refused_naming_the_argument(model, kwargs, words):
    with pytest.raises(ValueError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        Engine(model, max_requests=1, max_len=8, **kwargs)


def test_compiled_decode_runs_replay_on_rings_that_append_and_flush(model):
    """The compiled decode step (lowering and fusion passes, Inductor) gives eager's logits
    and rows from the same rings: one sequence appends, one flushes, two are pads."""
    from mamba_ir.models.cache import RESERVED_SLOTS

    engine = _engine(model, "replay", compile=True)
    cache, g = engine.cache, torch.Generator().manual_seed(3)
    slots = torch.tensor([RESERVED_SLOTS, RESERVED_SLOTS + 1, -1, -1], dtype=torch.int32)
    with torch.no_grad():
        for layer in cache.mamba_layers:
            for t in (*cache.states(layer), *cache.ring(layer)[:3]):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            cache.ring(layer)[1].abs_()  # step sizes as softplus leaves them
            cache.ring(layer)[-1][slots[:2].long()] = torch.tensor([1, RING], dtype=torch.int32)
    inputs = (torch.tensor([3, 7, 0, 0]), torch.tensor([4, 9, 0, 0]),
              torch.tensor([0, 1, 3, 3]), slots)
    before = {name: t.clone() for name, t in cache.named_buffers()}
    with torch.inference_mode():
        got = engine.decode_step(*inputs)
        compiled = {name: t.clone() for name, t in cache.named_buffers()}
        for name, t in cache.named_buffers():
            t.copy_(before[name])
        want = engine.steps.decode(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, t in cache.named_buffers():
        torch.testing.assert_close(compiled[name], t, rtol=1e-5, atol=1e-5, msg=name)
    lengths = _ring_lengths(engine)[:, slots[:2].long()]
    assert lengths.tolist() == [[2, 0]] * len(cache.mamba_layers)
    assert any("replay_state_update" in str(site) for site in engine.lowering_report())
