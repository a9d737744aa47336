"""The lowering report as a person reads it: named graphs, what a copy was folded into, and
what residual copy remains (the sites are built by hand; tests/test_passes.py compiles)."""

from __future__ import annotations

from mamba_ir.cli import summarize_report
from mamba_ir.passes import LoweringReport, SiteReport

COPY, SSU, CONV = "copy_state_blocks", "selective_state_update", "causal_conv1d_fn"


def _graph(residual: bool) -> list[SiteReport]:
    """A copy fused into the op after it: folded away, or kept for empty sequences."""
    copy = SiteReport(0, "af_0", COPY, "triton" if residual else None, fused=True,
                      fused_with="af_1", fusion="fused: reads the copy's source rows")
    op = SiteReport(0, "af_1", CONV if residual else SSU, "triton",
                    skipped=(("flashinfer", "not importable"),), fused=True,
                    fused_with="af_0", fusion="fused: reads the copy's source rows")
    return [copy, op]


def test_graphs_take_the_function_name() -> None:
    report = LoweringReport(name="decode")
    report.add_graph(_graph(residual=False))
    report.add_graph([SiteReport(0, "af_0", SSU, "native")])
    assert [s.graph_name for s in report] == ["decode", "decode", "decode 1"]
    assert str(report).splitlines()[2] == "[decode 1] af_0: selective_state_update -> native"
    unnamed = LoweringReport()
    unnamed.add_graph([SiteReport(0, "n", SSU, "native")])
    assert str(unnamed) == "[graph 0] n: selective_state_update -> native"


def test_folded_copy_names_the_op_it_went_into() -> None:
    report = LoweringReport(name="prefill")
    report.add_graph(_graph(residual=False))
    copy, op = report
    assert copy.folded and copy.fused_with_op == SSU and not copy.residual
    assert str(copy) == ("[prefill] af_0: copy_state_blocks folded into selective_state_update "
                         "(af_1), which reads the copy's source rows")
    assert str(op) == ("[prefill] af_1: selective_state_update -> triton (skipped flashinfer: "
                       "not importable) [reads the source rows of copy_state_blocks (af_0), "
                       "which no longer runs]")


def test_residual_copy_says_what_remains() -> None:
    report = LoweringReport(name="prefill")
    report.add_graph(_graph(residual=True))
    copy, op = report
    assert copy.residual and op.residual and not copy.folded
    assert str(copy).endswith("copy_state_blocks -> triton [folded into causal_conv1d_fn (af_1); "
                              "this copy remains for the rows of empty sequences only]")
    assert str(op).endswith("which remains for empty sequences' rows only]")
    assert "kept for empty sequences' rows only" in "\n".join(summarize_report(report))


def test_kept_copy_shows_the_reason() -> None:
    report = LoweringReport(name="f")
    report.add_graph([SiteReport(0, "c", COPY, "native", fusion="kept: no op reads it")])
    assert str(report) == "[f] c: copy_state_blocks -> native [kept: no op reads it]"


def test_merged_report_prints_and_round_trips() -> None:
    prefill, decode = LoweringReport(name="prefill"), LoweringReport(name="decode")
    prefill.add_graph(_graph(residual=True))
    decode.add_graph([SiteReport(0, "af_0", SSU, "native")])
    merged = LoweringReport.merged([prefill, decode])
    assert len(merged) == 3 and merged.graphs == 2
    assert [line.split("]")[0] for line in str(merged).splitlines()] == [
        "[prefill", "[prefill", "[decode"]
    assert repr(merged).startswith("<LoweringReport: 3 call sites in 2 graphs>\n[prefill]")
    assert [SiteReport.from_dict(s.to_dict()) for s in merged] == list(merged)
    summary = summarize_report(merged)
    assert summary[0] == "  prefill:" and "  decode:" in summary
    assert str(LoweringReport()) == "no mamba_ir call sites compiled"
