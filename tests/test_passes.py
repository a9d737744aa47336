"""Inductor passes on CPU: lowering to the chosen provider, align fusion, report, caching,
dynamic batch. Shapes are small; every compile is counted (each costs seconds on CI)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters

import mamba_ir
from mamba_ir import get_op, ops
from mamba_ir.passes import LoweringReport, compile, use_passes

SSU = get_op("selective_state_update")
PAD = -1
NSLOT, NHEADS, NGROUPS, HEADDIM, DSTATE, DIM, WIDTH = 12, 2, 2, 4, 16, 6, 4


# -- test providers ----------------------------------------------------------------------


@dataclass
class Calls:
    n: int = 0


def _register(name: str, supports) -> Calls:
    calls = Calls()

    def impl(**call):
        calls.n += 1
        return SSU.native(**call)

    SSU.register_impl(name, impl, supports=supports, platforms=("cpu",))
    return calls


def _narrow(**call) -> bool | str:
    state = call["state"]
    if state.dtype != torch.float32 or state.shape[-1] != 16:
        return f"narrow: fp32 state with dstate 16 only (got {state.dtype}, {state.shape[-1]})"
    return True


def _no_redirect(**call) -> bool | str:
    if call["dst_state_batch_indices"] is not None:
        return "no src redirect"
    return True


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Tests compile the same functions with different setups: start each from scratch."""
    torch._dynamo.reset()


@pytest.fixture
def providers() -> Iterator[dict[str, Calls]]:
    """Two providers: 'narrow' (fp32, dstate 16) and 'plain' (no src redirect)."""
    added = {"narrow": _register("narrow", _narrow), "plain": _register("plain", _no_redirect)}
    yield added
    for name in added:
        del SSU.impls[name]


# -- inputs ------------------------------------------------------------------------------


