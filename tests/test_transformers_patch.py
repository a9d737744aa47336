"""``mamba_ir.integrations.transformers.patch`` against transformers' own models (CPU, float32).

Each supported family as a tiny random-init model: the patched copy must give transformers'
logits (1e-4) with and without a cache, continuing a cache over several tokens, and the same
``generate()`` tokens, greedy, sampled and beam search, on a left-padded batch, leaving the
cache layers as transformers' own forward leaves them (states and bookkeeping). The ops must
run on the cache's own tensors. ``patch`` refuses a transformers version outside its range
and a mixer class whose own forward it does not reproduce. Compiled ``generate()``
(``mamba_ir.compile``) on Mamba2 and Bamba keeps CI time low with few graphs; plain
``torch.compile`` is tested in test_transformers_compile.py. These tests run on the newest
supported transformers (``make test``) and on the oldest (``make test-hf-oldest``).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mamba_ir  # noqa: E402
from mamba_ir.integrations import transformers as hf  # noqa: E402

VOCAB = 64
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def bamba():
    cfg = transformers.BambaConfig(
        **COMMON, **MAMBA, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
        num_key_value_heads=1, attn_layer_indices=[1], time_step_limit=(0.0, 1.0),
    )
    return transformers.BambaForCausalLM(cfg)


def mamba2(layers: int = 2):
    cfg = transformers.Mamba2Config(
        **COMMON, num_hidden_layers=layers, num_heads=4, head_dim=16, state_size=8, n_groups=2,
        expand=2, conv_kernel=4, chunk_size=8,
    )
    return transformers.Mamba2ForCausalLM(cfg)


def nemotron_h():
    cfg = transformers.NemotronHConfig(
        **COMMON, layers_block_type=["mamba", "attention", "mlp"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=48, ssm_state_size=8,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=2, conv_kernel=4, expand=2, chunk_size=8,
    )
    return transformers.NemotronHForCausalLM(cfg)


def granitemoehybrid():
    cfg = transformers.GraniteMoeHybridConfig(
        **COMMON, **MAMBA, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
        shared_intermediate_size=16, layer_types=["mamba", "attention"],
    )
    return transformers.GraniteMoeHybridForCausalLM(cfg)


def falcon_h1(rms_norm: bool):
    cfg = transformers.FalconH1Config(
        **COMMON, **MAMBA, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
        num_key_value_heads=1, mamba_d_ssm=64, mamba_rms_norm=rms_norm,
        ssm_in_multiplier=0.5, ssm_multipliers=[1.5, 0.5, 1.0, 2.0, 0.75],
    )
    return transformers.FalconH1ForCausalLM(cfg)


FAMILIES = {
    "bamba": bamba,
    "mamba2": mamba2,
    "nemotron_h": nemotron_h,
    "granitemoehybrid": granitemoehybrid,
    "falcon_h1": lambda: falcon_h1(rms_norm=False),
    "falcon_h1_norm": lambda: falcon_h1(rms_norm=True),
}


def pair(make, **patch_kwargs):
    """A transformers model and a patched copy of it (same weights)."""
    torch.manual_seed(0)
    ref = make().eval()
    return ref, hf.patch(copy.deepcopy(ref), **patch_kwargs)


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


def cache_of(out):
    """The cache an output returns (transformers >= 5.24 names it ``cache``; earlier
    ``past_key_values``, or Mamba2's ``cache_params``)."""
    return next(out[name] for name in ("cache", "past_key_values", "cache_params") if name in out)


def cache_arg(model) -> str:
    """The name under which ``model``'s forward takes a cache, in this version."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper takes *args
    params = inspect.signature(type(model).forward).parameters
    return next(name for name in ("cache", "past_key_values", "cache_params") if name in params)


def cache_kwargs(model, out) -> dict:
    """Continue from ``out``'s cache."""
    return {cache_arg(model): cache_of(out), "use_cache": True}


def assert_same_cache(got, want) -> None:
    """Every Mamba layer of ``got`` holds ``want``'s states (the conv the window it reads)
    and the same bookkeeping (``has_previous_state``, token counts, sizes, dtypes)."""
    for layer, other in zip(got.layers, want.layers, strict=True):
        if not isinstance(layer, transformers.cache_utils.LinearAttentionCacheLayerMixin):
            continue
        mine, theirs = vars(layer), vars(other)
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if key == "conv_states":  # the conv reads the last d_conv - 1 columns
                window = layer.conv_kernel_size[0] - 1
                assert mine[key][0].shape == value[0].shape
                torch.testing.assert_close(mine[key][0][..., -window:], value[0][..., -window:],
                                           atol=1e-4, rtol=0)
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(mine[key], value, atol=1e-4, rtol=0)
            elif key == "recurrent_states":
                torch.testing.assert_close(mine[key][0], value[0], atol=1e-4, rtol=0)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), key
            else:
                assert mine[key] == value, key
    assert seq_length(got) == seq_length(want)


