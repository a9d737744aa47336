"""The serving engine: token-budget prefill with in-step checkpoints, request validation,
and exception safety (eager dispatch, CPU, a tiny random hybrid)."""

from __future__ import annotations

import pytest
import torch

from mamba_ir.models import Engine, HybridConfig, random_model
from mamba_ir.models.cache import RESERVED_SLOTS
from mamba_ir.models.engine import graph_sizes

BLOCK = 8
CONFIG = HybridConfig(vocab_size=61, hidden_size=32, num_layers=3, attn_layer_indices=(1,),
                      mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                      num_attention_heads=2, num_key_value_heads=1, attention_head_dim=16,
                      intermediate_size=48)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model(CONFIG, seed=1, std=0.2)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 61, (27,), generator=g).tolist()
    return [base, base[:19], torch.randint(0, 61, (4,), generator=g).tolist()]


def _free(engine: Engine) -> tuple[list[int], list[int]]:
    return sorted(engine.prefix.free), sorted(engine.prefix.free_rows)


@pytest.fixture(scope="module")
def whole(model) -> list:
    """Every prompt in one prefill step (budget above the total)."""
    return Engine(model, block_size=BLOCK, max_requests=3, max_len=40).generate(_prompts(), 4)


@pytest.mark.parametrize("budget", [5, 11])
def test_any_token_budget_gives_the_same_completions(model, whole, budget):
    # budget 5: steps end mid-block and boundaries fall within a step's first conv-width
    # tokens (window partly from the initial window); 11: steps span two prompts
    engine = Engine(model, block_size=BLOCK, max_requests=3, max_len=40, prefill_tokens=budget)
    done = engine.generate(_prompts(), 4)
    assert engine.stats.prefill_steps >= -(-engine.stats.prefill_tokens // budget)
    for a, b in zip(done, whole, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits),
                                   atol=1e-5, rtol=0)
    # the checkpoints written inside the steps serve a second run
    again = engine.generate(_prompts(), 4)
    assert [c.cached_tokens for c in again] == [3 * BLOCK, 2 * BLOCK, 0]
    for a, b in zip(again, whole, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [40, 11])
def test_fixed_size_steps_give_the_same_completions(model, whole, budget):
    # prefill_graphs pads every step to a captured size (empty sequences, a longer pad
    # sequence, pad checkpoint entries); on a CPU the padded step runs as it is
    engine = Engine(model, block_size=BLOCK, max_requests=3, max_len=40, prefill_tokens=budget,
                    prefill_graphs=True)
    for _ in range(2):  # cold, then from the checkpoints the padded steps wrote
        done = engine.generate(_prompts(), 4)
        for a, b in zip(done, whole, strict=True):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits),
                                       atol=1e-5, rtol=0)
    assert [c.cached_tokens for c in done] == [3 * BLOCK, 2 * BLOCK, 0]


def test_graph_sizes_pad_at_most_one_and_a_half_times():
    sizes = graph_sizes(8192)
    assert sizes[0] == 16 and sizes[-1] == 8192
    assert all(b <= 1.5 * a for a, b in zip(sizes, sizes[1:], strict=False))
    assert graph_sizes(40) == [16, 24, 32, 40]


def test_one_step_checkpoints_every_boundary(model, whole):
    engine = Engine(model, block_size=BLOCK, max_requests=3, max_len=40)
    engine.generate(_prompts()[:1], 1)
    assert engine.stats.prefill_steps == 1
    assert engine.prefix.stats.saved == 3  # 8, 16, 24 of 27 tokens


@pytest.mark.parametrize(("prompts", "new", "match"), [
    ([[1, 2, 61]], 2, r"prompts\[0\]: token id 61 outside the vocabulary \[0, 61\)"),
    ([[1, 2], [-1]], 2, r"prompts\[1\]: token id -1"),
    ([[1], []], 2, r"prompts\[1\]: expected at least one token"),
    ([[1, 2.5]], 2, r"prompts\[0\]: expected a sequence of int token ids"),
    ([[1]], 0, r"max_new_tokens: expected an int >= 1, got 0"),
    ([list(range(30))], 11, r"exceed max_len 40"),
])
def test_bad_requests_raise_before_anything_runs(model, prompts, new, match):
    engine = Engine(model, block_size=BLOCK, max_requests=2, max_len=40)
    before = _free(engine)
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, new)
    assert _free(engine) == before
    assert engine.stats.prefill_steps == 0


def test_failed_step_gives_back_rows_and_slots(model, whole):
    engine = Engine(model, block_size=BLOCK, max_requests=2, max_len=40, prefix_cache=False)
    before = _free(engine)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return engine.steps.prefill(*args)

    engine._prefill = failing
    for _ in range(3):  # more failures than rows: nothing leaks
        calls.clear()
        with pytest.raises(RuntimeError, match="device lost"):
            engine.generate(_prompts(), 4)
        assert _free(engine) == before
    engine._prefill = engine.steps.prefill
    done = engine.generate(_prompts(), 4)
    assert [c.tokens for c in done] == [c.tokens for c in whole]


