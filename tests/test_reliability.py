"""No silent wrong answers: each test pins one way a call used to go wrong without an error.

Strided and column-sliced index tensors, mixed ties, padded index tensors, speculative
counts past this step's tokens, bad indices under compile, autograd, priority typos,
colliding provider names, and the lowering report of a cache hit at another batch size.
Triton runs through its interpreter on CPU: shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
from oracles import ORACLES

import mamba_ir
from mamba_ir import ENV_VAR, get_op, ops
from mamba_ir.testing import assert_matches_native

SSU = get_op("selective_state_update")
FN = get_op("causal_conv1d_fn")
UPDATE = get_op("causal_conv1d_update")
COPY = get_op("copy_state_blocks")
triton = pytest.importorskip("triton")


def _column(values: list[int], junk: int = 1 << 20) -> torch.Tensor:
    """``values`` as column 0 of a 2-D tensor (stride 2), the way vLLM slices them."""
    return torch.tensor([[v, junk] for v in values], dtype=torch.int32)[:, 0]


def _strided(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


def _ssu(nseq: int = 3, tokens: int | None = None, **over) -> dict:
    g = torch.Generator().manual_seed(0)
    lead = (nseq,) if tokens is None else (nseq, tokens)
    call = {
        "state": torch.randn(8, 2, 4, 8, generator=g),
        "x": torch.randn(*lead, 2, 4, generator=g),
        "dt": torch.rand(*lead, 2, 4, generator=g),
        "A": -torch.rand(2, 4, 8, generator=g),
        "B": torch.randn(*lead, 1, 8, generator=g),
        "C": torch.randn(*lead, 1, 8, generator=g),
        "D": torch.randn(2, 4, generator=g),
    }
    call.update(over)
    return SSU.bind(**call)


def _conv_update(**over) -> dict:
    g = torch.Generator().manual_seed(1)
    call = {
        "x": torch.randn(3, 6, generator=g),
        "conv_state": torch.randn(7, 6, 3, generator=g),
        "weight": torch.randn(6, 4, generator=g),
        "bias": torch.randn(6, generator=g),
    }
    call.update(over)
    return UPDATE.bind(**call)


def _conv_fn(lengths=(2, 3, 1), **over) -> dict:
    g = torch.Generator().manual_seed(2)
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    call = {
        "x": torch.randn(6, int(qsl[-1]), generator=g),
        "weight": torch.randn(6, 4, generator=g),
        "bias": torch.randn(6, generator=g),
        "conv_states": torch.randn(7, 6, 3, generator=g),
        "query_start_loc": qsl,
        "has_initial_state": torch.tensor([True, False, True][: len(lengths)]),
    }
    call.update(over)
    return FN.bind(**call)


# -- 1. Triton honours the strides of index tensors and of the conv bias ----------------------


def test_triton_conv_update_reads_a_column_of_2d_indices_and_a_strided_bias():
    call = _conv_update(
        conv_state_indices=_column([1, 3, 5]),
        src_conv_state_indices=_strided(torch.tensor([2, 3, 6], dtype=torch.int32)),
        bias=_strided(torch.randn(6)),
    )
    assert_matches_native(UPDATE, "triton", call)


def test_triton_conv_update_strided_query_start_loc_and_offsets():
    x = torch.randn(5, 6)
    call = _conv_update(
        x=x, conv_state=torch.randn(7, 6, 5),
        query_start_loc=_strided(torch.tensor([0, 2, 2, 5], dtype=torch.int32)),
        conv_state_indices=_column([4, 0, 2]),
        src_token_offset=_strided(torch.tensor([1, 0, 2], dtype=torch.int32)),
        bias=torch.randn(1).expand(6),
    )
    assert_matches_native(UPDATE, "triton", call)


def test_triton_conv_fn_strided_indices_flags_offsets_and_bias():
    call = _conv_fn(
        cache_indices=_column([1, 3, 5]),
        src_cache_indices=_strided(torch.tensor([0, 3, 6], dtype=torch.int32)),
        has_initial_state=_strided(torch.tensor([True, False, True])),
        query_start_loc=_strided(torch.tensor([0, 2, 5, 6], dtype=torch.int32)),
        bias=_strided(torch.randn(6)),
    )
    assert_matches_native(FN, "triton", call)


def test_triton_ssu_strided_cu_seqlens_and_accepted_counts():
    nseq, cols = 3, 3
    call = _ssu(
        x=torch.randn(5, 2, 4), dt=torch.rand(5, 2, 4), B=torch.randn(5, 1, 8),
        C=torch.randn(5, 1, 8),
        cu_seqlens=_strided(torch.tensor([0, 2, 2, 5], dtype=torch.int32)),
        num_accepted_tokens=_strided(torch.tensor([2, 1, 3], dtype=torch.int32)),
        state_batch_indices=torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, -1]],
                                         dtype=torch.int32)[:, :cols],
    )
    assert call["state_batch_indices"].shape == (nseq, cols)
    assert_matches_native(SSU, "triton", call)


# -- 2. dt tied over headdim, dt_bias not ------------------------------------------------------


def test_triton_ssu_dt_tied_bias_not():
    call = _ssu(
        dt=torch.rand(3, 2, 1).expand(3, 2, 4), A=-torch.rand(2, 1, 1).expand(2, 4, 8),
        dt_bias=torch.randn(2, 4), dt_softplus=True, state_batch_indices=torch.tensor([4, 0, 6]),
    )
    assert_matches_native(SSU, "triton", call)


# -- 3. bad indices under compile ------------------------------------------------------------


@pytest.mark.parametrize("provider", ["native", "triton"])
def test_unchecked_bad_indices_never_touch_memory_beside_the_state(provider):
    """What a compiled call runs (no value checks): a negative, a too-large and a pad
    index. The state is layer 0 of a two-layer cache; layer 1 must not change, nor any
    row but the one valid destination."""
    cache = torch.randn(2, 8, 2, 4, 8)
    layer1 = cache[1].clone()
    before = cache[0].clone()
    call = _ssu(state=cache[0], state_batch_indices=torch.tensor([-2, 8, 3]))
    call["out"] = torch.empty_like(call["x"])
    SSU.impls[provider].fn(**call)
    assert torch.equal(cache[1], layer1)
    changed = [r for r in range(8) if not torch.equal(cache[0, r], before[r])]
    assert changed == [3]

    conv = torch.randn(2, 7, 6, 3)
    conv1 = conv[1].clone()
    for op, call in (
        (UPDATE, _conv_update(conv_state=conv[0], conv_state_indices=torch.tensor([-2, 7, 100]))),
        (FN, _conv_fn(conv_states=conv[0], cache_indices=torch.tensor([-3, 7, 9]))),
    ):
        before = conv[0].clone()
        op.impls[provider].fn(**call)
        assert torch.equal(conv[0], before) and torch.equal(conv[1], conv1), op.name
    state = torch.randn(2, 5, 3)
    before = state.clone()
    COPY.impls[provider].fn(state[0], torch.tensor([-2, 1]), torch.tensor([0, 9]), -1)
    assert torch.equal(state, before)



@pytest.mark.parametrize("provider", ["native", "triton"])
def test_unchecked_bad_rows_of_the_chunk_scan_never_touch_memory_beside_the_state(provider):
    """The chunk scan's source, destination and checkpoint rows, unchecked: a negative and a
    too-large row are skipped like pads; the other layer of the cache and every row but the
    valid destinations stay as they were."""
    torch.manual_seed(0)
    cache = torch.randn(2, 6, 2, 4, 8)
    layer1, before = cache[1].clone(), cache[0].clone()
    tokens, nseq = 50, 3  # sequences of 20, 10 and 20 tokens; checkpoints at 16
    call = get_op("mamba_chunk_scan").bind(
        state=cache[0], x=torch.randn(tokens, 2, 4), dt=torch.rand(tokens, 2),
        A=-torch.rand(2), B=torch.randn(tokens, 1, 8), C=torch.randn(tokens, 1, 8),
        chunk_size=16, cu_seqlens=torch.tensor([0, 20, 30, tokens], dtype=torch.int32),
        state_batch_indices=torch.tensor([-2, 6, 1]),
        dst_state_batch_indices=torch.tensor([9, -3, 2]),
        block_size=16, num_computed_tokens=torch.zeros(nseq, dtype=torch.int32),
        checkpoint_state_indices=torch.tensor([[4, -1], [-5, -1], [7, -1]]),
        out=torch.empty(tokens, 2, 4),
    )
    get_op("mamba_chunk_scan").impls[provider].fn(**call)
    assert torch.equal(cache[1], layer1)
    changed = [r for r in range(6) if not torch.equal(cache[0, r], before[r])]
    assert changed == [2, 4]

def _ssu_step(S, idx, x, dt, A, B, C):
    return ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=idx)


def test_checked_mode_asserts_index_rules_before_anything_is_written():
    t = _ssu()
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    checked = mamba_ir.compile(_ssu_step, validate=True, dynamic=False)
    plain = mamba_ir.compile(_ssu_step, dynamic=False)
    S = t["state"].clone()
    want = _ssu_step(S.clone(), torch.tensor([0, 1, 2]), *args)
    torch.testing.assert_close(checked(S, torch.tensor([0, 1, 2]), *args), want)
    for bad, words in (([0, 1, -2], "rows in [0, 8)"), ([0, 1, 1], "distinct destination")):
        before = S.clone()
        with pytest.raises(RuntimeError, match=r"state_batch_indices: expected .*" + words[:6]):
            checked(S, torch.tensor(bad), *args)
        assert torch.equal(S, before)
    plain(S, torch.tensor([0, 1, -2]), *args)  # unchecked: no error, and row 6 is not row -2
    assert torch.equal(S[6], before[6])


class _Mixer(torch.nn.Module):
    """One layer's decode step with its align-mode copy, called as a module (a named site)."""

    def forward(self, S, src, dst, x, dt, A, B, C):
        ops.copy_state_blocks(S, src, dst)
        return ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=dst)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = _Mixer()

    def forward(self, *args):
        return self.mixer(*args)


