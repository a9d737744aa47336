"""Plain ``torch.compile`` (Inductor, no mamba-ir passes) on a patched transformers model.

``generate()`` through the compiled forward must give the eager patched model's tokens,
greedy and beam search, its logits and cache states (float32, 1e-5) in prefill and decode,
with one graph per phase: no graph breaks, no recompile per decode step. A 1-layer Mamba2
(no attention, so no KV cache that grows) and few graphs keep the compile time low (each
graph costs seconds on a CI machine); a hybrid model compiles one more decode graph, when
its attention KV turns dynamic (docs/transformers.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_transformers_patch import (  # noqa: E402
    cache_arg,
    cache_of,
    mamba2,
    padded_batch,
    pair,
    record_reorders,
    six_rows,
)
from torch._dynamo.utils import counters  # noqa: E402

from mamba_ir.integrations import transformers as hf  # noqa: E402

TIGHT = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Graph counts are per test: compiled code other tests left on the same forward would
    be reused, or count against the recompile limit."""
    torch._dynamo.reset()
    counters.clear()


def one_layer():
    return mamba2(layers=1)


def decode(model, ids, mask, cache):
    """Two decode steps on ``cache``: their logits."""
    logits = []
    for i in range(2):
        full = torch.ones(ids.shape[0], mask.shape[1] + i + 1, dtype=mask.dtype)
        full[:, :mask.shape[1]] = mask
        out = model(ids[:, i:i + 1], attention_mask=full, use_cache=True,
                    **{cache_arg(model): cache})
        logits.append(out.logits)
    return logits


def assert_same_states(got, want):
    layer, other = got.layers[0], want.layers[0]
    torch.testing.assert_close(layer.conv_states[0], other.conv_states[0], **TIGHT)
    torch.testing.assert_close(layer.recurrent_states[0], other.recurrent_states[0], **TIGHT)


@torch.no_grad()
def test_generate_on_the_compiled_forward_greedy_and_beam_search(monkeypatch):
    """``generate()`` calls ``model.forward``: compiled, greedy decoding and beam search give
    the eager tokens and logits and share two graphs (prefill, decode); beam search's
    cache reorders (transformers replaces each state tensor by an ``index_select`` copy)
    are new inputs to the decode graph, not recompiles."""
    ref, model = pair(one_layer)
    eager = hf.patch(copy.deepcopy(ref))
    model.forward = torch.compile(model.forward)
    reorders = record_reorders(monkeypatch)

    ids6, mask6 = six_rows()
    greedy = dict(attention_mask=mask6, max_new_tokens=5, pad_token_id=0, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    got, want = model.generate(ids6, **greedy), eager.generate(ids6, **greedy)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.sequences, ref.generate(ids6, **greedy).sequences)
    assert len(got.logits) == 5  # the prefill's last position, then 4 decode steps
    for g, w in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(g, w, **TIGHT)
    assert_same_states(cache_of(got), cache_of(want))
    assert counters["stats"]["unique_graphs"] == 2

    ids, mask = padded_batch()
    beams = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, do_sample=False,
                 num_beams=2, num_return_sequences=2)
    reorders.clear()
    tokens = model.generate(ids, **beams)
    # a beam took over another's state after a decode step: the states really moved
    assert any(idx != list(range(6)) for idx in reorders[1:])
    assert torch.equal(tokens, ref.generate(ids, **beams))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # nothing more compiled


@torch.no_grad()
def test_dynamic_true_on_transformers_conv_window():
    """With ``dynamic=True``, torch 2.13's Inductor misplaces a mutating op's update on a
    view of fewer dimensions than its base (``cache[1]``, docs/integrations.md). The
    patched layer gives the conv op the last ``width - 1`` columns of transformers'
    per-layer conv state: a slice, at offset 1 when transformers' own prefill allocated the
    state (``width`` columns), which is written where it lies."""
    ref, model = pair(one_layer)
    ids, mask = padded_batch()
    compiled = torch.compile(model, dynamic=True)
    results = []
    for m in (model, compiled, ref):
        cache = cache_of(ref(ids, attention_mask=mask, use_cache=True))  # transformers' layout
        assert cache.layers[0].conv_states[0].shape[-1] == 4  # d_conv columns
        results.append((decode(m, ids, mask, cache), cache))
    (want, want_cache), (got, got_cache), (theirs, _) = results
    for g, w, t in zip(got, want, theirs, strict=True):
        torch.testing.assert_close(g, w, **TIGHT)
        torch.testing.assert_close(g, t, atol=1e-4, rtol=0)
    assert_same_states(got_cache, want_cache)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # both decode steps, one dynamic graph
    # the wrapper's generate() is the model's, which calls the eager forward (compile
    # model.forward for generate(), as the test above does): nothing more is compiled
    tokens = compiled.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    assert tokens.shape == (3, 13) and counters["stats"]["unique_graphs"] == 1
