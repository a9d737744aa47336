"""The lowering report as a person reads it: sites named by module path, named graphs, what
a copy was folded into, what residual copy remains, and the grouped summary (the sites are
built by hand here; tests/test_passes.py and tests/test_model.py compile)."""

from __future__ import annotations

from mamba_ir.passes import LoweringReport, SiteReport

COPY, SSU, CONV = "copy_state_blocks", "selective_state_update", "causal_conv1d_fn"
MIXER = "model.layers.3.mixer"


def _graph(residual: bool) -> list[SiteReport]:
    """A copy fused into the op after it, in one mixer: folded away, or kept for empty
    sequences."""
    op = CONV if residual else SSU
    copy = SiteReport(0, "af_0", COPY, "triton" if residual else None, fused=True,
                      fused_with=f"{MIXER}: {op}", fusion="fused: reads the copy's source rows",
                      module=MIXER)
    site = SiteReport(0, "af_1", op, "triton", skipped=(("flashinfer", "not importable"),),
                      fused=True, fused_with=f"{MIXER}: {COPY}",
                      fusion="fused: reads the copy's source rows", module=MIXER)
    return [copy, site]


def test_sites_are_named_by_module_and_call() -> None:
    site = SiteReport(0, "auto_functionalized_v2_7", SSU, "native", module=MIXER)
    assert site.site == f"{MIXER}: {SSU}"
    twice = SiteReport(0, "n", COPY, "native", module=MIXER, call=f"{COPY}#2")
    assert twice.site == f"{MIXER}: {COPY}#2"
    plain = SiteReport(0, "n", COPY, "native", call=f"{COPY}#1")
    assert plain.site == f"{COPY}#1"
    assert SiteReport(0, "n", SSU, "native").site == SSU  # the op alone, called once
    report = LoweringReport(name="decode")
    report.add_graph([site])
    assert str(report) == f"[decode] {MIXER}: {SSU} -> native"


def test_graphs_take_the_function_name() -> None:
    report = LoweringReport(name="decode")
    report.add_graph(_graph(residual=False))
    report.add_graph([SiteReport(0, "af_0", SSU, "native")])
    assert [s.graph_name for s in report] == ["decode", "decode", "decode 1"]
    assert str(report).splitlines()[2] == f"[decode 1] {SSU} -> native"
    unnamed = LoweringReport()
    unnamed.add_graph([SiteReport(0, "n", SSU, "native")])
    assert str(unnamed) == f"[graph 0] {SSU} -> native"


def test_graphs_without_call_sites_do_not_shift_the_labels() -> None:
    """A graph break or code around the model compiles graphs of its own, as many as the
    torch version makes: only graphs with call sites are numbered."""
    report = LoweringReport(name="forward")
    report.add_graph([])
    report.add_graph([SiteReport(0, "a", CONV, "native")])
    report.add_graph([])
    report.add_graph([SiteReport(0, "a", SSU, "native")])
    assert [s.graph_name for s in report] == ["forward", "forward 1"]
    assert [s.graph for s in report] == [1, 3] and report.graphs == 4


def test_folded_copy_names_the_op_it_went_into() -> None:
    report = LoweringReport(name="prefill")
    report.add_graph(_graph(residual=False))
    copy, op = report
    assert copy.folded and copy.fused_with_op == SSU and not copy.residual
    assert str(copy) == (f"[prefill] {MIXER}: copy_state_blocks folded into "
                         "selective_state_update, which reads the copy's source rows")
    assert str(op) == (f"[prefill] {MIXER}: selective_state_update -> triton (skipped "
                       "flashinfer: not importable) [reads the source rows of "
                       "copy_state_blocks, which no longer runs]")


def test_partner_in_another_module_is_named_in_full() -> None:
    report = LoweringReport(name="step")
    report.add_graph([
        SiteReport(0, "a", COPY, None, fused=True, fused_with=f"{MIXER}: {SSU}",
                   module="model.layers.2.mixer"),
        SiteReport(0, "b", SSU, "native", fused=True, fused_with=f"model.layers.2.mixer: {COPY}",
                   module=MIXER),
    ])
    copy, op = report
    assert f"folded into {MIXER}: {SSU}," in str(copy)
    assert f"reads the source rows of model.layers.2.mixer: {COPY}," in str(op)


def test_residual_copy_says_what_remains() -> None:
    report = LoweringReport(name="prefill")
    report.add_graph(_graph(residual=True))
    copy, op = report
    assert copy.residual and op.residual and not copy.folded
    assert str(copy).endswith("copy_state_blocks -> triton [folded into causal_conv1d_fn; "
                              "this copy remains for the rows of empty sequences only]")
    assert str(op).endswith("which remains for empty sequences' rows only]")
    assert "kept for empty sequences' rows only" in report.summary()


def test_kept_copy_shows_the_reason() -> None:
    report = LoweringReport(name="f")
    report.add_graph([SiteReport(0, "c", COPY, "native", fusion="kept: no op reads it")])
    assert str(report) == "[f] copy_state_blocks -> native [kept: no op reads it]"


def test_summary_groups_sites_per_graph() -> None:
    prefill, decode = LoweringReport(name="prefill"), LoweringReport(name="decode")
    prefill.add_graph(_graph(residual=False) + [
        SiteReport(0, "x", COPY, None, fused=True, fused_with=f"model.layers.5.mixer: {SSU}",
                   fusion="fused: reads the copy's source rows", module="model.layers.5.mixer"),
        SiteReport(0, "y", SSU, "triton", skipped=(("flashinfer", "not importable"),),
                   fused=True, fused_with=f"model.layers.5.mixer: {COPY}",
                   fusion="fused: reads the copy's source rows", module="model.layers.5.mixer"),
    ])
    decode.add_graph([SiteReport(0, "a", SSU, "native",
                                 skipped=(("triton", "needs CUDA"), ("flashinfer", "absent")))])
    merged = LoweringReport.merged([prefill, decode])
    assert merged.summary().splitlines() == [
        "prefill:",
        "  copy_state_blocks          2 site(s) -> folded into selective_state_update"
        "  [reads the copy's source rows]",
        "  selective_state_update     2 site(s) -> triton  [reads the copy's source rows; "
        "the copy no longer runs]",
        "      skipped flashinfer: not importable",
        "decode:",
        "  selective_state_update     1 site(s) -> native",
        "      skipped flashinfer: absent",
        "      skipped triton: needs CUDA",
    ]
    assert LoweringReport().summary() == ""


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
    assert str(LoweringReport()) == "no mamba_ir call sites compiled"


def test_sites_say_which_rank_compiled_them(monkeypatch) -> None:
    # where torch.distributed is initialised (tests/test_tp.py compiles on gloo ranks)
    from mamba_ir.passes import report as report_module

    monkeypatch.setattr(report_module, "_process_rank", lambda: 1)
    report = LoweringReport(name="decode")
    report.add_graph(_graph(residual=False))
    assert [s.rank for s in report] == [1, 1]
    assert str(report).splitlines()[1].startswith(f"[decode, rank 1] {MIXER}: {SSU} -> triton")
    assert report.summary().splitlines()[0] == "decode, rank 1:"
    merged = LoweringReport.merged([report])
    assert [SiteReport.from_dict(s.to_dict()) for s in merged] == list(merged)
