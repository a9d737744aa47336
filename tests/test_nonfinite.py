"""Non-finite values: a NaN or inf in one token's input reaches only that token and the later
tokens of its sequence (and its sequence's destination row), as in the recurrence, in
every provider; one in a ring entry of a replay row reaches only the sequences that read
the row (and their destination rows) when the entry is one of the row's filled ones, and
nothing past them; non-finite but legal parameters (A = -inf, steps of exactly 0, the
``dt_limit`` default ``(0, inf)``) give the recurrence's result.

Every provider that runs on the CPU is checked (native; Triton through its interpreter, on
small calls); the ``gpu`` tests repeat the poison property at Mamba2 size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from nonfinite_calls import BUILDERS, RING_BUILDERS, Seqs

from mamba_ir import get_op

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


def _nonfinite_tokens(seqs: Seqs, out: torch.Tensor | None) -> set[int]:
    return {t for t in range(sum(seqs.lengths))
            if not bool(seqs.token(out, t).isfinite().all())}


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return torch.equal(a, b) if rtol == 0 else torch.allclose(a.float(), b.float(), rtol=rtol,
                                                               atol=rtol)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Each element's bytes: compared as bits, a NaN (a ring entry past its length) equals
    itself."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _changed_rows(seqs: Seqs, call: dict, clean: dict) -> set[int]:
    """The rows of which any member differs in bits from the clean run's."""
    nslots = call[seqs.state].shape[0]
    return {r for r in range(nslots) for name in seqs.members(call)
            if not torch.equal(_bits(call[name][r]), _bits(clean[name][r]))}


def _finite_rows(seqs: Seqs, call: dict, rows: list[int]) -> list[bool]:
    return [bool(v.isfinite().all()) for v in seqs.values(call, rows)] if rows else []


def _runs(seqs: Seqs, provider: str, poison: Callable[[dict], None]) -> dict:
    """The provider's and native's runs on a poisoned copy of the call: (output, call)."""
    runs = {}
    for who in {provider, "native"}:
        call = seqs.clone()
        poison(call)
        runs[who] = seqs.run(who, call), call
    return runs


def _check_poison(seqs: Seqs, provider: str, clean: tuple[torch.Tensor, dict],
                  name: str, b: int, offset: int, value: float, rtol: float = 0.0) -> None:
    """``rtol`` 0: unchanged tokens bit-identical (the interpreter); on the GPU the chunk
    scan's flagged chunk runs another compiled branch, so within rounding."""
    tok = seqs.starts[b] + offset % seqs.lengths[b]
    end = seqs.starts[b] + seqs.lengths[b]
    runs = _runs(seqs, provider, lambda call: _poison(seqs, call, name, tok, value))
    out, call = runs[provider]
    clean_out, clean_call = clean
    where = f"{seqs.op} {provider}: {name}[{tok}] = {value} (sequence {b}, tokens up to {end})"
    changed = {t for t in range(sum(seqs.lengths))
               if not _same(seqs.token(out, t), seqs.token(clean_out, t), rtol)}
    assert changed <= set(range(tok, end)), (where, "outputs changed", sorted(changed))
    rows = _changed_rows(seqs, call, clean_call) - {seqs.dst[b]}
    assert not rows, (where, "another row changed", sorted(rows))
    # as far as the recurrence carries it: the same tokens and row non-finite as native's
    native_out, native_call = runs["native"]
    assert _nonfinite_tokens(seqs, out) == _nonfinite_tokens(seqs, native_out), where
    row = [seqs.dst[b]]
    assert _finite_rows(seqs, call, row) == _finite_rows(seqs, native_call, row), where


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
    clean = seqs.run(provider, clean_call), clean_call
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


# -- ring entries: the replay ops' rows hold inputs ------------------------------------------


def _poison_entry(call: dict, name: str, row: int, entry: int, value: float) -> None:
    """``value`` into the first element of entry ``entry`` of ring member ``name`` of
    ``row`` (axis 0 the row, axis 1 the entry)."""
    index = [0] * call[name].dim()
    index[0], index[1] = row, entry
    call[name][tuple(index)] = value