def seq_length(cache) -> int | str:
    """What ``generate()`` reads as the cache's length (transformers < 5.25 refuses to say
    for a cache of Mamba layers only)."""
    try:
        return int(cache.get_seq_length())
    except ValueError as error:
        return str(error)


def record_reorders(monkeypatch) -> list[list[int]]:
    """The beam indices of every ``Cache.reorder_cache`` call from now on, in order."""
    reorders: list[list[int]] = []
    reorder = transformers.cache_utils.Cache.reorder_cache

    def recording(cache, beam_idx):
        reorders.append(beam_idx.tolist())
        return reorder(cache, beam_idx)

    monkeypatch.setattr(transformers.cache_utils.Cache, "reorder_cache", recording)
    return reorders


def op_calls(monkeypatch) -> list[str]:
    """The names of the IR ops the patched layers call, in order."""
    calls: list[str] = []

    def counting(op):
        def call(*args, **kwargs):
            calls.append(op.name)
            return op(*args, **kwargs)
        return call

    names = ("causal_conv1d_fn", "causal_conv1d_update", "selective_state_update",
             "mamba_chunk_scan")
    counted = SimpleNamespace(**{n: counting(getattr(hf.ops, n)) for n in names})
    monkeypatch.setattr(hf, "ops", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_match_transformers(family, monkeypatch):
    ref, model = pair(FAMILIES[family])
    ids, mask = padded_batch()
    calls = op_calls(monkeypatch)
    for use_cache in (False, True):
        want = ref(ids, attention_mask=mask, use_cache=use_cache).logits
        got = model(ids, attention_mask=mask, use_cache=use_cache).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert {"causal_conv1d_fn", "mamba_chunk_scan"} <= set(calls)

    # a cache continued by several tokens (chunked prefill), then by one (decode)
    caches = []
    for m in (ref, model):
        out = m(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        more = m(ids[:, 6:], attention_mask=mask, **cache_kwargs(m, out))
        step = m(ids[:, :1], attention_mask=torch.ones(3, 12, dtype=torch.long),
                 **cache_kwargs(m, more))
        caches.append((more.logits, step.logits, step))
    for got, want in zip(caches[1][:2], caches[0][:2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert "causal_conv1d_update" in calls and "selective_state_update" in calls

    # the same states and bookkeeping, in the same cache layers
    assert_same_cache(cache_of(caches[1][2]), cache_of(caches[0][2]))


@torch.no_grad()
def test_decode_updates_the_cache_tensors_in_place():
    _, model = pair(bamba)
    ids, mask = padded_batch()
    cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
    layer = cache.layers[0]
    conv, ssm = layer.conv_states[0], layer.recurrent_states[0]
    before = ssm.clone()
    model(ids[:, :1], attention_mask=torch.ones(3, 12, dtype=torch.long),
          **{cache_arg(model): cache})
    assert layer.conv_states[0] is conv and layer.recurrent_states[0] is ssm
    assert not torch.equal(ssm, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_transformers(family):
    ref, model = pair(FAMILIES[family])
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    want = ref.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(model.generate(ids, do_sample=False, **kwargs), want)
    sampled = []
    for m in (ref, model):
        torch.manual_seed(7)
        sampled.append(m.generate(ids, do_sample=True, top_k=0, temperature=1.0, **kwargs))
    assert torch.equal(sampled[1], sampled[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_matches_transformers(family, monkeypatch):
    """Between steps transformers reorders the cache (``Cache.reorder_cache``: each state
    tensor is replaced by an ``index_select`` copy); the patched mixers must read the
    reordered states, not the tensors they wrote."""
    ref, model = pair(FAMILIES[family])
    ids, mask = padded_batch()
    reorders = record_reorders(monkeypatch)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=0, num_beams=3,
                  num_return_sequences=3)
    want = ref.generate(ids, do_sample=False, **kwargs)
    # after the first step (every beam of a prompt starts from the same state), some beam
    # took over another's state: the reorders matter
    rows = list(range(9))
    assert any(idx != rows for idx in reorders[1:])
    assert torch.equal(model.generate(ids, do_sample=False, **kwargs), want)
    sampled = []
    for m in (ref, model):
        torch.manual_seed(7)
        sampled.append(m.generate(ids, do_sample=True, **{**kwargs, "num_beams": 2,
                                                           "num_return_sequences": 2}))
    assert torch.equal(sampled[1], sampled[0])


def test_beam_search_on_a_static_cache():
    # a StaticCache reorders its Mamba layers as a DynamicCache does (index_select copies)
    ref, model = pair(bamba)
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=0, do_sample=False,
                  num_beams=3, cache_implementation="static", disable_compile=True)
    assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))


@torch.no_grad()
def test_triton_providers_take_the_cache_layouts(monkeypatch):
    """The layouts the GPU runs (transformers' cache rows, projection slices) through the
    Triton kernels (interpreted on a CPU, as conftest sets up): the providers accept them
    and agree with transformers."""
    if torch.cuda.is_available():
        pytest.skip("runs the Triton interpreter on CPU tensors")
    ref, model = pair(bamba)
    ids, mask = padded_batch()
    chosen = set()
    decide = mamba_ir.IrOp.decide

    def noting(op, call):
        decision = decide(op, call)
        chosen.add((decision.op, decision.provider))
        return decision

    monkeypatch.setattr(mamba_ir.IrOp, "decide", noting)
    with mamba_ir.set_priority(["triton"]):
        outs = []
        for m in (ref, model):
            out = m(ids, attention_mask=mask, use_cache=True)
            step = m(ids[:, :1], attention_mask=torch.ones(3, 12, dtype=torch.long),
                     **cache_kwargs(m, out))
            outs.append((out.logits, step.logits))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert chosen == {(op, "triton") for op in ("causal_conv1d_fn", "mamba_chunk_scan",
                                                 "causal_conv1d_update",
                                                 "selective_state_update")}


@torch.no_grad()
def test_prefill_on_the_multi_token_ssu():
    ref, model = pair(bamba, prefill_op="selective_state_update")  # dt clamped to (0, 1)
    ids, mask = padded_batch()
    want = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, atol=1e-4, rtol=0)


def six_rows():
    """Six left-padded prompts: the batch beam search over three prompts with two beams
    runs, so greedy decoding and beam search share compiled graphs."""
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (6, 11))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[4, :2] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["mamba2", "bamba"])
def test_compiled_generate_matches_transformers(family):
    """``mamba_ir.compile(model.forward)``: greedy decoding and beam search give
    transformers' tokens on left-padded batches; the prefill graph runs the conv and the
    chunked scan, the decode graph the conv and SSM update steps (a hybrid model compiles
    its decode step once more, when the attention KV length turns dynamic)."""
    ref, model = pair(lambda: mamba2(layers=1) if family == "mamba2" else bamba())
    model.forward = mamba_ir.compile(model.forward)
    ids6, mask6 = six_rows()
    ids, mask = padded_batch()
    greedy = dict(attention_mask=mask6, max_new_tokens=3, pad_token_id=0, do_sample=False)
    beams = dict(attention_mask=mask, max_new_tokens=3, pad_token_id=0, do_sample=False,
                 num_beams=2, num_return_sequences=2)
    # compiled here, not read from a cache an older build of the passes filled
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        assert torch.equal(model.generate(ids6, **greedy), ref.generate(ids6, **greedy))
        assert torch.equal(model.generate(ids, **beams), ref.generate(ids, **beams))
    graphs = defaultdict(set)
    for site in model.forward.lowering_report.sites:
        graphs[site.graph].add((site.op, site.provider))
    prefill = {(op, "native") for op in ("causal_conv1d_fn", "mamba_chunk_scan")}
    decode = {(op, "native") for op in ("causal_conv1d_update", "selective_state_update")}
    assert prefill in graphs.values() and decode in graphs.values()
    assert all(sites in (prefill, decode) for sites in graphs.values())


