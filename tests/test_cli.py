"""``python -m mamba_ir``: ops, demo (eager dispatch; the compiled path is tests/test_model.py)
and bench (plot from JSON on CPU; a small model end to end on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mamba_ir
from mamba_ir.cli import build_parser, main

OPS = ("selective_state_update", "causal_conv1d_update", "causal_conv1d_fn", "copy_state_blocks",
       "mamba_chunk_scan", "selective_scan", "replay_state_update", "replay_materialize")


@pytest.mark.parametrize("command", ["demo", "ops", "bench"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "--priority" in capsys.readouterr().out


def test_ops_reports_every_op(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ops", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in OPS:
        assert f"\n{name}\n" in out
    assert out.count("chosen   :") == len(OPS)


def test_ops_forced_priority_gives_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ops", "--device", "cpu", "--priority", "flashinfer"]) == 0
    out = capsys.readouterr().out
    # flashinfer covers the SSU only; the other ops name it as not registered
    assert out.count("skipped  : flashinfer: not registered") == len(OPS) - 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--block-size", "0"], "argument --block-size: expected an integer >= 1, got 0"),
        (["demo", "--conversations", "0"], "argument --conversations: expected an integer >= 1"),
        (["demo", "--turns", "-1"], "argument --turns: expected an integer >= 1, got -1"),
        (["demo", "--new-tokens", "x"], "argument --new-tokens: expected an integer, got 'x'"),
        (["ops", "--device", "foo"], "argument --device: 'foo' is not a torch device"),
        (["ops", "--priority", "nosuch"], "--priority: entry 'nosuch' names provider 'nosuch'"),
        (["bench", "--batches", "0"], "argument --batches: expected an integer >= 1, got 0"),
        (["demo", "--state-dtype", "int4"], "argument --state-dtype: invalid choice: 'int4'"),
        (["bench", "--state-dtype", "fp8"], "argument --state-dtype: invalid choice: 'fp8'"),
        (["demo", "--state-rounding", "up"], "argument --state-rounding: invalid choice: 'up'"),
        (["demo", "--decode", "fast"], "argument --decode: invalid choice: 'fast'"),
        (["bench", "--ring", "0"], "argument --ring: expected an integer >= 1, got 0"),
    ],
)
def test_bad_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: mamba-ir {argv[0]}" in err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["ops", "demo"])
def test_absent_cuda_is_one_sentence(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mamba-ir {command}: error: --device cuda: ")
    assert "--device cpu runs everywhere" in err[-1]


def test_unreadable_model_folder_is_one_line(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "nemotron_h"}')
    for folder, message in [(tmp_path / "absent", "config.json not found"),
                            (tmp_path, "model_type 'nemotron_h' is not supported yet")]:
        with pytest.raises(SystemExit) as exit_:
            main(["demo", "--model", str(folder), "--no-compile"])
        assert str(exit_.value).startswith(f"mamba-ir demo: --model {folder}: ")
        assert message in str(exit_.value)


@pytest.mark.parametrize(("stdout_tty", "stderr_tty"), [(True, True), (False, True), (True, False)])
def test_progress_bars_only_on_a_terminal(
    stdout_tty: bool, stderr_tty: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mamba_ir import progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr_tty, raising=False)
    with progress.bar(3, "test") as shown:
        assert shown.disable is not (stdout_tty and stderr_tty)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mamba-ir {version('mamba-ir')}"
    assert mamba_ir.__version__ == version("mamba-ir")


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: mamba-ir demo")
    assert "(default: 16)" in out and "(default: None)" not in out


def test_demo_eager_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--no-compile", "--conversations", "2", "--turns", "2",
                 "--new-tokens", "3", "--system-tokens", "20", "--block-size", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "prefix cache (block 8, align mode): 2/4 requests hit" in out
    assert "tokens 12/12 identical" in out


@pytest.mark.parametrize("state", [["--state-dtype", "float32"], []])
def test_stochastic_rounding_of_a_float32_state_is_a_sentence(
        capsys: pytest.CaptureFixture[str], state: list[str]) -> None:
    """Named (refused before anything runs) or the CPU's default float32 state (refused
    when the engine is built): one line, exit status 2."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--no-compile", "--device", "cpu", *state, "--state-rounding",
              "stochastic"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "rounds float16, bfloat16 and quantized states" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--ring", "4"], "--ring 4: sets the ring of --decode replay (decode is standard)"),
    (["--decode", "replay", "--state-dtype", "int8"],
     "--decode replay: keeps a float32, float16 or bfloat16 checkpoint; --state-dtype int8 "
     "is quantized"),
    (["--decode", "replay", "--state-dtype", "bfloat16", "--state-rounding", "stochastic"],
     "--decode replay: rounds its checkpoint to nearest once per flush"),
])
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_unsupported_decode_options_are_a_sentence(
        command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"mamba-ir {command}: error: {message}")