def _check_ring_poison(seqs: Seqs, provider: str, clean: tuple[torch.Tensor | None, dict],
                       name: str, row: int, entry: int, value: float) -> None:
    """A poisoned ring entry is a poisoned row when it is one of the row's filled entries,
    and nothing at all past them. It may reach only the outputs of the sequences that read
    the row and their destination rows (and the row itself), as far as native carries it."""
    readers = [b for b, r in enumerate(seqs.sources) if r == row]
    tokens = {seqs.starts[b] + t for b in readers for t in range(seqs.lengths[b])}
    poisoned = seqs.clone()
    _poison_entry(poisoned, name, row, entry, value)
    counts = not bool(seqs.values(poisoned, [row]).isfinite().all())  # a filled entry
    runs = _runs(seqs, provider, lambda call: _poison_entry(call, name, row, entry, value))
    out, call = runs[provider]
    clean_out, clean_call = clean
    where = (f"{seqs.op} {provider}: {name}[{row}, {entry}] = {value} (read by sequences "
             f"{readers}, {'a filled entry' if counts else 'past the ring length'})")
    changed = {t for t in range(sum(seqs.lengths))
               if not torch.equal(seqs.token(out, t), seqs.token(clean_out, t))}
    assert changed <= (tokens if counts else set()), (where, "outputs changed", sorted(changed))
    dsts = [seqs.dst[b] for b in readers]
    rows = _changed_rows(seqs, call, clean_call) - {row, *dsts}
    assert not rows, (where, "another row changed", sorted(rows))
    everything = list(range(call[seqs.state].shape[0]))
    if not counts:  # every row's value as in the clean run
        assert torch.equal(_bits(seqs.values(call, everything)),
                           _bits(seqs.values(clean_call, everything))), (where, "a row's value")
    native_out, native_call = runs["native"]
    assert _nonfinite_tokens(seqs, out) == _nonfinite_tokens(seqs, native_out), where
    assert _finite_rows(seqs, call, dsts) == _finite_rows(seqs, native_call, dsts), where
    if readers:  # the property has teeth: a filled entry reaches the readers' rows
        assert counts == (not all(_finite_rows(seqs, native_call, dsts))), where


# explicit examples for Triton (the interpreter's time): a NaN x in the redirected row's ring
# (its entries move along), an inf step in the row that flushes, a -inf B past a ring's
# length, and a NaN in a row no sequence reads; as (row's reader or None, entry, value)
RING_EXAMPLES = [("ring_x", 0, 2, NAN), ("ring_dt", 1, 6, INF), ("ring_B", 2, 5, -INF),
                 ("ring_x", None, 0, NAN)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", sorted(RING_BUILDERS))
def test_a_poisoned_ring_entry_reaches_only_the_rows_and_outputs_that_read_it(op, provider):
    seqs = RING_BUILDERS[op](LENGTHS)
    clean_call = seqs.clone()
    clean = seqs.run(provider, clean_call), clean_call
    nslots = clean_call[seqs.state].shape[0]
    assert all(_finite_rows(seqs, clean_call, list(range(nslots))))
    unread = min(set(range(nslots)) - set(seqs.sources) - set(seqs.dst))
    rows = sorted(set(seqs.sources)) + [unread]
    ring = clean_call[seqs.ring[0]].shape[1]

    @settings(max_examples=25, deadline=None,
              phases=[Phase.explicit] if provider != "native" else list(Phase))
    @given(name=st.sampled_from(seqs.ring), row=st.sampled_from(rows),
           entry=st.integers(0, ring - 1), value=st.sampled_from([NAN, INF, -INF]))
    def poison(name, row, entry, value):
        _check_ring_poison(seqs, provider, clean, name, row, entry, value)

    for name, b, entry, value in RING_EXAMPLES:
        row = unread if b is None else seqs.sources[b]
        poison = example(name=name, row=row, entry=entry, value=value)(poison)
    poison()


# -- legal non-finite parameters ------------------------------------------------------------


def _legal_nonfinite(op: str, A_value: float) -> Seqs:
    """Head (or channel) 0 decays at rate ``A_value``; every third step is exactly 0: a raw
    step of 0 without softplus, or a negative one clamped by ``dt_limit = (0, inf)``
    (transformers' default ``time_step_limit``) where the op has it; in the replay ops' rings
    every third entry's step too."""
    ntok = sum(LENGTHS)
    steps = torch.rand(ntok, generator=torch.Generator().manual_seed(3)) + 0.05
    if op == "selective_scan":
        steps[::3] = 0.0
        dim = BUILDERS[op](LENGTHS).call["u"].shape[0]
        A = BUILDERS[op](LENGTHS).call["A"].clone()
        A[0] = A_value
        return BUILDERS[op](LENGTHS, delta=steps[:, None].repeat(1, dim).t(), A=A,
                            delta_softplus=False, delta_bias=torch.zeros(dim))
    steps[::3] = -1.0
    build = RING_BUILDERS.get(op) or BUILDERS[op]
    base = build(LENGTHS).call
    over = {}
    if "ring_dt" in base:
        over["ring_dt"] = base["ring_dt"].clone()
        over["ring_dt"][:, ::3] = 0.0
    if op == "mamba_chunk_scan":
        dt, A = steps[:, None].repeat(1, base["x"].shape[1]), base["A"].clone()
        A[0] = A_value
    else:  # the SSU and the replay ops: dt and A tied over headdim (and dstate)
        rates = base["A"][:, 0, 0].clone()
        rates[0] = A_value
        A = rates[:, None, None].expand(base["A"].shape)
        dt = None if "dt" not in base else steps[:base["dt"].shape[0], None, None].expand(
            base["dt"].shape)
    if dt is not None:
        over.update(dt=dt, dt_softplus=False, dt_bias=torch.zeros_like(base["dt_bias"]))
    return build(LENGTHS, A=A, **over)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["mamba_chunk_scan", "selective_state_update", "selective_scan",
                                "replay_state_update", "replay_materialize"])