def test_patch_is_idempotent_and_keeps_training_on_transformers():
    ref, model = pair(mamba2)
    mixer = model.backbone.layers[0].mixer
    assert hf.is_patched(mixer) and not hf.is_patched(ref.backbone.layers[0].mixer)
    assert hf.patch(model) is model
    model.train()
    ids, _ = padded_batch()
    torch.testing.assert_close(model(ids).logits, ref.train()(ids).logits)


def test_refusals():
    torch.manual_seed(0)
    mamba1 = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer is a MambaMixer .*not one of"):
        hf.patch(mamba1)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="found none in LlamaForCausalLM"):
        hf.patch(llama)
    with pytest.raises(ValueError, match="prefill_op"):
        hf.patch(mamba2(), prefill_op="scan")
    for dtype in ("int8", torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=r"state_dtype: quantized SSM states .* not "
                                             r"supported yet by the transformers integration"):
            hf.patch(mamba2(), state_dtype=dtype)
    with pytest.raises(ValueError, match="state_dtype: expected float32"):
        hf.patch(mamba2(), state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype: expected one of"):
        hf.patch(mamba2(), state_dtype="int4")
    accepted = hf.patch(mamba2(), state_dtype="float32")  # the default, by name
    assert hf.is_patched(accepted.backbone.layers[0].mixer)
    model = mamba2()
    model.backbone.layers[1].mixer.activation = "gelu"
    with pytest.raises(ValueError, match="layers.1.mixer uses activation 'gelu'"):
        hf.patch(model)
    assert not hf.is_patched(model.backbone.layers[0].mixer)  # nothing changed


@pytest.fixture
def fresh_verdicts():
    """Tests that change what the check sees: no verdict from before, none left behind."""
    hf._verdict.cache_clear()
    yield
    hf._verdict.cache_clear()


def test_refuses_a_mixer_that_computes_something_else(monkeypatch, fresh_verdicts):
    """A mixer class whose own forward the patched one does not reproduce (here: its output
    scaled) is refused, naming the class, the version and what disagreed, and nothing in
    the model changes."""
    from transformers.models.bamba.modeling_bamba import BambaMixer

    forward = BambaMixer.forward
    monkeypatch.setattr(BambaMixer, "forward", lambda self, *a, **k: 2 * forward(self, *a, **k))
    torch.manual_seed(0)
    model = bamba().eval()
    version = re.escape(transformers.__version__)
    with pytest.raises(ValueError, match=(
            rf"^model: the patched BambaMixer disagrees with BambaMixer's own forward under "
            rf"transformers {version} \(a tiny float32 instance on the CPU\): the output "
            r"differs by up to [0-9.e-]+ \(its largest value [0-9.e-]+\), in the prefill "
            r"without a cache \(prefill_op='mamba_chunk_scan'\); nothing was patched$")):
        hf.patch(model)
    assert not any(hf.is_patched(m) for m in model.modules())


def test_refuses_a_cache_kept_otherwise(monkeypatch, fresh_verdicts):
    """The cache's bookkeeping counts as much as the outputs: a patched forward that leaves
    ``has_previous_state`` unset (the next call would start from zero state) is refused."""
    start = hf._start

    def forgetful(layer, *args):
        start(layer, *args)
        layer.has_previous_state[0] = False

    monkeypatch.setattr(hf, "_start", forgetful)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=(
            r"the patched Mamba2Mixer disagrees .*: cache layer 0's has_previous_state\[0\] "
            r"is False where its own forward's is True, in the prefill of a left-padded batch")):
        hf.patch(mamba2())