def test_failed_step_returns_reserved_checkpoint_slots(model):
    engine = Engine(model, block_size=BLOCK, max_requests=2, max_len=40)
    before = _free(engine)

    def failing(*args):
        raise RuntimeError("kernel failed")

    engine._prefill = failing
    with pytest.raises(RuntimeError, match="kernel failed"):
        engine.generate(_prompts()[:1], 2)
    assert _free(engine) == before
    assert not engine.prefix.entries and not engine.prefix.pending


def test_too_few_slots_is_refused_up_front(model):
    with pytest.raises(ValueError, match=f"num_slots: expected at least {RESERVED_SLOTS + 3}"):
        Engine(model, block_size=BLOCK, max_requests=3, max_len=40, num_slots=4)


def test_checkpoints_are_skipped_not_fatal_when_slots_run_out(model, whole):
    # room for the running slots only: every checkpoint is skipped, answers unchanged
    engine = Engine(model, block_size=BLOCK, max_requests=3, max_len=40,
                    num_slots=RESERVED_SLOTS + 3)
    done = engine.generate(_prompts(), 4)
    assert engine.prefix.stats.saved == 0 and engine.prefix.stats.skipped > 0
    assert [c.tokens for c in done] == [c.tokens for c in whole]


def _under_pressure(model) -> tuple[Engine, list[int]]:
    """An engine with room for one running slot and three checkpoints, all three held by
    the checkpoints of a 27-token prompt (blocks ending at 8, 16 and 24)."""
    engine = Engine(model, block_size=BLOCK, max_requests=1, max_len=40,
                    num_slots=RESERVED_SLOTS + 1 + 3)
    first = _prompts()[0]
    engine.generate([first], 2)
    assert len(engine.prefix.entries) == 3 and len(engine.prefix.free) == 1
    return engine, first


def _index(engine: Engine) -> list[tuple[bytes, int]]:
    return [(d, e.slot) for d, e in engine.prefix.entries.items()]


def _states(engine: Engine) -> list[torch.Tensor]:
    return [t.clone() for layer in engine.cache.mamba_layers for t in engine.cache.states(layer)]


def test_a_step_failing_before_it_runs_leaves_every_checkpoint_as_it_was(model, monkeypatch):
    """Under slot pressure the failing request's two boundaries take the slots of two of
    the other prompt's checkpoints; it fails before its step runs (copying the step's
    arguments to the device), so those checkpoints keep their slots and contents and still
    serve the other prompt afterwards."""
    engine, first = _under_pressure(model)
    index, free, states = _index(engine), _free(engine), _states(engine)
    other = torch.randint(0, 61, (20,), generator=torch.Generator().manual_seed(9)).tolist()

    def no_memory(*args, **kwargs):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(engine, "_tensor", no_memory)
    with pytest.raises(RuntimeError, match="out of device memory"):
        engine.generate([other], 2)
    monkeypatch.undo()
    assert _index(engine) == index and _free(engine) == free
    assert not engine.prefix.pending and not engine.prefix.claimed
    for now, was in zip(_states(engine), states, strict=True):
        assert torch.equal(now, was)
    again = engine.generate([first], 2)
    assert again[0].cached_tokens == 3 * BLOCK
    fresh = Engine(model, block_size=BLOCK, max_requests=1, max_len=40).generate([first], 2)
    assert again[0].tokens == fresh[0].tokens


def test_a_step_failing_as_it_runs_drops_only_the_checkpoints_it_took(model):
    """A step that fails while it runs may have written part of the slots it took from two
    checkpoints: those two are dropped and their slots freed, not served half overwritten;
    the third checkpoint, the running slot and the KV row are as before."""
    engine, _ = _under_pressure(model)
    index = _index(engine)
    other = torch.randint(0, 61, (20,), generator=torch.Generator().manual_seed(9)).tolist()

    def failing(*args):
        raise RuntimeError("kernel failed")

    engine._prefill = failing
    with pytest.raises(RuntimeError, match="kernel failed"):
        engine.generate([other], 2)
    taken, kept = index[:2], index[2:]  # least recently used first
    assert _index(engine) == kept
    slots = range(RESERVED_SLOTS, engine.cache.num_slots)
    assert _free(engine) == ([s for s in slots if s != kept[0][1]], [0])
    assert {s for _, s in taken} <= set(_free(engine)[0])
    assert not engine.prefix.pending and not engine.prefix.claimed
    assert engine.prefix.stats.evicted == 2
