"""The bundled hybrid and its engine on quantized SSM state (int16, int8, float8 e4m3 with
float32 block scales): decode through ``selective_state_update``'s ``state_scale``,
prefill through float32 scratch rows, prefix-cache copies carrying the scales (CPU, a
tiny random hybrid)."""

from __future__ import annotations

import pytest
import torch
from test_engine import CONFIG  # the small hybrid of the engine tests

from mamba_ir.models import Engine, StateCache, random_model
from mamba_ir.models.cache import RESERVED_SLOTS, SCRATCH_SLOT, ZERO_SLOT
from mamba_ir.ops._quant import QMAX, quantize, values

BLOCK = 8
NEW = 6
QUANTIZED = ("int16", "int8", "float8_e4m3fn")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model(CONFIG, seed=1, std=0.2)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 61, (27,), generator=g).tolist()
    return [base, base[:19], torch.randint(0, 61, (4,), generator=g).tolist()]


def _engine(model, state_dtype, **kwargs) -> Engine:
    return Engine(model, block_size=BLOCK, max_requests=3, max_len=40, state_dtype=state_dtype,
                  **kwargs)


def _logits(done) -> torch.Tensor:
    return torch.stack([torch.stack(c.logits) for c in done])


@pytest.fixture(scope="module")
def float32(model) -> list:
    return _engine(model, torch.float32).generate(_prompts(), NEW)


def _buffers(engine: Engine) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in engine.cache.named_buffers()}