def _rows(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy pairs for ``b`` sequences: destinations 0..b-1, sources above them; one pad
    source (no copy) and one pad destination when there are enough sequences."""
    dst = torch.arange(b)
    src = torch.arange(b) + NSLOT // 2
    if b > 2:
        src[1] = PAD
        dst[2] = PAD
    return src, dst


def _ssu_inputs(b: int, dstate: int = DSTATE, slots: int = NSLOT, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        S=r(slots, NHEADS, HEADDIM, dstate),
        x=r(b, NHEADS, HEADDIM),
        dt=r(b, NHEADS, HEADDIM),
        A=-torch.rand(NHEADS, HEADDIM, dstate, generator=g),
        B=r(b, NGROUPS, dstate),
        C=r(b, NGROUPS, dstate),
    )


def _clone(tree: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tree.items()}


def _assert_same(got: dict, want: dict) -> None:
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def _sites(report: LoweringReport) -> list[tuple[str, str | None, bool]]:
    return [(s.op, s.provider, s.fused) for s in report]


# -- graphs ------------------------------------------------------------------------------


def copy_then_ssu(S, src, dst, x, dt, A, B, C):
    ops.copy_state_blocks(S, src, dst)
    return ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=dst) * 2


def copy_read_then_ssu(S, src, dst, x, dt, A, B, C):
    ops.copy_state_blocks(S, src, dst)
    seen = S[dst.clamp(min=0), :, :, 0].clone()  # reads the copied rows before the op
    return ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=dst), seen


def decode_and_prefill(t: dict) -> dict:
    """All four ops: a decode step (copy + conv update, copy + SSU) and a varlen prefill
    conv (copy + conv fn, one empty sequence)."""
    ops.copy_state_blocks(t["conv"], t["src"], t["dst"])
    xc = ops.causal_conv1d_update(t["xc"], t["conv"], t["w"], t["bias"],
                                  conv_state_indices=t["dst"])
    ops.copy_state_blocks(t["S"], t["src"], t["dst"])
    y = ops.selective_state_update(t["S"], t["x"], t["dt"], t["A"], t["B"], t["C"],
                                   state_batch_indices=t["dst"])
    ops.copy_state_blocks(t["conv_p"], t["src_p"], t["dst_p"])
    yp = ops.causal_conv1d_fn(t["xp"], t["w"], t["bias"], t["conv_p"], t["qsl"],
                              cache_indices=t["dst_p"], has_initial_state=t["init"])
    return {"xc": xc, "y": y, "yp": yp, "S": t["S"], "conv": t["conv"], "conv_p": t["conv_p"]}


def _all_inputs(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    t = _ssu_inputs(b)
    src, dst = _rows(b)
    t.update(
        src=src, dst=dst,
        conv=torch.randn(NSLOT, NHEADS * HEADDIM, WIDTH - 1, generator=g),
        xc=torch.randn(b, NHEADS * HEADDIM, generator=g),
        w=torch.randn(NHEADS * HEADDIM, WIDTH, generator=g),
        bias=torch.randn(NHEADS * HEADDIM, generator=g),
        conv_p=torch.randn(NSLOT, NHEADS * HEADDIM, WIDTH - 1, generator=g),
        xp=torch.randn(NHEADS * HEADDIM, 7, generator=g),
        qsl=torch.tensor([0, 3, 3, 7]),  # the middle sequence is empty
        src_p=torch.tensor([8, 9, PAD]),
        dst_p=torch.tensor([1, 2, 3]),
        init=torch.tensor([True, True, False]),
    )
    return t


# -- tests -------------------------------------------------------------------------------


def test_four_ops_match_eager_and_report_every_site():
    t = _all_inputs()
    want = decode_and_prefill(_clone(t))
    compiled = compile(decode_and_prefill, fullgraph=True)
    got = compiled(_clone(t))
    _assert_same(got, want)

    report = compiled.lowering_report
    assert [s.op for s in report] == [
        "copy_state_blocks", "causal_conv1d_update", "copy_state_blocks",
        "selective_state_update", "copy_state_blocks", "causal_conv1d_fn",
    ]
    # decode copies fold away; the varlen prefill keeps its copy for the empty sequence
    assert _sites(report) == [
        ("copy_state_blocks", None, True), ("causal_conv1d_update", "native", True),
        ("copy_state_blocks", None, True), ("selective_state_update", "native", True),
        ("copy_state_blocks", "native", True), ("causal_conv1d_fn", "native", True),
    ]
    assert "empty sequences" in report.sites[-1].fusion
    # a plain function has no module: its sites are the ops, numbered where one repeats
    assert [s.site for s in report] == [
        "copy_state_blocks#1", "causal_conv1d_update", "copy_state_blocks#2",
        "selective_state_update", "copy_state_blocks#3", "causal_conv1d_fn",
    ]
    assert [s.module for s in report] == [""] * 6
    assert report.sites[0].fused_with == report.sites[1].site
    assert str(report.sites[0]) == (
        "[decode_and_prefill] copy_state_blocks#1 folded into causal_conv1d_update, which "
        "reads the copy's source rows")


def test_lowering_picks_narrow_provider_exactly_where_it_applies(providers):
    def two_layers(S16, S8, x, dt, A16, A8, B16, C16, B8, C8, idx):
        y16 = ops.selective_state_update(S16, x, dt, A16, B16, C16, state_batch_indices=idx)
        y8 = ops.selective_state_update(S8, x, dt, A8, B8, C8, state_batch_indices=idx)
        return y16 + y8

    a, b = _ssu_inputs(3, dstate=16), _ssu_inputs(3, dstate=8, seed=1)
    args = (a["S"], b["S"], a["x"], a["dt"], a["A"], b["A"], a["B"], a["C"], b["B"], b["C"],
            torch.tensor([4, 0, 7]))
    want = two_layers(*(x.clone() for x in args))
    compiled = compile(two_layers, priority={"selective_state_update": ["narrow"]})
    calls_before = providers["narrow"].n
    got = compiled(*(x.clone() for x in args))
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    first, second = compiled.lowering_report
    assert (first.provider, first.skipped) == ("narrow", ())
    assert second.provider == "native"
    assert second.skipped[0][0] == "narrow" and "dstate 16" in second.skipped[0][1]
    assert providers["narrow"].n == calls_before + 1  # called directly, once


@pytest.mark.parametrize("provider, fused", [("narrow", True), ("plain", False)])
def test_fusion_follows_the_chosen_providers_redirect_support(providers, provider, fused):
    b = 5
    t = _ssu_inputs(b)
    src, dst = _rows(b)
    args = (t["S"], src, dst, t["x"], t["dt"], t["A"], t["B"], t["C"])
    want_state = t["S"].clone()
    want = copy_then_ssu(want_state, *args[1:])

    compiled = compile(copy_then_ssu, priority={"selective_state_update": [provider]})
    state = t["S"].clone()
    result, code = _run_and_get_code(compiled, state, *args[1:])
    torch.testing.assert_close(result, want, rtol=0, atol=0)
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)

    copy, ssu = compiled.lowering_report
    assert ssu.provider == provider and ssu.fused is fused and copy.fused is fused
    assert (copy.provider is None) is fused
    if not fused:
        assert "refuses redirect: no src redirect" in copy.fusion
    # no dispatch left: only provider ops are called, and the state is updated in place
    assert "torch.ops.mamba_ir." not in code
    assert f"mamba_ir_impl.selective_state_update__{provider}" in code
    assert ("copy_state_blocks__native" in code) is not fused
    assert "clone" not in code


def test_intervening_read_forbids_fusion(providers):
    b = 4
    t = _ssu_inputs(b)
    src, dst = _rows(b)
    args = (src, dst, t["x"], t["dt"], t["A"], t["B"], t["C"])
    want_state = t["S"].clone()
    want = copy_read_then_ssu(want_state, *args)

    compiled = compile(copy_read_then_ssu, priority={"selective_state_update": ["narrow"]})
    state = t["S"].clone()
    got = compiled(state, *args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)
    copy, ssu = compiled.lowering_report
    assert not copy.fused and not ssu.fused
    assert copy.provider == "native" and "used by several nodes" in copy.fusion


def test_fusion_needs_whole_rows_and_casts_mixed_index_dtypes():
    """A conv state wider than width-1 keeps its copy (the copy's extra column would be
    lost); int32 sources with int64 destinations still fuse."""

    def step(conv, S, src, dst, xc, w, x, dt, A, B, C):
        ops.copy_state_blocks(conv, src, dst)
        yc = ops.causal_conv1d_update(xc, conv, w, None, conv_state_indices=dst)
        ops.copy_state_blocks(S, src, dst)
        return yc, ops.selective_state_update(S, x, dt, A, B, C, state_batch_indices=dst)

    b = 4
    t = _ssu_inputs(b)
    src, dst = _rows(b)
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(NSLOT, DIM, WIDTH, generator=g), t["S"], src.int(), dst,
            torch.randn(b, DIM, generator=g), torch.randn(DIM, WIDTH, generator=g),
            t["x"], t["dt"], t["A"], t["B"], t["C"]]
    want_args = [a.clone() for a in args]
    want = step(*want_args)
    compiled = compile(step)
    got = compiled(*args)
    for a, b_ in zip((*got, args[0], args[1]), (*want, want_args[0], want_args[1]), strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    report = compiled.lowering_report
    assert _sites(report) == [
        ("copy_state_blocks", "native", False), ("causal_conv1d_update", "native", False),
        ("copy_state_blocks", None, True), ("selective_state_update", "native", True),
    ]
    assert "conv state holds 4 columns" in report.sites[0].fusion


def test_batch_sizes_1_to_64_compile_once():
    """One dynamic graph serves every batch size (with size-1 dims not specialized, the
    setting vLLM uses for the same purpose); by default batch 1 gets its own graph."""
    t = _ssu_inputs(64, slots=130)

    def run_all(compiled, state):
        for b in range(1, 65):
            src = torch.arange(b) + 65
            dst = torch.arange(b)
            got = compiled(state, src, dst, t["x"][:b], t["dt"][:b], t["A"], t["B"][:b],
                           t["C"][:b])
            assert got.shape[0] == b

    import torch.fx.experimental._config as fx_config

    counters.clear()
    with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
        compiled = compile(copy_then_ssu, dynamic=True)
        run_all(compiled, t["S"].clone())
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.lowering_report.graphs == 1

    counters.clear()
    compiled = compile(copy_then_ssu)
    run_all(compiled, t["S"].clone())
    assert counters["stats"]["unique_graphs"] == 2  # batch 1, then every other size
    assert compiled.lowering_report.graphs == 2


def test_auto_functionalized_v1_and_use_passes(providers):
    from torch._inductor import config

    b = 4
    t = _ssu_inputs(b)
    src, dst = _rows(b)
    args = (src, dst, t["x"], t["dt"], t["A"], t["B"], t["C"])
    want_state = t["S"].clone()
    want = copy_then_ssu(want_state, *args)

    from torch._inductor.utils import fresh_inductor_cache

    # use_passes reports only graphs it compiles: a warm FX graph cache would serve this one
    with fresh_inductor_cache(), config.patch(enable_auto_functionalized_v2=False), use_passes(
        {"selective_state_update": ["narrow"]}
    ) as report:
        state = t["S"].clone()
        got = torch.compile(copy_then_ssu)(state, *args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)
    assert _sites(report) == [("copy_state_blocks", None, True),
                              ("selective_state_update", "narrow", True)]


def test_report_survives_the_fx_graph_cache():
    from torch._inductor.utils import fresh_inductor_cache

    b = 3
    t = _ssu_inputs(b)
    src, dst = _rows(b)
    args = (src, dst, t["x"], t["dt"], t["A"], t["B"], t["C"])
    with fresh_inductor_cache():
        first = compile(copy_then_ssu)
        first(t["S"].clone(), *args)
        torch._dynamo.reset()
        counters.clear()
        second = compile(copy_then_ssu)
        second(t["S"].clone(), *args)
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"][
            "autograd_cache_hit"]
    assert hits >= 1 and second.lowering_report.cached == [0]
    assert _sites(second.lowering_report) == _sites(first.lowering_report)


def _run_and_get_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    result, codes = run_and_get_code(fn, *args)
    return result, "\n".join(codes)


def test_mamba_ir_compile_is_the_passes_entry_point():
    assert mamba_ir.compile is compile