FOLDED = "(at mixer: selective_state_update, copy_state_blocks folded in by align fusion)"


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ([0, 9, 1], [4, 5, 6], "src of copy_state_blocks (its dst where src is the pad): "
                               f"expected rows in [0, 8) or pad_slot_id=-1 {FOLDED}"),
        ([0, 1, 2], [4, 5, 5], "dst of copy_state_blocks, given to selective_state_update as "
                               f"state_batch_indices: expected distinct destination rows {FOLDED}"),
        ([5, 1, 2], [4, 5, 6], "src of copy_state_blocks (its dst where src is the pad): "
                               f"expected no source row that another entry writes {FOLDED}"),
    ],
)
def test_checked_mode_names_the_arguments_the_user_passed(src, dst, message):
    """Align fusion feeds the op indices it built from the copy's src and dst: a failed
    check names those (the user's arguments) and the site, not the op's rewritten ones."""
    t = _ssu()
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    checked = mamba_ir.compile(_Model(), validate=True, dynamic=False)
    S = t["state"].clone()
    checked(S, torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6]), *args)
    copy, ssu = checked.lowering_report
    assert copy.folded and ssu.fused and ssu.site == "mixer: selective_state_update"
    before = S.clone()
    with pytest.raises(RuntimeError) as info:
        checked(S, torch.tensor(src), torch.tensor(dst), *args)
    assert str(info.value) == message
    assert torch.equal(S, before)