def _ssm(engine: Engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = engine.cache
    return [(cache.states(i)[1], cache.ssm_scale(i)) for i in cache.mamba_layers]


def test_int16_state_gives_float32_tokens_within_a_few_quantization_steps(model, float32):
    engine = _engine(model, "int16")
    done = engine.generate(_prompts(), NEW)
    assert [c.tokens for c in done] == [c.tokens for c in float32]
    # each store rounds a value by at most half a step (absmax / QMAX of its block); over
    # the layers and steps that stays within a few steps of the logits' own magnitude
    want = _logits(float32)
    error = (_logits(done) - want).abs().max().item()
    assert error <= 4 * want.abs().max().item() / QMAX[torch.int16]
    assert error > 0  # the state was rounded: the quantized path ran
    for ssm, scale in _ssm(engine):
        assert ssm.dtype == torch.int16 and scale.dtype == torch.float32
        assert bool((scale[RESERVED_SLOTS:] > 0).any())


@pytest.mark.parametrize("state_dtype", QUANTIZED)
def test_prefix_hits_give_the_cold_tokens(model, state_dtype):
    engine = _engine(model, state_dtype)
    cold = engine.generate(_prompts(), NEW)
    warm = engine.generate(_prompts(), NEW)
    assert [c.cached_tokens for c in warm] == [3 * BLOCK, 2 * BLOCK, 0]
    assert [c.tokens for c in warm] == [c.tokens for c in cold]
    assert bool(_logits(cold).isfinite().all()) and bool(_logits(warm).isfinite().all())
    for ssm, scale in _ssm(engine):  # the zero slot is never written, by pads neither
        assert not bool(ssm[ZERO_SLOT].float().any()) and not bool(scale[ZERO_SLOT].any())


@pytest.mark.parametrize(("state_dtype", "budget", "graphs"),
                         [("int16", 5, False), ("int8", 40, True), ("float8_e4m3fn", 11, True)])
def test_split_and_padded_prefill_steps_give_the_same_tokens(model, state_dtype, budget, graphs):
    # budget 5: sequences continue from their quantized running rows, boundaries fall
    # mid-step; prefill_graphs pads every step with empty sequences and pad checkpoint
    # entries, which must write no slot but the scratch one
    whole = _engine(model, state_dtype).generate(_prompts(), NEW)
    engine = _engine(model, state_dtype, prefill_tokens=budget, prefill_graphs=graphs)
    for _ in range(2):  # cold, then from the checkpoints those steps wrote
        done = engine.generate(_prompts(), NEW)
        assert [c.tokens for c in done] == [c.tokens for c in whole]
    assert [c.cached_tokens for c in done] == [3 * BLOCK, 2 * BLOCK, 0]
    if state_dtype == "int16":
        want = _logits(whole)
        error = (_logits(done) - want).abs().max().item()
        assert error <= 4 * want.abs().max().item() / QMAX[torch.int16]
    for ssm, scale in _ssm(engine):
        assert not bool(ssm[ZERO_SLOT].float().any()) and not bool(scale[ZERO_SLOT].any())


@torch.inference_mode()
def test_prefill_writes_the_rows_the_float_scan_writes_and_no_other(model):
    """One mixer prefill call on an int16 cache and on a float32 cache holding the same
    values: a sequence crossing a boundary with a second, unused checkpoint column; an
    empty sequence on a real slot; one continuing from its running row; a pad sequence."""
    mixer = model.layers[CONFIG.mamba_layers[0]].mixer
    caches = {dt: StateCache(CONFIG, num_slots=9, max_requests=3, max_len=16, state_dtype=dt)
              for dt in (torch.float32, torch.int16)}
    layer = CONFIG.mamba_layers[0]
    q, s = caches[torch.int16].states(layer)[1], caches[torch.int16].ssm_scale(layer)
    g = torch.Generator().manual_seed(7)
    old = [3, 4, 6]  # the empty sequence's slot, the continuing one's, the unused column's
    q[old], s[old] = quantize(torch.randn(3, *q.shape[1:], generator=g), torch.int16)
    caches[torch.float32].states(layer)[1][old] = values(q[old], s[old])
    before = {dt: c.states(layer)[1].clone() for dt, c in caches.items()}
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    cu, slots, src = i32(0, 5, 5, 9, 10), i32(2, 3, 4, -1), i32(0, 3, 4, -1)
    step = (cu, slots, src, -1, 4, i32(0, 0, 4, 0), i32(5, 6, -1, -1, 7, -1, -1, -1).view(4, 2),
            torch.tensor([1, 1]), torch.zeros(2, 3, dtype=torch.long))
    hidden = torch.randn(10, CONFIG.hidden_size, generator=g)
    out = {dt: mixer(hidden, *c.states(layer), c.ssm_scale(layer), *step, prefill=True)
           for dt, c in caches.items()}
    torch.testing.assert_close(out[torch.int16], out[torch.float32], rtol=0, atol=1e-6)
    want = caches[torch.float32].states(layer)[1]
    changed = [i for i in range(9) if not torch.equal(want[i], before[torch.float32][i])]
    assert changed == [2, 4, 5, 7]  # the running rows of sequences with tokens, 2 checkpoints
    got = values(q, s)
    # rounded to nearest: half a step, and float32's rounding of h * QMAX / absmax (ulps
    # of QMAX, a few thousandths of a step)
    steps = (got[changed] - want[changed]).abs() / s[changed][..., None]
    assert float(steps.max()) <= 0.5 + QMAX[torch.int16] * 2.0**-22
    untouched = [i for i in range(9) if i not in changed and i != SCRATCH_SLOT]
    assert torch.equal(q[untouched], before[torch.int16][untouched])


def test_cache_layout_and_bytes_per_slot():
    cache = StateCache(CONFIG, num_slots=6, max_requests=2, max_len=8, dtype=torch.bfloat16,
                       state_dtype="int8")
    layer = CONFIG.mamba_layers[0]
    conv, ssm = cache.states(layer)
    scale = cache.ssm_scale(layer)
    assert conv.dtype == torch.bfloat16  # the conv window stays in the activation dtype
    assert ssm.dtype == torch.int8 and ssm.shape == (6, 4, 16, 8)
    assert scale.dtype == torch.float32 and scale.shape == (6, 4, 16)
    per_layer = conv[0].numel() * 2 + ssm[0].numel() + scale[0].numel() * 4
    assert cache.state_bytes_per_slot() == len(CONFIG.mamba_layers) * per_layer
    plain = StateCache(CONFIG, num_slots=6, max_requests=2, max_len=8, state_dtype="bfloat16")
    assert plain.ssm_scale(layer) is None and plain.states(layer)[0].dtype == torch.bfloat16


def test_checkpoint_copies_carry_the_scales():
    cache = StateCache(CONFIG, num_slots=6, max_requests=2, max_len=8, state_dtype="int8")
    layer = CONFIG.mamba_layers[-1]
    ssm, scale = cache.states(layer)[1], cache.ssm_scale(layer)
    ssm[2].random_(-127, 128)
    scale[2].uniform_(0.5, 1.0)
    cache.copy_slots([2], [5])
    assert torch.equal(ssm[5], ssm[2]) and torch.equal(scale[5], scale[2])


@pytest.mark.parametrize("value", ["int4", "fp8", torch.float64, torch.int32, 8])
def test_bad_state_dtype_is_refused_naming_the_accepted_ones(model, value):
    with pytest.raises(ValueError, match=r"state_dtype: expected one of float32, bfloat16, "
                                         r"float16, int16, int8, float8_e4m3fn"):
        _engine(model, value)


def test_compiled_decode_reads_and_writes_the_quantized_rows(model):
    """Only the decode step is compiled (the engine compiles each step on its first call)."""
    engine = _engine(model, torch.int8, compile=True)
    slots = torch.tensor([RESERVED_SLOTS, RESERVED_SLOTS + 1, -1, -1], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    for ssm, scale in _ssm(engine):  # states a prefill could have left
        ssm[slots[:2].long()] = torch.randint(-127, 128, ssm[:2].shape, generator=g,
                                              dtype=torch.int8)
        scale[slots[:2].long()] = torch.rand(scale[:2].shape, generator=g) * 0.1
    inputs = (torch.tensor([3, 7, 0, 0]), torch.tensor([4, 9, 0, 0]),
              torch.tensor([0, 1, 3, 3]), slots)
    before = _buffers(engine)
    with torch.inference_mode():
        got = engine.decode_step(*inputs)
        compiled = _buffers(engine)
        for name, t in engine.cache.named_buffers():
            t.copy_(before[name])
        want = engine.steps.decode(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the rows eager wrote, to within Inductor's rounding of the layers before (float32
    # ulps), which may move a quantized value by one step
    for i in CONFIG.mamba_layers:
        conv, ssm = engine.cache.states(i)
        scale = engine.cache.ssm_scale(i)
        got_ssm, got_scale = compiled[f"ssm{i}"], compiled[f"ssm_scale{i}"]
        assert not torch.equal(got_ssm, before[f"ssm{i}"])  # decode wrote the rows
        step = torch.maximum(scale, got_scale)[..., None]
        assert bool(((values(got_ssm, got_scale) - values(ssm, scale)).abs() <= step).all())
        torch.testing.assert_close(got_scale, scale, rtol=1e-5, atol=0)
        torch.testing.assert_close(compiled[f"conv{i}"], conv, rtol=0, atol=1e-5)
    sites = [s for s in engine.lowering_report() if s.op == "selective_state_update"]
    assert [s.site for s in sites] == [f"model.layers.{i}.mixer: selective_state_update"
                                       for i in CONFIG.mamba_layers]
    # on a CPU native serves it (Triton and FlashInfer register for CUDA only)
    assert all(s.graph_name == "decode" and s.provider == "native" for s in sites)


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_stochastic_rounding_decodes_and_draws_new_bits_each_step(model, float32, state_dtype):
    """``state_rounding="stochastic"``: every decode step advances every layer's seed once
    (the same stream from the same start), the tokens stay those of float32 state within
    the dtype's rounding (int8: the first token, from prefill, which rounds to nearest),
    and the states differ from rounding to nearest."""
    seeded = _engine(model, state_dtype, state_rounding="stochastic")
    start = seeded.cache.seeds.clone()
    done = seeded.generate(_prompts(), NEW)
    steps = seeded.cache.seeds - start
    assert torch.all(steps == steps[0]) and int(steps[0]) >= NEW - 1
    assert len(set(start.tolist())) == len(start)  # layers apart
    again = _engine(model, state_dtype, state_rounding="stochastic").generate(_prompts(), NEW)
    assert torch.equal(_logits(done), _logits(again))
    nearest = _engine(model, state_dtype).generate(_prompts(), NEW)
    assert not torch.equal(_logits(done), _logits(nearest))
    assert [c.tokens[0] for c in done] == [c.tokens[0] for c in float32]


def test_stochastic_rounding_needs_a_rounded_state(model):
    with pytest.raises(ValueError, match=r"^state_rounding: 'stochastic' rounds float16"):
        _engine(model, "float32", state_rounding="stochastic")
    with pytest.raises(ValueError, match=r"^state_rounding: expected one of nearest, stoch"):
        _engine(model, "int8", state_rounding="up")
