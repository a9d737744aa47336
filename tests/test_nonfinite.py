"""Non-finite values: a NaN or inf in one token's input reaches only that token and the later
tokens of its sequence (and its sequence's destination row), as in the recurrence, in
every provider.

Every provider that runs on the CPU is checked (native; Triton through its interpreter, on
small calls); the ``gpu`` tests repeat the poison property at Mamba2 size.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from nonfinite_calls import BUILDERS, Seqs

pytest.importorskip("triton")

LENGTHS = [5, 7, 3]  # chunk 4: the middle sequence's tokens 4..6 share a chunk
NAN, INF = math.nan, math.inf
PROVIDERS = ["native", "triton"]


def _poison(seqs: Seqs, call: dict, name: str, tok: int, value: float) -> None:
    """``value`` into one element of token ``tok`` of the per-token input ``name`` (a tied
    input, stride 0 over an axis, takes it for the whole axis: still one token)."""
    t = call[name]
    index = [0] * t.dim()
    index[seqs.inputs[name]] = tok
    t[tuple(index)] = value


def _nonfinite_tokens(seqs: Seqs, out: torch.Tensor) -> set[int]:
    return {t for t in range(sum(seqs.lengths))
            if not bool(seqs.token(out, t).isfinite().all())}


def _check_poison(seqs: Seqs, provider: str, clean: tuple[torch.Tensor, torch.Tensor],
                  name: str, b: int, offset: int, value: float) -> None:
    tok = seqs.starts[b] + offset % seqs.lengths[b]
    end = seqs.starts[b] + seqs.lengths[b]
    runs = {}
    for who in {provider, "native"}:
        call = seqs.clone()
        _poison(seqs, call, name, tok, value)
        runs[who] = seqs.run(who, call), call[seqs.state]
    out, state = runs[provider]
    clean_out, clean_state = clean
    where = f"{seqs.op} {provider}: {name}[{tok}] = {value} (sequence {b}, tokens up to {end})"
    changed = {t for t in range(sum(seqs.lengths))
               if not torch.equal(seqs.token(out, t), seqs.token(clean_out, t))}
    assert changed <= set(range(tok, end)), (where, "outputs changed", sorted(changed))
    rows = [r for r in range(state.shape[0]) if r != seqs.dst[b]]
    assert torch.equal(state[rows], clean_state[rows]), (where, "another row changed")
    # as far as the recurrence carries it: the same tokens and row non-finite as native's
    native_out, native_state = runs["native"]
    assert _nonfinite_tokens(seqs, out) == _nonfinite_tokens(seqs, native_out), where
    row = seqs.dst[b]
    assert bool(state[row].isfinite().all()) == bool(native_state[row].isfinite().all()), where


# explicit examples, one per per-token input in the order of ``Seqs.inputs`` (Triton runs
# the first three: x, the step, B). The first is a NaN x after an earlier token of its chunk,
# which the Triton scan's tensor-core products once spread to that earlier token; the
# second a NaN step, which a clamp without NaN propagation once turned into dt_limit's bound
EXAMPLES = [(1, 5, NAN), (1, 2, NAN), (0, 3, INF), (1, 6, -INF), (2, 1, NAN)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", sorted(BUILDERS))
def test_a_poisoned_token_reaches_only_itself_and_later_tokens_of_its_sequence(op, provider):
    seqs = BUILDERS[op](LENGTHS)
    clean_call = seqs.clone()
    clean = seqs.run(provider, clean_call), clean_call[seqs.state]
    assert bool(clean[0].isfinite().all())
    names = list(seqs.inputs)

    @settings(max_examples=25, deadline=None,
              phases=[Phase.explicit] if provider != "native" else list(Phase))
    @given(name=st.sampled_from(names), b=st.integers(0, len(LENGTHS) - 1),
           offset=st.integers(0, 6), value=st.sampled_from([NAN, INF, -INF]))
    def poison(name, b, offset, value):
        _check_poison(seqs, provider, clean, name, b, offset, value)

    explicit = EXAMPLES if provider == "native" else EXAMPLES[:3]
    for name, (b, offset, value) in zip(names, explicit, strict=False):
        poison = example(name=name, b=b, offset=offset, value=value)(poison)
    poison()


# -- full size, compiled Triton kernels --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(BUILDERS))
def test_a_poisoned_token_full_size_gpu(op):
    """The poison property at Mamba2 size (bf16): sequences of several chunks and one of a
    single chunk, a NaN x after earlier tokens of its 64-token scan block, and an inf step."""
    lengths = [700, 300, 1100]
    seqs = BUILDERS[op](lengths, "cuda", full=True)
    clean_call = seqs.clone()
    clean = seqs.run("triton", clean_call), clean_call[seqs.state]
    names = list(seqs.inputs)
    for name, (b, offset, value) in zip(names, [(2, 517, NAN), (0, 300, INF), (1, 40, NAN),
                                               (2, 1000, -INF), (0, 3, NAN)], strict=False):
        _check_poison(seqs, "triton", clean, name, b, offset, value)
    torch.cuda.synchronize()