def test_checked_messages_fit_the_cuda_assertion():
    """torch's CUDA assertion refuses messages of 255 characters or more, even when the
    check passes: a long site name is cut short."""
    with mamba_ir.checks.naming({"src": "s" * 300}, "at here"):
        with pytest.raises(RuntimeError) as info:
            mamba_ir.checks.assert_rows_in_range("src", torch.tensor([9]), 8, -1)
    assert len(str(info.value)) == mamba_ir.checks.MAX_MESSAGE
    assert str(info.value).startswith("sss") and str(info.value).endswith("...")


@pytest.mark.parametrize("name", ["causal_conv1d_update", "causal_conv1d_fn", "copy_state_blocks"])
def test_device_checks_of_the_other_ops(name):
    op = get_op(name)
    good, bad, words = {
        "causal_conv1d_update": (
            _conv_update(conv_state_indices=torch.tensor([1, 2, 3])),
            _conv_update(conv_state_indices=torch.tensor([1, 2, 2])), "distinct",
        ),
        "causal_conv1d_fn": (
            _conv_fn(cache_indices=torch.tensor([1, 2, 3])),
            _conv_fn(cache_indices=torch.tensor([1, 2, 3]), src_cache_indices=torch.tensor(
                [2, 2, 3])), "another entry writes",
        ),
        "copy_state_blocks": (
            COPY.bind(torch.randn(4, 3), torch.tensor([0, 1]), torch.tensor([2, 3])),
            COPY.bind(torch.randn(4, 3), torch.tensor([0, 1]), torch.tensor([2, 4])), "rows in",
        ),
    }[name]
    op.device_check(good)
    with pytest.raises(RuntimeError, match=words):
        op.device_check(bad)