@pytest.mark.parametrize("version", ["5.22.2", "5.26.0", "5.26.0.dev0", "6.0.0", "not a version"])
def test_refuses_transformers_outside_its_range(monkeypatch, version):
    monkeypatch.setattr(hf, "_installed_transformers", lambda: version)
    torch.manual_seed(0)
    model = mamba2()
    with pytest.raises(ValueError, match=(
            rf"^model: transformers {re.escape(version)} is installed; patch\(\) supports "
            r"transformers >=5\.23,<5\.26, whose mixer forwards and cache bookkeeping it "
            r"reproduces")):
        hf.patch(model)
    assert not any(hf.is_patched(m) for m in model.modules())


def test_each_mixer_class_is_checked_once_leaving_the_callers_settings(
        monkeypatch, fresh_verdicts):
    """Two models of four and two Mamba2 layers: one check. It draws no number from the
    caller's random stream, and runs in float32 with one thread whatever the caller set,
    which it leaves as it was."""
    checked = []
    check = hf._check_class
    monkeypatch.setattr(hf, "_check_class", lambda cls, *a: checked.append(cls) or check(cls, *a))
    torch.manual_seed(0)
    models = [mamba2(layers=4), mamba2(layers=2)]
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    try:
        for model in models:
            hf.patch(model)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(4), want)
    assert checked == [type(models[0].backbone.layers[0].mixer)]
    assert all(hf.is_patched(layer.mixer) for m in models for layer in m.backbone.layers)