def test_a_rate_of_minus_inf_and_steps_of_zero_give_the_recurrences_result(op, provider):
    """A = -inf clears the state at every step longer than 0; a step of exactly 0 keeps it
    (A * dt is 0 when dt is 0, whatever A): the result of A = -1e30, where IEEE arithmetic
    has no -inf * 0. Finite everywhere, and the same in every provider."""
    seqs = _legal_nonfinite(op, -INF)
    want = _legal_nonfinite(op, -1e30)
    out_want = want.run("native", want.call)
    out = seqs.run(provider, seqs.call)
    rows = list(range(seqs.call[seqs.state].shape[0]))
    values, values_want = seqs.values(seqs.call, rows), want.values(want.call, rows)
    assert bool(values_want.isfinite().all())
    assert bool(values.isfinite().all())
    if out is not None:
        assert bool(out_want.isfinite().all()) and bool(out.isfinite().all())
        torch.testing.assert_close(out, out_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, values_want, atol=1e-5, rtol=1e-5)


def test_a_step_of_zero_keeps_the_state_whatever_the_rate():
    """Native, by definition: with every step 0 and A = -inf the state rows are as they
    were and every output is C . h + D x from the unchanged state."""
    seqs = BUILDERS["mamba_chunk_scan"]([3], dt_softplus=False)
    call = seqs.call
    call["dt"].fill_(-1.0)  # clamped to 0 by dt_limit = (0, inf)
    call["dt_bias"].zero_()
    call["A"].fill_(-INF)
    before = call["state"].clone()
    get_op("mamba_chunk_scan").native(**call)
    torch.testing.assert_close(call["state"], before, atol=0, rtol=0)


# -- full size, compiled Triton kernels --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(BUILDERS))
def test_a_poisoned_token_full_size_gpu(op):
    """The poison property at Mamba2 size (bf16): sequences of several 256-token chunks and
    one of a single chunk; a NaN x after earlier tokens of its 64-token scan block, an inf
    x in the one-chunk sequence, a NaN step, and B, C, z."""
    seqs = BUILDERS[op]([700, 200, 1100], "cuda", full=True)
    clean_call = seqs.clone()
    clean = seqs.run("triton", clean_call), clean_call
    names = list(seqs.inputs)  # x (or u) first, then the step, B, C, z
    cases = [(0, 2, 517, NAN), (0, 1, 100, INF), (1, 0, 300, NAN), (2, 1, 40, INF),
             (3, 2, 1000, -INF), (4, 0, 3, NAN)]
    for which, b, offset, value in cases:
        if which < len(names):
            _check_poison(seqs, "triton", clean, names[which], b, offset, value, rtol=1e-2)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(RING_BUILDERS))
def test_a_poisoned_ring_entry_full_size_gpu(op):
    """The ring property at Mamba2 size (bf16 rows, rings of 16): the explicit examples."""
    seqs = RING_BUILDERS[op]([700, 200, 1100], "cuda", full=True)
    clean_call = seqs.clone()
    clean = seqs.run("triton", clean_call), clean_call
    nslots = clean_call[seqs.state].shape[0]
    unread = min(set(range(nslots)) - set(seqs.sources) - set(seqs.dst))
    for name, b, entry, value in RING_EXAMPLES:
        row = unread if b is None else seqs.sources[b]
        _check_ring_poison(seqs, "triton", clean, name, row, entry, value)
    torch.cuda.synchronize()