def test_device_checks_agree_with_eager_checks_on_drawn_calls():
    """Every valid drawn call passes the device checks (they must not refuse good input)."""
    from hypothesis import given, settings

    from mamba_ir.testing import calls

    def passes(op):
        @settings(max_examples=40, deadline=None)
        @given(calls(op.name))
        def run(call):
            call = op.bind(**call)
            op.check(call)
            op.device_check(call)

        run()

    for name in ("selective_state_update", "causal_conv1d_update", "causal_conv1d_fn",
                 "copy_state_blocks"):
        passes(get_op(name))


# -- 5. the lowering report of a cache hit at another batch size ------------------------------


@pytest.mark.parametrize("aot_key", [True, False], ids=["aot-key", "torch-without-aot-key"])
def test_report_of_a_cache_hit_at_another_batch_size(aot_key, monkeypatch):
    import torch._inductor.compile_fx as compile_fx
    from torch._inductor.utils import fresh_inductor_cache

    if not aot_key:  # as on torch 2.11: the report is keyed on the graph and its symbols
        monkeypatch.delattr(compile_fx, "autograd_cache_key", raising=False)

    def inputs(b):
        t = _ssu(nseq=b)
        return (t["state"], torch.arange(b), t["x"], t["dt"], t["A"], t["B"], t["C"])

    torch._dynamo.reset()  # nothing compiled earlier in the process may serve the first call
    with fresh_inductor_cache():
        first = mamba_ir.compile(_ssu_step, dynamic=True)
        first(*inputs(3))
        torch._dynamo.reset()
        second = mamba_ir.compile(_ssu_step, dynamic=True)
        second(*inputs(5))
    assert second.lowering_report.cached == [0]
    assert [s.op for s in second.lowering_report] == ["selective_state_update"]


# -- 6. provider op names are unique ---------------------------------------------------------


def test_providers_whose_names_collide_in_op_names_are_refused():
    COPY.register_impl("my-kern", COPY.native, platforms=("cpu",))
    try:
        with pytest.raises(ValueError, match="'my_kern'.*'my-kern'"):
            COPY.register_impl("my_kern", COPY.native, platforms=("cpu",))
        assert "my_kern" not in COPY.impls
    finally:
        del COPY.impls["my-kern"]


# -- 7. clear errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: _ssu(B=torch.randn(3, 0, 8), C=torch.randn(3, 0, 8)), "B"),
        (lambda: _ssu(state_batch_indices=torch.zeros(3, 0, dtype=torch.int32)),
         "state_batch_indices"),
        (lambda: _ssu(x=[[1.0]]), "x"),
        (lambda: _ssu(dt_limit=(1.0, 0.5)), "dt_limit"),
        (lambda: _ssu(dt_limit=(0.0, 1.0, 2.0)), "dt_limit"),
    ],
    ids=["zero-groups", "zero-columns", "not-a-tensor", "limit-order", "limit-length"],
)
def test_bad_input_is_a_value_error_naming_the_argument(make, argument):
    call = make()
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        SSU(**call)


def test_triton_refuses_dstate_0_and_native_serves_it():
    call = _ssu(state=torch.randn(8, 2, 4, 0), A=-torch.rand(2, 4, 0), B=torch.randn(3, 1, 0),
                C=torch.randn(3, 1, 0))
    assert "dstate=0" in SSU.impls["triton"].refusal(call)
    with mamba_ir.set_priority({"selective_state_update": ["triton"]}):
        out = SSU(**call)
    torch.testing.assert_close(out, call["D"] * call["x"])


