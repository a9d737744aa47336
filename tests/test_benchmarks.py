"""The benchmarks' layering and their CPU-checkable parts.

The GPU benchmarks live in benchmarks/, beside the package: the package imports them only
in ``mamba-ir bench``, and they reach the engine and the providers through public names
(``Engine.decode_step``, ``plan(..., one_token=False)``), never by patching a private."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest
import torch

from mamba_ir.models import Engine, HybridConfig, random_model
from mamba_ir.models.cache import RESERVED_SLOTS

ROOT = Path(__file__).resolve().parent.parent
common = pytest.importorskip("benchmarks.common")  # from a clone's root, as `mamba-ir bench`
hybrid = pytest.importorskip("benchmarks.hybrid")
prefill = pytest.importorskip("benchmarks.prefill")
ssu = pytest.importorskip("benchmarks.ssu")

CONFIG = HybridConfig(vocab_size=61, hidden_size=32, num_layers=3, attn_layer_indices=(1,),
                      mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                      num_attention_heads=2, num_key_value_heads=1, attention_head_dim=16,
                      intermediate_size=48)


def _trees(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import in ``path``, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_only_the_bench_command_imports_the_benchmarks() -> None:
    users = {path.relative_to(ROOT).as_posix() for path in _trees("mamba_ir", "passes", "impls")
             if any(m.split(".")[0] == "benchmarks" for m, _ in _imports(path))}
    assert users == {"mamba_ir/cli.py"}
    assert not (ROOT / "mamba_ir" / "models" / "e2e_bench.py").exists()


def test_benchmarks_and_tests_import_no_private_names() -> None:
    for path in _trees("benchmarks", "tests"):
        for module, names in _imports(path):
            if module.split(".")[0] in ("mamba_ir", "benchmarks"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"


def test_no_benchmark_or_test_patches_a_provider_private() -> None:
    """Neither ``monkeypatch.setattr(provider, "_name", ...)`` nor ``provider._name = ...``
    on a module of mamba_ir.impls."""
    for path in _trees("benchmarks", "tests"):
        tree = ast.parse(path.read_text())
        providers = {alias.asname or alias.name for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                         "mamba_ir.impls") for alias in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "setattr" \
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) \
                    and node.args[0].id in providers and isinstance(node.args[1], ast.Constant):
                assert not str(node.args[1].value).startswith("_"), (path.name, node.lineno)
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        assert not (target.value.id in providers and target.attr.startswith("_")
                                    ), (path.name, node.lineno)


def test_import_mamba_ir_leaves_hypothesis_to_the_testing_extra() -> None:
    code = ("import sys, mamba_ir, mamba_ir.models, mamba_ir.passes; "
            "assert 'hypothesis' not in sys.modules, 'imported hypothesis'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_testing_extra_installs_hypothesis(tmp_path: Path) -> None:
    """The metadata a build of this tree gives pip (not the installed copy's, which may
    predate it) names hypothesis under the ``testing`` extra."""
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = tmp_path / done.stdout.split()[-1] / "METADATA"
    requires = Parser().parsestr(info.read_text()).get_all("Requires-Dist") or []
    assert any(r.startswith("hypothesis") and 'extra == "testing"' in r for r in requires)


@pytest.fixture(scope="module")
def engine() -> Engine:
    model = random_model(CONFIG, seed=1, std=0.2)
    return Engine(model, max_requests=4, max_len=16, num_slots=4 + RESERVED_SLOTS)


def test_decode_step_runs_the_engine_step_on_a_given_batch(engine: Engine) -> None:
    inputs = hybrid.decode_batch(engine.model, 3, 5)
    tokens, positions, rows, slots = inputs
    assert tokens.shape == (3,) and int(tokens.max()) < CONFIG.vocab_size
    assert positions.tolist() == [5, 5, 5] and rows.tolist() == [0, 1, 2]
    assert slots.dtype == torch.int32 and slots.tolist() == [RESERVED_SLOTS + i for i in range(3)]
    before = [b.clone() for b in engine.cache.buffers()]
    with torch.inference_mode():
        got = engine.decode_step(*inputs)
        written = [b.clone() for b in engine.cache.buffers()]
        for buf, old in zip(engine.cache.buffers(), before, strict=True):
            buf.copy_(old)
        want = engine.steps.decode(*inputs)  # the step the engine was built with
    assert got.shape == (3, CONFIG.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(not torch.equal(w, b) for w, b in zip(written, before, strict=True))


def test_step_bytes_are_weights_plus_per_sequence_traffic(engine: Engine) -> None:
    model, cache = engine.model, engine.cache
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert hybrid.step_bytes(model, cache, 0, 5) == weights
    one, two = (hybrid.step_bytes(model, cache, b, 5) - weights for b in (1, 2))
    assert two == 2 * one > 2 * cache.state_bytes_per_slot()  # states and KV, per sequence


def test_replay_step_bytes_count_the_cycle_not_the_whole_row() -> None:
    """A replay step reads its checkpoint, writes it once a cycle and moves a ring entry
    or a few: fewer bytes than the standard step, though the row (ring included) is
    larger."""
    model = random_model(CONFIG, seed=1)
    caches = {d: Engine(model, max_requests=2, max_len=8, num_slots=2 + RESERVED_SLOTS,
                        decode=d, ring=4).cache for d in ("standard", "replay")}
    standard, replay = (hybrid.state_traffic(caches[d]) for d in ("standard", "replay"))
    assert standard == 2 * caches["standard"].state_bytes_per_slot()
    assert caches["replay"].state_bytes_per_slot() > caches["standard"].state_bytes_per_slot()
    conv, ssm = (t[0].numel() * t.element_size() for t in caches["replay"].states(
        caches["replay"].mamba_layers[0]))
    assert ssm < replay / len(caches["replay"].mamba_layers) - 2 * conv < 2 * ssm
    assert replay < standard


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_random_states_fill_every_state_a_quantized_one_through_its_scales(state_dtype) -> None:
    cache = Engine(random_model(CONFIG, seed=1), max_requests=2, max_len=8, num_slots=4,
                   state_dtype=state_dtype).cache
    hybrid.random_states(cache, std=0.1)
    for layer in cache.mamba_layers:
        conv, ssm = cache.states(layer)
        scale = cache.ssm_scale(layer)
        h = ssm.float() if scale is None else ssm.float() * scale[..., None]
        assert 0.05 < float(h.std()) < 0.2 and 0.05 < float(conv.float().std()) < 0.2
        assert (scale is None) == (state_dtype == "bfloat16")
    for layer in cache.attention_layers:
        assert all(0.05 < float(t.std()) < 0.2 for t in cache.kv(layer))
    assert hybrid.state_dtype_name(cache) == state_dtype


def test_kernel_categories() -> None:
    kernels = {"flash_fwd_kernel": 5.0, "_ssu_kernel": 3.0, "nvjet_tst_gemm": 2.0,
               "triton_poi_fused_add": 1.0}
    got = common.by_category(kernels, prefill.CATEGORIES)
    assert got == {"attention": 5.0, "scan": 3.0, "conv": 0.0, "GEMM": 2.0, "other": 1.0}
    assert list(common.top(kernels, 2)) == ["flash_fwd_kernel", "_ssu_kernel"]


@pytest.mark.parametrize(("module", "category"), [
    ("_ssd_kernels", "scan"), ("_ssu_kernel", "scan"), ("_selective_scan_kernel", "scan"),
    ("_replay_kernel", "scan"),
    ("_conv_fn_kernels", "conv"), ("_conv_update_kernel", "conv"),
])
def test_provider_kernels_land_in_their_category(module: str, category: str) -> None:
    """The profiler names a Triton kernel by its function: every kernel of the providers'
    modules counts in its category (renamed kernels once fell into ``other``)."""
    pytest.importorskip("triton")
    mod = importlib.import_module(f"mamba_ir.impls.triton.{module}")
    names = [name for name in vars(mod) if name.endswith("_kernel")]
    assert names
    for name in names:
        assert common.by_category({name: 1.0}, prefill.CATEGORIES)[category] == 1.0, name


def test_prefill_plot_from_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    cats = {"attention": 1.0, "scan": 2.0, "conv": 0.5, "GEMM": 3.0, "other": 0.5}
    pre = [{"tokens": n, "ttft_ms": 10.0, "graph_ttft_ms": 8.0, "gpu_ms": 7.0,
            "gpu_ms_by_category": cats} for n in (512, 2048)]
    dec = [{"context": c, "batch": b, "tok_s": 100.0 * b, "roof_tok_s": 300.0 * b}
           for c in (512, 8192) for b in (1, 16)]
    path = tmp_path / "prefill.json"
    path.write_text(json.dumps({"environment": {"device": "test", "date": "today"},
                                "model": {"parameters": 1e9, "dtype": "bfloat16"},
                                "prefill": pre, "decode": dec}))
    png = prefill.plot(path)
    assert png == path.with_suffix(".png") and png.stat().st_size > 0


# -- the SSU benchmark's state dtypes ---------------------------------------------------


@pytest.mark.parametrize("name", list(ssu.STATE_DTYPES))
def test_ssu_decode_call_is_a_valid_call_of_each_state_dtype(name: str) -> None:
    from mamba_ir import get_op

    dtype = ssu.STATE_DTYPES[name]
    call = ssu.decode_call(2, redirect=True, device="cpu", state_dtype=dtype)
    op = get_op("selective_state_update")
    op.check(op.bind(**call))  # raises on an invalid call
    assert call["state"].dtype == dtype and call["state"].shape[0] == 4
    if dtype == torch.bfloat16:
        assert call["state_scale"] is None
    else:
        assert call["state_scale"].shape == (4, ssu.NHEADS, ssu.HEADDIM)
        assert call["state_scale"].dtype == torch.float32 and bool(call["state_scale"].gt(0).all())


def test_ssu_bf16_decode_call_keeps_its_values() -> None:
    """The bf16 state is drawn as before quantized states were added: same seed, same
    values (the published measurements stay comparable)."""
    g = torch.Generator().manual_seed(0)
    want = (torch.randn(4, ssu.NHEADS, ssu.HEADDIM, ssu.DSTATE, generator=g) * 0.5).to(
        torch.bfloat16)
    got = ssu.decode_call(2, redirect=False, device="cpu")["state"]
    assert torch.equal(got, want)


def test_ssu_moved_bytes_count_state_scales_inputs_and_output() -> None:
    bf16, int8 = (ssu.moved_bytes(4, d) for d in (torch.bfloat16, torch.int8))
    rows = 4 * ssu.NHEADS * ssu.HEADDIM
    assert bf16["state"] == 2 * rows * ssu.DSTATE * 2 == 2 * int8["state"]
    assert bf16["scales"] == 0 and int8["scales"] == 2 * rows * 4
    assert bf16["output"] == int8["output"] == rows * 2
    assert bf16["inputs"] == int8["inputs"] > 2 * rows * 2  # x and z at least
    for parts in (bf16, int8):
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def _quant_rows() -> list[dict]:
    rows = []
    for batch, times in ((1, {"bfloat16": 8.0, "int8": 8.0}), (64, {"bfloat16": 100.0,
                                                                    "int8": 50.0})):
        for name, us in times.items():
            nbytes = ssu.moved_bytes(batch, ssu.STATE_DTYPES[name])
            rows.append({"batch": batch, "state_dtype": name, "bytes": nbytes,
                         "triton_us": us, "roof_tbs": 3.0, "copy_tbs": 2.5,
                         "kernel_copy_tbs": 3.0})
            if name == "int8":  # stochastic rounding: 10 % over rounding to nearest
                rows[-1]["triton_sr_us"] = us * 1.1
    return ssu.quant_rates(rows)


def test_ssu_quant_rates_and_table() -> None:
    rows = _quant_rows()
    big = {r["state_dtype"]: r for r in rows if r["batch"] == 64}
    assert big["bfloat16"]["speedup_vs_bf16"] == 1.0 and big["int8"]["speedup_vs_bf16"] == 2.0
    want = big["int8"]["bytes"]["total"] / 50e-6 / 1e12
    assert big["int8"]["triton_tbs"] == pytest.approx(want)
    assert big["int8"]["triton_vs_roof"] == pytest.approx(want / 3.0)
    lines = ssu.quant_table(rows).splitlines()
    assert len(lines) == 1 + len(rows) and "vs bf16" in lines[0] and "%roof" in lines[0]
    assert lines[-1].split()[:2] == ["64", "int8"]
    assert lines[-1].split()[-3:] == ["2.00", "55.0", "10.0%"]
    assert rows[-1]["sr_slowdown"] == pytest.approx(0.1)


def test_ssu_quant_plot_from_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "ssu_quant_bench.json"
    path.write_text(json.dumps({"environment": {"device": "test", "date": "today"},
                                "state_dtypes": ["bfloat16", "int8"], "rows": _quant_rows()}))
    png = ssu.plot(path)
    assert png == path.with_suffix(".png") and png.stat().st_size > 0


def test_state_precision_orders_the_dtypes_and_plots(tmp_path: Path) -> None:
    """Two decode steps against the float64 recurrence: float32 state is exact to float32
    rounding, and fewer state bits give larger errors; the JSON plots."""
    from benchmarks.common import write_json
    from benchmarks.state_precision import measure, plot

    data = measure(2, "cpu")
    last = {label: s["state_rel"][-1] for label, s in data["series"].items()}
    assert last["float32"] < 1e-6
    assert last["float32"] < last["int16"] < last["bfloat16"] < last["int8"]
    assert set(last) >= {"int8 + stochastic", "bfloat16 + stochastic"}
    assert "float32 + stochastic" not in last
    pytest.importorskip("matplotlib")
    assert plot(write_json("state_precision.json", data, tmp_path)).exists()
# -- the replay benchmark -----------------------------------------------------------------

replay = pytest.importorskip("benchmarks.replay")


@pytest.mark.parametrize("phase", replay.PHASES)
def test_replay_call_is_a_valid_call_that_closes_its_cycle(phase: str) -> None:
    """The benchmark's call passes the op's checks, and ``L + 1`` steps bring every length
    back to where it started (what timing whole cycles in one graph relies on)."""
    from mamba_ir import get_op, ops

    ring = 3
    call = replay.replay_call(5, ring, phase, device="cpu")
    op = get_op("replay_state_update")
    op.check(op.bind(**call))  # raises on an invalid call
    rows = call["state_batch_indices"].long()
    start = call["ring_len"].clone()
    want = [0] * 5 if phase == "aligned" else [b % (ring + 1) for b in range(5)]
    assert start[rows].tolist() == want
    for step in range(ring + 1):
        ops.replay_state_update(**call)
        assert not torch.equal(call["ring_len"], start) or step == ring
    assert torch.equal(call["ring_len"], start)


def test_replay_bytes_match_the_op_docs() -> None:
    """Memory per request and the mean traffic per step, as docs/ops.md computes them."""
    assert replay.checkpoint_bytes() == 2048 * 1024
    assert replay.entry_bytes() == int(18.5 * 1024)
    assert replay.memory_per_request(8) == 2048 * 1024 + 8 * int(18.5 * 1024) + 4
    mean = {ring: replay.cycle_bytes(ring) / (ring + 1) / 1024 for ring in replay.RINGS}
    assert [round(v) for v in mean.values()] == [2366, 2334, 2424]


def test_replay_cli_help_runs_without_a_gpu() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.replay", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--rings" in done.stdout


def test_replay_plot_from_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"batch": b, "ring": r, "replay_aligned_speedup": 1.5,
             "replay_staggered_speedup": 1.6} for r in (8, 16) for b in (1, 64)]
    path = tmp_path / "replay_bench.json"
    path.write_text(json.dumps({"environment": {"device": "test", "date": "today"},
                                "rows": rows}))
    png = replay.plot(path)
    assert png == path.with_suffix(".png") and png.stat().st_size > 0
    assert replay.table(rows).splitlines()[0].split()[:2] == ["L", "batch"]


def test_spec_cycle_closes_and_refuses_tokens_the_ring_cannot_hold() -> None:
    assert replay.spec_cycle(8, 4, 3) == [4, 7]  # 7 - 4 + 3 committed + 4 tokens > 8
    assert replay.spec_cycle(16, 4, 4) == [4, 8, 12, 16]
    assert replay.spec_cycle(8, 4, 0) == [4]  # nothing accepted: the ring stays at its tokens
    with pytest.raises(ValueError, match="tokens"):
        replay.spec_cycle(3, 4, 1)


@pytest.mark.parametrize("accepted", [1, 3])
def test_spec_calls_are_valid_and_the_replay_cycle_closes(accepted: int) -> None:
    """Both speculative calls pass the ops' checks and run; the replay rows' lengths follow
    ``spec_cycle`` step by step (a flush at its end) and come back to where they started."""
    from mamba_ir import get_op, ops

    ring, batch = 8, 3
    call = replay.spec_replay_call(batch, ring, accepted=accepted, device="cpu")
    op = get_op("replay_state_update")
    op.check(op.bind(**call))
    std = replay.spec_ssu_call(batch, accepted=accepted, device="cpu")
    ssu = get_op("selective_state_update")
    ssu.check(ssu.bind(**std))
    rows = call["state_batch_indices"].long()
    lengths = replay.spec_cycle(ring, replay.TOKENS, accepted)
    for step, want in enumerate(lengths):
        assert call["ring_len"][rows].tolist() == [want] * batch, step
        ops.replay_state_update(**call)
    assert call["ring_len"][rows].tolist() == [replay.TOKENS] * batch
    assert ops.selective_state_update(**std).shape == call["out"].shape