@torch.no_grad()
def test_the_patched_mixer_takes_the_cache_by_either_name():
    """transformers 5.24 renamed the mixers' ``cache_params`` to ``cache``; the patched
    forward takes either, and refuses two different caches."""
    ref, model = pair(bamba)
    mixer = model.model.layers[0].mamba
    x = torch.randn(3, 5, 32)
    outs = []
    for name in ("cache", "cache_params"):
        cache = transformers.DynamicCache(config=model.config)
        outs.append((mixer(x, **{name: cache}), mixer(x[:, :1], **{name: cache})))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    caches = [transformers.DynamicCache(config=model.config) for _ in range(2)]
    with pytest.raises(ValueError, match="cache_params: expected the cache once"):
        mixer(x, cache=caches[0], cache_params=caches[1])


def test_generate_benchmark_runs_at_a_tiny_size(tmp_path):
    bench = pytest.importorskip("benchmarks.hf_generate")
    pytest.importorskip("matplotlib")
    out = tmp_path / "hf_generate.json"
    payload = bench.main(["--tiny", "--prompt", "12", "--new", "4", "--variants",
                          "transformers,patched", "--out", str(out)])
    rows = {row["variant"]: row for row in payload["rows"]}
    assert set(rows) == {"transformers", "patched"}
    assert rows["patched"]["matching_tokens"] == payload["new_tokens"]
    assert any(p.startswith("mamba_chunk_scan -> ") for p in rows["patched"]["providers"])
    assert out.exists() and out.with_name("hf_generate.png").exists()