@pytest.mark.parametrize("name", ["selective_state_update", "causal_conv1d_update",
                                  "causal_conv1d_fn", "copy_state_blocks"])
def test_every_op_refuses_autograd(name):
    call = {
        "selective_state_update": _ssu,
        "causal_conv1d_update": _conv_update,
        "causal_conv1d_fn": _conv_fn,
        "copy_state_blocks": lambda: COPY.bind(torch.randn(4, 3), torch.tensor([0]),
                                               torch.tensor([1])),
    }[name]()
    arg = "x" if "x" in call else "state"
    call[arg] = call[arg].clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"^{arg}: expected .*requires_grad.*inference"):
        get_op(name)(**call)
    with torch.no_grad():
        get_op(name)(**call)


# -- 8. priority typos -------------------------------------------------------------------------


def test_priority_names_are_checked_where_they_enter(monkeypatch):
    with pytest.raises(ValueError, match=r"set_priority: entry .*'trtion'.*registered: .*triton"):
        with mamba_ir.set_priority({"selective_state_update": ["trtion"]}):
            pass
    with pytest.raises(ValueError, match=r"names op 'selective_state_updat'.*declared: "):
        with mamba_ir.set_priority("selective_state_updat=triton"):
            pass
    monkeypatch.setenv(ENV_VAR, "selective_state_update:triton")
    with pytest.raises(ValueError, match=rf"^{ENV_VAR}: .*op=provider"):
        SSU(**_ssu())
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="'nosuch'"):
        mamba_ir.compile(_ssu_step, priority=["nosuch"])


# -- 9. num_accepted_tokens as vLLM counts it ---------------------------------------------------


def _spec_call() -> dict:
    """Two tokens this step; the previous step accepted up to 4, so the source column is
    up to 3: past this step's tokens, inside the index tensor's columns."""
    return _ssu(
        nseq=2, tokens=2,
        state_batch_indices=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32),
        num_accepted_tokens=torch.tensor([3, 4], dtype=torch.int32),
    )


def test_accepted_count_may_exceed_this_steps_tokens():
    call = _spec_call()
    want_state, want_out = ORACLES["selective_state_update"](call)
    out = SSU(**call)
    torch.testing.assert_close(out.double(), want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(call["state"].double(), want_state, atol=1e-4, rtol=1e-4)
    assert_matches_native(SSU, "triton", _spec_call())
    bad = _spec_call()
    bad["num_accepted_tokens"] = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^num_accepted_tokens: expected values in \[0, 4\]"):
        SSU(**bad)


# -- 10. index tensors longer than the sequences -----------------------------------------------


def test_conv_fn_with_13_cache_indices_for_8_sequences():
    lengths = [2, 1, 3, 1, 2, 1, 1, 2]
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    idx = torch.tensor([3, 1, 8, 5, 0, 9, 2, 7, -1, -1, -1, -1, -1], dtype=torch.int32)
    flags = torch.tensor([True, False] * 6 + [False])
    make = lambda: _conv_fn(lengths=lengths, conv_states=torch.randn(10, 6, 3),  # noqa: E731
                            x=torch.randn(6, int(qsl[-1])), query_start_loc=qsl,
                            cache_indices=idx, has_initial_state=flags)
    torch.manual_seed(0)
    padded = make()
    torch.manual_seed(0)
    exact = make()
    exact["cache_indices"], exact["has_initial_state"] = idx[:8], flags[:8]
    torch.testing.assert_close(FN(**padded), FN(**exact))
    torch.testing.assert_close(padded["conv_states"], exact["conv_states"])
    torch.manual_seed(0)
    assert_matches_native(FN, "triton", make())


def test_padded_indices_for_the_decode_ops():
    junk = torch.tensor([1 << 20, -5], dtype=torch.int32)
    call = _ssu(state_batch_indices=torch.cat([torch.tensor([2, 0, 5], dtype=torch.int32), junk]))
    SSU.check(call)
    assert_matches_native(SSU, "triton", call)
    call = _conv_update(conv_state_indices=torch.cat([torch.tensor([6, 0, 2]), junk.long()]))
    UPDATE.check(call)
    assert_matches_native(UPDATE, "triton", call)
    with pytest.raises(ValueError, match="at least 3 rows"):
        SSU(**_ssu(state_batch_indices=torch.tensor([1, 2])))


# -- on a GPU: the same, compiled Triton kernels and CUDA graphs ------------------------------


@pytest.mark.gpu
def test_gpu_unchecked_bad_indices_never_touch_memory_beside_the_state():
    cache = torch.randn(2, 8, 2, 4, 8, device="cuda")
    before = cache.clone()
    call = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _ssu().items()}
    call["state"] = cache[0]
    call["state_batch_indices"] = torch.tensor([-2, 8, 3], device="cuda")
    call["out"] = torch.empty_like(call["x"])
    SSU.impls["triton"].fn(**call)
    conv = torch.randn(2, 7, 6, 3, device="cuda")
    conv_before = conv.clone()
    up = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _conv_update().items()}
    UPDATE.impls["triton"].fn(**{**up, "conv_state": conv[0],
                                 "conv_state_indices": torch.tensor([-2, 7, 100], device="cuda")})
    torch.cuda.synchronize()
    assert torch.equal(cache[1], before[1]) and torch.equal(conv, conv_before)
    changed = [r for r in range(8) if not torch.equal(cache[0, r], before[0, r])]
    assert changed == [3]