def test_demo_with_replay_decode(capsys: pytest.CaptureFixture[str]) -> None:
    """Replay decode with a ring of 2 over 6 new tokens per turn (flushes every third step),
    against the standard reference: the same tokens."""
    code = main(["demo", "--no-compile", "--conversations", "2", "--turns", "2",
                 "--new-tokens", "6", "--system-tokens", "20", "--block-size", "8",
                 "--decode", "replay", "--ring", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "decode: replay, ring 2 (the reference decodes standard)" in out
    assert "prefix cache (block 8, align mode): 2/4 requests hit" in out
    assert "tokens 24/24 identical" in out


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_state_dtype_option(command: str) -> None:
    parser = build_parser()
    assert parser.parse_args([command]).state_dtype is None  # the model's dtype
    for name in ("float32", "bfloat16", "float16", "int16", "int8", "float8_e4m3fn"):
        assert parser.parse_args([command, "--state-dtype", name]).state_dtype == name


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_demo_on_a_quantized_state(capsys: pytest.CaptureFixture[str], rounding: str) -> None:
    code = main(["demo", "--no-compile", "--conversations", "2", "--turns", "2",
                 "--new-tokens", "3", "--system-tokens", "20", "--block-size", "8",
                 "--state-dtype", "int8", "--state-rounding", rounding])
    out = capsys.readouterr().out
    assert code == 0
    assert ("SSM state: int8, rounded stochastically" if rounding == "stochastic"
            else "SSM state: int8\n") in out
    assert "prefix cache (block 8, align mode): 2/4 requests hit" in out
    assert "tokens 12/12 identical" in out


def test_demo_log_has_no_progress_frames(tmp_path) -> None:
    """Run with output to files (as in a log of ``make demo``): no carriage returns."""
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "mamba_ir", "demo", "--no-compile", "--conversations", "1",
             "--turns", "1", "--new-tokens", "2", "--system-tokens", "8"],
            stdout=stdout, stderr=stderr, timeout=300,
        )
    assert done.returncode == 0, err.read_text()
    assert "agreement with the eager native model" in out.read_text()
    assert "\r" not in out.read_text() + err.read_text()


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "mamba_ir", "ops", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "copy_state_blocks" in done.stdout


def test_bench_plot_from_json(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"batch": b, "compiled_tok_s": 100.0 * b, "eager_tok_s": 10.0 * b,
             "compiled_roof_share": 0.5,
             "roof_tok_s": 200.0 * b} for b in (1, 16, 64)]
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"environment": {"device": "test", "date": "today"},
                                "model": {"config": "bamba: test", "parameters": 1e9,
                                          "dtype": "bfloat16", "context": 8},
                                "rows": rows}))
    assert main(["bench", "--plot-only", "--out", str(path)]) == 0
    assert path.with_suffix(".png").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("state", [[], ["--state-dtype", "int8"]])
def test_bench_small_model_on_gpu(tmp_path, state: list[str]) -> None:
    path = tmp_path / "e2e.json"
    assert main(["bench", "--layers", "2", "--batches", "1", "2", "--context", "32",
                 "--out", str(path), *state]) == 0
    data = json.loads(path.read_text())
    assert data["model"]["state_dtype"] == (state[-1] if state else "bfloat16")
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["compiled_us"] > 0 and r["roof_us"] > 0 for r in rows)


# -- mistakes answered in one line ------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err.strip()


def test_bad_out_path_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, why in [
        (tmp_path / "absent" / "e2e.json", f"folder {tmp_path / 'absent'} does not exist"),
        (afile / "e2e.json", f"{afile} is not a folder"),
        (tmp_path, "is a folder (expected a JSON file path)"),
    ]:
        # --device cpu passes the GPU check: the path is refused before anything runs
        err = _one_line_error(capsys, ["bench", "--device", "cpu", "--out", str(out)])
        assert err == f"mamba-ir bench: error: --out {out}: {why}"
    err = _one_line_error(capsys, ["bench", "--plot-only", "--out", str(tmp_path / "no.json")])
    assert err.startswith(f"mamba-ir bench: error: --out {tmp_path / 'no.json'}: no such file")


def test_unwritable_out_folder_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*args: object, **kwargs: object) -> None:  # root may write anywhere: pretend
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    err = _one_line_error(capsys, ["bench", "--device", "cpu", "--out", str(tmp_path / "x.json")])
    assert err == (f"mamba-ir bench: error: --out {tmp_path / 'x.json'}: cannot write in "
                   f"{tmp_path} (Permission denied)")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("nosuch=triton", "entry 'nosuch=triton' names op 'nosuch', which is not declared"),
        ("selective_state_update=bogus", "names provider 'bogus', which is not registered"),
        ("selective_state_update:triton", "name an op with op=provider"),
    ],
)
def test_bad_priority_variable_is_one_line(
    value: str, words: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAMBA_IR_PRIORITY", value)
    err = _one_line_error(capsys, ["ops", "--device", "cpu"])
    assert err.startswith("mamba-ir ops: error: MAMBA_IR_PRIORITY: entry ")
    assert words in err


def test_reader_leaving_early_is_quiet() -> None:
    """``mamba-ir ops | head -1``: the reader closes the pipe; the command stops with the
    status of a process killed by SIGPIPE (128 + 13), nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "mamba_ir", "ops", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before anything is written: every write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert err.decode() == ""


CONSOLE_SCRIPT = Path(sys.executable).with_name("mamba-ir")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the mamba-ir script is not installed")
def test_console_script_finds_a_clones_benchmarks(tmp_path) -> None:
    """The installed script's sys.path starts at its own folder, not the working one: from
    the root of a clone it finds benchmarks/ all the same; elsewhere it says what it needs."""
    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"environment": {"device": "test", "date": "today"},
                                "model": {"config": "bamba: test", "parameters": 1e9,
                                          "dtype": "bfloat16", "context": 8},
                                "rows": [{"batch": 1, "compiled_tok_s": 100.0,
                                          "eager_tok_s": 10.0, "compiled_roof_share": 0.5,
                                          "roof_tok_s": 200.0}]}))
    argv = [str(CONSOLE_SCRIPT), "bench", "--plot-only", "--out", str(path)]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert path.with_suffix(".png").stat().st_size > 0
    elsewhere = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode == 2
    assert "needs the benchmarks/ folder of a clone" in elsewhere.stderr