@pytest.mark.gpu
def test_gpu_checked_mode_runs_in_cuda_graphs():
    """The device-side checks take no host sync: a checked step compiles with CUDA graphs
    (reduce-overhead) and gives the plain step's results."""
    t = {k: v.cuda() for k, v in _ssu().items() if isinstance(v, torch.Tensor)}
    args = (torch.tensor([0, 1, 2], device="cuda"), t["x"], t["dt"], t["A"], t["B"], t["C"])
    checked = mamba_ir.compile(_ssu_step, validate=True, mode="reduce-overhead")
    plain = mamba_ir.compile(_ssu_step)
    for _ in range(3):  # warm-up, record, replay
        S1, S2 = t["state"].clone(), t["state"].clone()
        y1, y2 = checked(S1, *args).clone(), plain(S2, *args)
        torch.testing.assert_close(y1, y2)
        torch.testing.assert_close(S1, S2)


def test_chunk_scan_refuses_growing_decays_eagerly_and_on_the_device():
    """A chunked scan factors decays through a chunk's tokens; A > 0 is refused by name
    (eagerly before anything is written, and by the checked mode's device assert)."""
    op = get_op("mamba_chunk_scan")
    call = op.bind(**op.example(torch.device("cpu"), torch.float32))
    op.check(call)
    op.device_check(call)
    A = call["A"].clone()
    A[1] = 0.25
    bad = {**call, "A": A}
    before = call["state"].clone()
    with pytest.raises(ValueError, match=r"^A: expected decay rates <= 0 .*got 0\.25"):
        mamba_ir.ops.mamba_chunk_scan(**bad)
    assert torch.equal(call["state"], before)
    with pytest.raises(RuntimeError, match="A: expected decay rates <= 0"):
        op.device_check(bad)


@pytest.mark.parametrize(("name", "state", "indices"), [
    ("selective_state_update", "state", "state_batch_indices"),
    ("mamba_chunk_scan", "state", "state_batch_indices"),
    ("selective_scan", "ssm_states", "cache_indices"),
    ("causal_conv1d_fn", "conv_states", "cache_indices"),
    ("causal_conv1d_update", "conv_state", "conv_state_indices"),
])
def test_without_indices_every_entry_needs_its_own_row(name, state, indices):
    """With no row indices, entry i uses row i: a state of fewer rows than entries is
    refused by name before anything is written (four entries, three rows)."""
    op = get_op(name)
    call = op.bind(**op.example(torch.device("cpu"), torch.float32))
    op.check({**call, indices: None})
    short = {**call, indices: None, state: call[state][:3]}
    before = short[state].clone()
    with pytest.raises(ValueError, match=rf"^{state}: expected at least 4 rows .*no {indices}"):
        getattr(mamba_ir.ops, name)(**short)
    assert torch.equal(short[state], before)
